"""Triton kernels, one file per concern; each file holds the @triton.jit kernels and their host launcher.

Importing this package imports triton: only `triton_ops` (the backend table) does, and only when the
triton backend is chosen for a device it can run on.
"""

"""A CPU stand-in for CUDA graphs (amphista_engine/cuda_graphs.py's DecodeGraphs), for the tests that run without a GPU.

    graphs = CPUGraphs()            # a DecodeGraphs whose capture and replay run on the CPU
    graphs.attach(decoder)          # as with DecodeGraphs: warm-up, capture, replays, keys, fingerprints
    assert not graphs.built_in_capture

DecodeGraphs' bookkeeping (keys, warm-up, state tensors copied in, rebound attributes, fingerprints, trimming) runs
as it does on a GPU; only the recording and the replay are replaced. A replay re-runs the eager step of the decoder
the graph was captured with, so every Python value on that decoder is the capture's, and it reads the tensors the
capture read through the target, the heads, the tree and the caches: each such attribute is pointed back at the
tensor it held when the capture began while the replay runs (a real graph reads those addresses, wherever the engine
has since pointed its attributes), and put back afterwards (a real replay runs no Python). What a stale graph would
read, this one reads: a graph kept past a change of those tensors gives other tokens than eager steps. A capture that
builds or rebinds a module tensor is recorded in `built_in_capture` (on a GPU it would land in the graph's pool, or
fail the capture; the warm-up step should have built it).

What it cannot model: Python values read from objects other than the captured decoder (module flags, heads'
settings, kernel modes) are read as they are now, and an op that syncs with the host captures without complaint.
The GPU tests of test_cuda_graphs.py cover those.
"""
from __future__ import annotations

import torch

from amphista_engine.cuda_graphs import DecodeGraphs


def module_slots(decoder) -> list[tuple[str, dict, str, torch.Tensor]]:
    """(name, holder dict, key, tensor) of every tensor attribute of the target's and the heads' modules."""
    out = []
    for owner, root in (("model", decoder.model), ("heads", getattr(decoder, "heads", None))):
        if isinstance(root, torch.nn.Module):
            for mname, m in root.named_modules():
                for d in (m._parameters, m._buffers, vars(m)):
                    out += [(f"{owner}.{mname}.{k}".replace("..", "."), d, k, v)
                            for k, v in list(d.items()) if isinstance(v, torch.Tensor)]
    return out


def shared_slots(decoder) -> list[tuple[dict, str, object]]:
    """(holder dict, key, value): what a step reads without owning it. The module slots, the tensors of the static
    tree and of the caches, and the attributes that hold those (the heads' SAL cache, the tree's static buffers)."""
    out = [(d, k, v) for _, d, k, v in module_slots(decoder)]
    heads, tree = getattr(decoder, "heads", None), getattr(decoder, "tree", None)
    for holder, name in ((heads, "sal_cache"), (tree, "static")):
        if holder is not None and name in vars(holder):
            out.append((vars(holder), name, vars(holder)[name]))
    for obj in (getattr(tree, "static", None), decoder.cache, getattr(heads, "sal_cache", None)):
        if obj is not None:
            d = vars(obj)
            out += [(d, k, v) for k, v in list(d.items()) if isinstance(v, torch.Tensor)]
    return out


_ABSENT = object()


class ReplayGraph:
    """One 'captured' step. Recording runs the step for real (the replay right after it is skipped). A replay re-runs
    it with each shared slot, and each attribute of the decoder that the step rebinds, pointed at what it held when
    the capture began (the address the capture read first; a slot the step itself rebinds is read after that rebind,
    as in the capture); copies what it wrote into the tensors the capture wrote (the outputs and the rebound tensors:
    what a real replay leaves behind); then points every slot back where it was before the replay (a real replay runs
    no Python; DecodeGraphs re-points the rebound attributes of the decoder it replays for)."""

    def __init__(self, decoder, eager, kv_len, built: list[str]):
        self.eager, self.kv_len = eager, kv_len
        first_vars = dict(vars(decoder))
        before = {(id(d), k): v for _, d, k, v in module_slots(decoder)}
        read = {(id(d), k): (d, k, v) for d, k, v in shared_slots(decoder)}
        self.outputs = eager(kv_len)
        built += [name for name, d, k, v in module_slots(decoder) if before.get((id(d), k)) is not v]
        for d, k, v in shared_slots(decoder):      # slots that appeared during the capture: read as it left them
            read.setdefault((id(d), k), (d, k, v))
        dvars = vars(decoder)
        for n, v in dvars.items():
            if n != "step_device" and first_vars.get(n, _ABSENT) is not v:
                read[id(dvars), n] = (dvars, n, first_vars.get(n, _ABSENT))
        # (holder, key, what the capture read first, what it left there)
        self.slots = [(d, k, v, d.get(k, _ABSENT)) for d, k, v in read.values()]
        self.fresh = True

    def replay(self):
        if self.fresh:
            self.fresh = False
            return
        now = [d.get(k, _ABSENT) for d, k, _, _ in self.slots]
        for (d, k, first, _) in self.slots:
            _put(d, k, first)
        try:
            new = self.eager(self.kv_len)
            for d, k, first, left in self.slots:
                fresh = d.get(k)
                if left is not first and isinstance(left, torch.Tensor) and isinstance(fresh, torch.Tensor) \
                        and fresh is not left:
                    left.copy_(fresh)
        finally:
            for (d, k, _, _), cur in zip(self.slots, now):
                _put(d, k, cur)
        for static, fresh in zip(self.outputs, new):
            static.copy_(fresh)


def _put(d: dict, k: str, v):
    if v is _ABSENT:
        d.pop(k, None)
    else:
        d[k] = v


class CPUGraphs(DecodeGraphs):
    """DecodeGraphs on the CPU: every decoder is 'supported', capture and replay are ReplayGraph's."""
    _supported = staticmethod(lambda decoder: True)
    _capturing = staticmethod(lambda: False)
    _sync = staticmethod(lambda: None)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.built_in_capture: list[str] = []

    def _warm_step(self, eager, kv_len):
        return eager(kv_len)

    def _record(self, decoder, eager, kv_len):
        g = ReplayGraph(decoder, eager, kv_len, self.built_in_capture)
        return g, g.outputs


def decoder_runs(kind):
    """run(steps, prepare, read, graphs=None) on test_cuda_graphs._setup's fp32 CPU model, cache and two prompts: each
    call a fresh decoder, plain (kind None) or speculative (random `kind` heads, seed 2, a dynamic-8 tree), greedy;
    prepare(decoder), then attached to `graphs` (a CPUGraphs) if given, then the prompts' prefill and `steps` steps
    under inference_mode. Returns [read(decoder, out, count) of each step]."""
    from amphista_engine.generation import PlainDecoder
    from amphista_engine.heads import random_heads
    from amphista_engine.sampling import SamplingParams
    from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
    from test_cuda_graphs import _setup
    model, cache, prompts = _setup("cpu", dtype=torch.float32)
    heads = None if kind is None else random_heads(kind, model, num_heads=4, seed=2)

    def run(steps, prepare, read, graphs=None):
        dec = (PlainDecoder(model, cache, SamplingParams()) if kind is None else
               SpeculativeDecoder(model, cache, heads, TreeSpec("dynamic-8", 4, torch.device("cpu")),
                                  SamplingParams()))
        prepare(dec)
        if graphs is not None:
            graphs.attach(dec)
        got = []
        with torch.inference_mode():
            dec.prefill(prompts)
            for _ in range(steps):
                out, count = dec.step()
                got.append(read(dec, out, count))
        return got
    return run

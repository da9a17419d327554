"""Threads and forked children for the tests of engines run from several threads or processes
(test_cpu_threads_user_qa.py, test_threads_lifecycle_qa.py): every wait has a timeout, so a hang fails the test
instead of blocking the run. conftest.in_other_thread is the simpler case: a thread waited for, without a timeout."""
from __future__ import annotations

import multiprocessing as mp
import threading

import pytest


def start_thread(fn, name=None):
    """Starts fn in a daemon thread; returns (thread, out): out gets fn's result or the exception it raised."""
    out = []

    def body():
        try:
            out.append(fn())
        except BaseException as e:      # noqa: BLE001 -- handed to the test
            out.append(e)
    t = threading.Thread(target=body, name=name, daemon=True)
    t.start()
    return t, out


def run_forked(child, engine, arg, wait: float, hung: str):
    """child(engine, queue, arg) in a forked process: what it put on the queue. A child still running after `wait`
    seconds is killed and fails the test with the message `hung`."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(engine, q, arg))
    p.start()
    p.join(wait)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(hung)
    return q.get(timeout=wait)


def run_forked_holding(lock, child, engine, arg, wait: float, hung: str):
    """run_forked while another thread holds `lock` (as a thread between two steps holds it at a fork)."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait(wait)
    t, _ = start_thread(hold)
    assert held.wait(wait)
    try:
        return run_forked(child, engine, arg, wait, hung)
    finally:
        release.set()
        t.join(wait)

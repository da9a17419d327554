"""The async API in a forked child (README "Python API": engines usable in a forked child). Regression: an async
call's turn taken at the fork (its worker thread decoding in the parent), or the turns' lock another thread held
then, stayed taken in the child, where no worker lives to release it: the child's first agenerate waited for good.
Every wait has a timeout, so a hang fails instead of blocking."""
import asyncio
import warnings

from amphista_engine import Engine, async_api

from thread_helpers import run_forked, run_forked_holding

WAIT = 60


def _engine(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Engine.from_pretrained(str(path), device="cpu", max_seq_len=64, backend="torch")


def _child(engine, q, prompt):
    q.put(asyncio.run(engine.agenerate(prompt, max_new_tokens=4, chat=False)).token_ids)


def test_forked_child_async_call_not_stuck_on_a_turn_taken_at_the_fork(tiny_hf_dir):
    e = _engine(tiny_hf_dir)
    want = e.generate("Hello", max_new_tokens=4, chat=False).token_ids
    turns = async_api._turns(e)
    asyncio.run(turns.acquire())        # as an async run in progress holds it: released when its worker ends
    try:
        got = run_forked(_child, e, "Hello", WAIT, "the child's agenerate waited for the parent's turn")
    finally:
        turns.release()
    assert got == want


def test_forked_child_async_call_not_stuck_on_the_turns_lock_held_at_the_fork(tiny_hf_dir):
    e = _engine(tiny_hf_dir)
    want = e.generate("Hello", max_new_tokens=4, chat=False).token_ids
    got = run_forked_holding(async_api._turns_lock, _child, e, "Hello", WAIT,
                             "the child's agenerate waited for the parent thread's lock")
    assert got == want
    assert asyncio.run(e.agenerate("Hello", max_new_tokens=4, chat=False)).token_ids == want   # the parent's too

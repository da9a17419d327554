"""A Python user's QA of the documented API (README "## Python API"): option values as numpy hands them over, and
stop strings that could never match."""
from __future__ import annotations

import numpy as np
import pytest

from amphista_engine import InputError

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = [5, 17, 42, 9, 100]


def test_numpy_integers_work_for_min_tokens_and_stop_token_ids(tiny_amphista_engine):
    """max_new_tokens, top_logprobs and a prompt's token ids take numpy's integers; min_tokens and stop_token_ids
    refused them, stop_token_ids saying np.int64(7) "is not a token id of this model" (an array was refused too)."""
    eng = tiny_amphista_engine
    base = eng.generate(PROMPT, 12, ignore_eos=True)
    stop_id = base.token_ids[3]
    want = eng.generate(PROMPT, 12, stop_token_ids=[stop_id], min_tokens=2)
    for ids in ([np.int64(stop_id)], np.array([stop_id]), (np.int32(stop_id),)):
        got = eng.generate(PROMPT, 12, stop_token_ids=ids, min_tokens=np.int64(2))
        assert got == want and got.finish_reason == want.finish_reason
    with pytest.raises(InputError, match=r"stop_token_ids: True is not a token id .*got bool"):
        eng.generate(PROMPT, 4, stop_token_ids=[True])
    with pytest.raises(InputError, match=r"stop_token_ids: 100000 is not a token id of this model"):
        eng.generate(PROMPT, 4, stop_token_ids=np.array([100000]))
    with pytest.raises(InputError, match="min_tokens must be an integer >= 0"):
        eng.generate(PROMPT, 4, min_tokens=np.int64(-1))


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_a_stop_string_that_is_not_utf8_is_refused(tiny_amphista_engine, speculative):
    """A stop string read with errors='surrogateescape' holds lone surrogates, which no answer's text holds (its
    undecodable bytes are U+FFFD): the stop silently did nothing, while the same bytes in a prompt are refused.
    The CLI refused it already (test_cli_generate_user_qa); generate and stream now do too, before any work."""
    eng = tiny_amphista_engine
    with pytest.raises(InputError, match=r"stop string 1 .* lone surrogate"):
        eng.generate(PROMPT, 4, stop=["ok", "a\udcffb"], speculative=speculative)
    with pytest.raises(InputError, match="U\\+DCFF"):
        eng.stream(PROMPT, 4, stop="\udcff", speculative=speculative)
    assert eng.generate(PROMPT, 4, stop=["\ufffd"], speculative=speculative).finish_reason in ("length", "stop",
                                                                                              "eos")


def test_a_refused_call_leaves_no_earlier_result(tiny_amphista_engine):
    """The README: a run stopped by an error leaves last_result None, never an earlier run's. A call refused before
    it ran (an empty prompt in a batch) kept the previous run's result there."""
    engine = tiny_amphista_engine
    engine.generate("a b", max_new_tokens=2, chat=False)
    assert engine.last_result is not None
    with pytest.raises(InputError, match="prompt is empty"):
        engine.generate_batch(["a b", ""], max_new_tokens=2, chat=False)
    assert engine.last_result is None and engine.last_results == []

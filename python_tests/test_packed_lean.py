"""An engine that loaded its own float model on the CPU holds each weight once: oneDNN's packed copy.

Before, `quant="none"` kept every float weight twice, the nn.Linear's and the packed copy cpu_packed multiplies
(Llama-3.2-1B's shapes in fp32: 8.3 GiB resident). `Engine.from_pretrained` now frees the float weights of the
target's packed layers (cpu_packed.drop_float_weights); the packed copy is exact (oneDNN's reorder permutes), so
what the model computes does not change, and what reads the weights reads them back from it.
"""
import pytest
import torch

from amphista_engine.engine import Engine
from amphista_engine.heads import random_heads
from amphista_engine.kernels import cpu_packed, cpu_quant
from amphista_engine.loading import load_model

pytestmark = [pytest.mark.usefixtures("one_thread_module"),
              pytest.mark.skipif(not cpu_packed.available(torch.float32), reason="oneDNN packing unavailable")]

PROMPT = "the quick brown fox jumps over"


def _packed(model):
    return [m for m in model.modules() if type(m) is cpu_packed.PackedLinear]


@pytest.fixture(scope="module")
def engines(tiny_hf_dir):
    """(lean: from_pretrained, kept: the same model loaded by hand, whose weights the engine must not free)."""
    lean = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=128, quant="none")
    kept = Engine(load_model(tiny_hf_dir, max_seq_len=128), max_seq_len=128, quant="none")
    return lean, kept


def test_from_pretrained_holds_each_float_weight_once(engines):
    lean, kept = engines
    layers = _packed(lean.model)
    assert layers and all(m.weight.is_meta for m in layers)        # the untied LM head too
    assert lean.model.output in layers
    assert not any(m.weight.is_meta for m in _packed(kept.model))   # a model handed to Engine() is the caller's
    saved = sum(m.weight.numel() * 4 for m in layers)
    assert cpu_quant.weight_bytes(kept.model) - cpu_quant.weight_bytes(lean.model) == saved


def test_the_packed_copy_reads_back_exactly(engines):
    lean, kept = engines
    for a, b in zip(_packed(lean.model), _packed(kept.model)):
        assert torch.equal(a.float_rows(), b.weight.detach())
        rows = torch.randperm(b.weight.shape[0])[:5]
        assert torch.equal(a.float_rows(rows), b.weight.detach()[rows])
        assert a.float_rows(rows, torch.bfloat16).dtype == torch.bfloat16


def test_outputs_equal_those_of_the_kept_weights(engines):
    lean, kept = engines
    ids = torch.randint(0, lean.model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = lean.model(ids, torch.arange(11)[None]), kept.model(ids, torch.arange(11)[None])
    assert torch.equal(a, b)
    plain = kept.generate(PROMPT, max_new_tokens=16, chat=False, ignore_eos=True)
    assert lean.generate(PROMPT, max_new_tokens=16, chat=False, ignore_eos=True).token_ids == plain.token_ids


def test_a_gradient_still_flows_through_a_freed_layer(engines):
    """Training-style use (an input that needs a gradient) falls back to F.linear on the weight read back."""
    lean, kept = engines
    a, b = lean.model.layers[0].feed_forward.w2, kept.model.layers[0].feed_forward.w2
    x = torch.randn(3, a.in_features, requires_grad=True)
    y = a(x)
    y.sum().backward()
    assert torch.allclose(y, torch.nn.functional.linear(x, b.weight), rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad, b.weight.detach().sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_heads_load_and_speculate_on_the_freed_lm_head(engines, tiny_hf_dir, tmp_path, kind):
    """Heads saved against the float model pass the checkpoint check (fingerprint and sketch rows recorded before
    the weight went), draft from the packed copy, and greedy speculation equals plain decoding."""
    from amphista_engine.heads import save_heads
    lean, kept = engines
    saved = save_heads(random_heads(kind, kept.model, num_heads=3, seed=2), tmp_path / kind)
    plain = lean.generate(PROMPT, max_new_tokens=20, chat=False, ignore_eos=True)
    with torch.no_grad():
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # no "heads trained for another model" warning
            lean.load_heads(str(saved))
    spec = lean.generate(PROMPT, max_new_tokens=20, chat=False, ignore_eos=True, speculative=kind, tree="tree-16")
    assert spec.token_ids == plain.token_ids
    lean.load_heads(None)


def test_full_vocabulary_heads_score_with_the_targets_own_copy(engines):
    """Heads drafting over the whole vocabulary multiply through the target's PackedLinear: no second packed copy
    of the LM head (cpu_packed.linear's cache stays without it), and the same scores as the kept weight's."""
    lean, kept = engines
    heads = lean.load_heads(random_heads("medusa", lean.model, num_heads=2, seed=4))
    assert not heads.config.draft_vocab_size
    cpu_packed._weights.clear()
    x = torch.randn(1, 2, lean.model.config.dim)
    with torch.no_grad():
        got = heads.logits(x)
    assert not cpu_packed._weights
    assert torch.equal(got, cpu_packed.linear(x, kept.model.output.weight.detach()))
    small = lean.load_heads(random_heads("medusa", lean.model, num_heads=2, draft_vocab_size=64, seed=5))
    assert torch.equal(small.output_weight(), kept.model.output.weight.detach()[small.draft_vocab])
    lean.load_heads(None)


def test_a_tied_lm_head_keeps_the_embedding(tiny_hf_dir, tmp_path):
    """A tied LM head's weight is the embedding, which the model reads: it stays; the layers are freed."""
    from conftest import write_tiny_hf
    path = write_tiny_hf(tmp_path / "tied", tie_word_embeddings=True)
    lean = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64, quant="none")
    m = lean.model
    assert m.output.weight is m.tok_embeddings.weight and not m.output.weight.is_meta
    assert all(x.weight.is_meta for x in _packed(m) if x is not m.output)
    kept = Engine(load_model(path, max_seq_len=64), max_seq_len=64, quant="none")
    assert lean.generate(PROMPT, max_new_tokens=12, chat=False, ignore_eos=True).token_ids == \
        kept.generate(PROMPT, max_new_tokens=12, chat=False, ignore_eos=True).token_ids

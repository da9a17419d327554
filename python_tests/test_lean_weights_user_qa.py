"""A user's checks of the two CPU memory features: a float model whose weights an engine freed once packed
(cpu_packed.PackedLinear.drop_float_weight) and a 4-bit model's embedding as int8 codes (cpu_quant.CodesEmbedding).

What had gone wrong: the freed model handed to `Engine(loaded, quant="q4"/"auto")` died in torch ("Tensor.item()
cannot be called on meta tensors"); its state_dict() held meta tensors (torch.save wrote nothing usable) and
load_state_dict() into it was a no-op torch only warned about; .to(dtype) kept multiplying through a copy of the
old dtype read back at every call; a negative token id looked up row V - 1 of the coded table without a word (an
nn.Embedding refuses it); .to(bf16) rounded the coded table's fp32 scales; a 4-bit tied model's draft rows were
gathered again at every call.
"""
import pytest
import torch
from torch import nn

from amphista_engine.engine import Engine
from amphista_engine.errors import InputError
from amphista_engine.heads import random_heads
from amphista_engine.kernels import cpu_packed, cpu_quant
from amphista_engine.loading import load_model
from conftest import random_tiny_model, write_tiny_gguf, write_tiny_hf
from model_helpers import rel_err

pytestmark = [pytest.mark.usefixtures("one_thread_module"),
              pytest.mark.skipif(not cpu_packed.available(torch.float32), reason="oneDNN packing unavailable")]

PROMPT = "the quick brown fox jumps over"


def _lean(path):
    return Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=128, quant="none")


def _tokens(engine, n=12):
    return engine.generate(PROMPT, max_new_tokens=n, chat=False, ignore_eos=True).token_ids


def _logits(model, ids=(1, 17, 250, 3, 99)):
    ids = torch.tensor([list(ids)])
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None])


def _freed(model):
    return [m for m in model.modules() if type(m) is cpu_packed.PackedLinear and m.weight.is_meta]


@pytest.mark.parametrize("quant", ["q4", "auto"])
def test_a_freed_model_goes_to_a_4bit_engine(tiny_hf_dir, quant):
    """Engine(lean.loaded, quant=...) quantizes the values read back from the packed copies, as it quantizes the
    same model loaded by hand, and drops the oneDNN copies it no longer reads."""
    lean = _lean(tiny_hf_dir)
    assert _freed(lean.model)
    got = Engine(lean.loaded, max_seq_len=128, quant=quant)
    ref = Engine(load_model(tiny_hf_dir, max_seq_len=128), max_seq_len=128, quant=quant)
    assert got.quant == ref.quant
    assert _tokens(got) == _tokens(ref)
    if quant == "q4":
        assert not any(getattr(m, "_packed", None) is not None for m in got.model.modules())
        assert cpu_quant.weight_bytes(got.model) == cpu_quant.weight_bytes(ref.model)


def test_state_dict_of_a_freed_model_holds_its_weights(tiny_hf_dir, tmp_path):
    lean = _lean(tiny_hf_dir)
    plain = load_model(tiny_hf_dir, max_seq_len=128).model
    sd = lean.model.state_dict()
    assert not any(t.is_meta for t in sd.values())
    ref = plain.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    torch.save(sd, tmp_path / "m.pt")
    other = load_model(tiny_hf_dir, max_seq_len=128).model
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    # other multiplies through torch's own fp32 GEMM, the lean model through oneDNN's packed one: the same weights
    # give the same logits up to the kernels' rounding (bit for bit on an AVX2 EPYC, not on an AMX Xeon)
    assert rel_err(_logits(other), _logits(lean.model)) < 1e-5
    assert _freed(lean.model)           # saving does not bring the float weights back


def test_load_state_dict_into_a_freed_model(tiny_hf_dir, tmp_path):
    lean = _lean(tiny_hf_dir)
    other_dir = write_tiny_hf(tmp_path / "other", seed=5)
    other = load_model(other_dir, max_seq_len=128).model
    assert rel_err(_logits(other), _logits(lean.model)) > 0.1      # another model's logits
    lean.model.load_state_dict(other.state_dict())
    assert rel_err(_logits(lean.model), _logits(other)) < 1e-5     # (as above: oneDNN's GEMM against torch's)
    assert len(_freed(lean.model)) == len([m for m in lean.model.modules() if type(m) is cpu_packed.PackedLinear])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_moving_a_freed_model_to_another_dtype(tiny_hf_dir, dtype):
    lean = _lean(tiny_hf_dir)
    lean.model.to(torch.float32)        # no change: the weights stay freed
    assert _freed(lean.model)
    moved = lean.model.to(dtype)
    layers = [m for m in moved.modules() if type(m) is cpu_packed.PackedLinear]
    assert layers and not any(m.weight.is_meta for m in layers) and all(m.weight.dtype == dtype for m in layers)
    plain = load_model(tiny_hf_dir, max_seq_len=128).model.to(dtype)
    assert torch.equal(_logits(moved), _logits(plain))


@pytest.fixture(scope="module")
def coded(tiny_hf_dir, tmp_path_factory):
    path = write_tiny_gguf(tiny_hf_dir, tmp_path_factory.mktemp("q4") / "m.gguf", qtype="Q4_0",
                           qtypes={"token_embd.weight": "Q8_0", "output.weight": "Q8_0"})
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=128)
    assert type(engine.model.tok_embeddings) is cpu_quant.CodesEmbedding
    return engine


@pytest.mark.parametrize("bad", [-1, -300, 300, 10**6])
def test_a_token_id_outside_the_coded_table_is_refused(coded, bad):
    emb = coded.model.tok_embeddings
    with pytest.raises(InputError, match=f"token id {bad} is outside"):
        emb(torch.tensor([[1, bad, 2]]))
    with pytest.raises(InputError, match=f"token id {bad} is outside"):
        _logits(coded.model, (1, 5, bad))


def test_float_token_ids_are_refused_by_the_coded_table(coded):
    with pytest.raises(InputError, match="must be integers"):
        coded.model.tok_embeddings(torch.tensor([1.0, 2.0]))
    assert coded.model.tok_embeddings(torch.tensor([], dtype=torch.long)).shape == (0, coded.config.dim)


def test_the_coded_table_in_bf16_keeps_fp32_scales():
    table = torch.randn(40, 64)
    emb = cpu_quant.CodesEmbedding.quantize(nn.Embedding(40, 64, _weight=table.clone()))
    fp32_rows = emb.float_rows()
    emb.to(torch.bfloat16)
    assert emb.scales.dtype == emb.zeros.dtype == torch.float32
    ids = torch.arange(40)
    assert emb(ids).dtype == torch.bfloat16 and torch.equal(emb(ids), fp32_rows.bfloat16())


def test_a_table_not_a_multiple_of_32_wide_stays_float():
    model = random_tiny_model(dim=48, heads=4, kv_heads=2, vocab=64)
    assert cpu_quant.quantize_embedding(model) is None
    assert type(model.tok_embeddings) is nn.Embedding and not model.tok_embeddings.weight.is_meta


def test_draft_rows_of_a_4bit_tied_model_are_gathered_once(tmp_path):
    path = write_tiny_hf(tmp_path / "tied", tie_word_embeddings=True)
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=128, quant="q4")
    m = engine.model
    assert type(m.tok_embeddings) is cpu_quant.CodesEmbedding and m.output.weight is m.tok_embeddings.weight
    heads = engine.load_heads(random_heads("medusa", m, num_heads=2, draft_vocab_size=64, seed=2))
    w = heads.output_weight()
    assert w.device.type == "cpu" and heads.output_weight() is w
    assert torch.equal(w, m.output.float_rows(heads.draft_vocab))

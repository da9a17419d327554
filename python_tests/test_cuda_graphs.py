"""CUDA-graph decoding (amphista_engine/cuda_graphs.py): graph replay emits exactly what eager steps emit.

The GPU tests decode 200 tokens with a plain decoder and with speculative decoders (Amphista on the static
64-node tree, Medusa on a dynamic tree), eagerly and through DecodeGraphs, and compare every token and
every step's count; a second generation with a new decoder reuses the graphs. They skip without a GPU.
The rest runs everywhere: graphs stay off on the CPU and behind their flag, and the end-to-end latency
benchmark runs its smoke configuration.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amphista_engine import cuda_graphs
from amphista_engine.cuda_graphs import DecodeGraphs
from amphista_engine.generation import PlainDecoder
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
from conftest import random_tiny_model
from graph_standin import CPUGraphs

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
N_TOKENS = 200


def decode(decoder, prompts, n_tokens=N_TOKENS, graphs=None):
    """(tokens per row, per-step counts): what generation.run would stream, without a tokenizer."""
    if graphs is not None:
        graphs.attach(decoder)
    with torch.inference_mode():
        rows = [[t] for t in decoder.prefill(prompts).tolist()]
        counts = []
        while min(len(r) for r in rows) < n_tokens:
            out, count = decoder.step()
            n, toks = count.tolist(), out.tolist()
            counts.append(n)
            for b, r in enumerate(rows):
                r += toks[b][:n[b]]
    return [r[:n_tokens] for r in rows], counts


def _setup(device, dtype=torch.bfloat16, batch=2):
    # head_dim 64 (dim 256 / 4 heads), GQA 2: the shapes the CUDA kernels take.
    model = random_tiny_model(seed=3, vocab=512, dim=256, layers=2, heads=4, kv_heads=2, inter=512, max_len=1024)
    model = model.to(device=device, dtype=dtype)
    cache = KVCache.for_model(model.config, batch, 1024, dtype, device)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (37, 90)[:batch]]
    return model, cache, prompts


def _pending(graphs) -> int:
    """Keys seen only once so far (warmed up eagerly, not captured yet): the next run may capture these."""
    return len(set(graphs.warm) - set(graphs.graphs) - set(graphs.uncapturable))


def _first_difference(a, b):
    for r, (x, y) in enumerate(zip(a, b)):
        for i, (p, q) in enumerate(zip(x, y)):
            if p != q:
                return f"row {r}, token {i}: eager {p} vs graph {q}"
    return None


# ---- GPU: replay == eager --------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("routed", [None, "auto", "on", "pdl"], ids=["cublas", "routed-auto", "fused-layers", "pdl"])
def test_plain_graph_replay_equals_eager(routed, monkeypatch, tmp_path):
    """routed: the linears go through the kernel backends. "auto" (the Engine's default on CUDA): each shape
    on the faster of the Triton GEMM and cuBLAS, timed during the first eager step (kernels/linear_choice.py).
    "on" (AMPHISTA_TRITON_LINEAR=1) with fuse_decode_layers: each decode step takes Block.forward_fused (norms,
    activation and residual adds inside the GEMV launches). "pdl": every product on the kernel, unfused, and the
    graphs (not the eager reference) launch every Triton kernel with programmatic dependent launch
    (AMPHISTA_PDL=1, the default on sm_90+): a kernel that read its predecessor's output before that was written would show here."""
    from amphista_engine import timing_cache
    from amphista_engine.kernels import linear_choice
    from amphista_engine.kernels.backend import PDL_ENV
    from amphista_engine.kernels.routed_linear import ENV_VAR, route_linears
    model, cache, prompts = _setup("cuda")
    if routed:
        monkeypatch.setenv(ENV_VAR, "on" if routed == "pdl" else routed)
        monkeypatch.setenv(timing_cache.CACHE_ENV, str(tmp_path))
        linear_choice.clear()
        route_linears(model)
        model.fuse_decode_layers = routed == "on"
    if routed == "pdl":
        monkeypatch.setenv(PDL_ENV, "0")     # the default on sm_90+: the eager reference goes without it
    eager, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts)
    if routed == "auto":           # the first eager forward timed each few-row product's two GEMMs
        assert linear_choice._load() and all(isinstance(v, bool) for v in linear_choice._load().values())
    if routed == "pdl":
        monkeypatch.setenv(PDL_ENV, "1")
    graphs = DecodeGraphs()
    got, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, graphs=graphs)
    assert got == eager, _first_difference(eager, got)
    st = graphs.stats
    # 200 tokens from prompts of 37 / 90 cross the 128 / 256 KV buckets: several graphs, mostly replays.
    assert st.captures >= 2 and st.replays > N_TOKENS * 0.8 and st.failed_captures == 0, st.to_dict()
    # A second generation (a new decoder, new state tensors) reuses the graphs: no new capture.
    captures, pending = st.captures, _pending(graphs)
    again, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, graphs=graphs)
    assert again == eager, _first_difference(eager, again)
    assert graphs.stats.captures <= captures + pending


@needs_gpu
@pytest.mark.parametrize("kind,tree,routed", [("amphista", "mc_sim_7b_63", False), ("medusa", "dynamic-16", False),
                                              ("amphista", "mc_sim_7b_63", True)],
                         ids=["amphista", "medusa", "amphista-routed"])
def test_speculative_graph_replay_equals_eager(kind, tree, routed, monkeypatch, tmp_path):
    """routed: target and heads routed as the Engine does on CUDA; the 64-node verification's products may take
    the Triton GEMM's 16-row blocks where they timed faster (kernels/linear_choice.py)."""
    from amphista_engine import timing_cache
    from amphista_engine.kernels import linear_choice
    from amphista_engine.kernels.routed_linear import route_linears
    model, cache, prompts = _setup("cuda")
    heads = random_heads(kind, model, num_heads=4, seed=2)
    if routed:
        monkeypatch.setenv(timing_cache.CACHE_ENV, str(tmp_path))
        linear_choice.clear()
        route_linears(model)
        route_linears(heads)
    spec = TreeSpec(tree, 4, torch.device("cuda"))

    def make():
        return SpeculativeDecoder(model, cache, heads, spec, SamplingParams())

    eager, eager_counts = decode(make(), prompts)
    graphs = DecodeGraphs()
    got, counts = decode(make(), prompts, graphs=graphs)
    assert got == eager, _first_difference(eager, got)
    assert counts == eager_counts
    assert graphs.stats.captures >= 1 and graphs.stats.replays > 0 and graphs.stats.failed_captures == 0, \
        graphs.stats.to_dict()
    captures, pending = graphs.stats.captures, _pending(graphs)
    again, _ = decode(make(), prompts, graphs=graphs)
    assert again == eager, _first_difference(eager, again)
    assert graphs.stats.captures <= captures + pending


class _Ids:
    """generation.run's tokenizer: no text, the token ids are what these tests compare."""
    def stream_decoder(self, **_):
        class S:
            pending = ""
            def push(self, tok): return ""
            def flush(self): return ""
        return S()


def _run_with_joins(decoder, prompts, limits, graphs=None):
    """Each row's tokens of a run that starts with prompts[0] and takes the others one at a time between steps
    (stream_batch's admit), its decoder through `graphs` where given."""
    from amphista_engine.generation import GenerationStats, run
    if graphs is not None:
        graphs.attach(decoder)
    queue = list(zip(prompts[1:], limits[1:]))

    def admit(free):
        taken = queue[:1] if free else []
        del queue[:len(taken)]
        return taken
    if hasattr(decoder, "admits"):
        decoder.admits = True
    with torch.inference_mode():
        list(run(decoder, prompts[:1], _Ids(), limits[:1], [], [], [GenerationStats()], admit=admit))
    assert not queue
    return [r.ids for r in decoder.rows]


@needs_gpu
@pytest.mark.parametrize("kind", [None, "amphista"])
def test_joined_rows_under_graphs_equal_eager(kind):
    """Continuous batching through captured graphs: a joining prompt takes an ended row's slot (the captured state
    tensors updated in place) or grows the batch (a new key); every row's tokens equal the eager run's."""
    model, cache, _ = _setup("cuda", batch=3)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (37, 5, 90, 12, 60)]
    limits = [60, 12, 40, 25, 30]
    heads = None if kind is None else random_heads(kind, model, num_heads=4, seed=2)
    spec = None if kind is None else TreeSpec("tree-32", 4, torch.device("cuda"))

    def make():
        return PlainDecoder(model, cache, SamplingParams()) if kind is None else \
            SpeculativeDecoder(model, cache, heads, spec, SamplingParams())
    eager = _run_with_joins(make(), prompts, limits)
    graphs = DecodeGraphs()
    got = _run_with_joins(make(), prompts, limits, graphs)
    assert got == eager, _first_difference(eager, got)
    assert [len(r) for r in got] == limits
    assert graphs.stats.replays > 0 and graphs.stats.failed_captures == 0, graphs.stats.to_dict()


@needs_gpu
def test_speculative_greedy_equals_plain_under_graphs():
    """Lossless: greedy speculative decoding through graphs emits plain greedy decoding's tokens (fp32, so
    the batched tree forward and single-token steps cannot flip a near-tie)."""
    model, cache, prompts = _setup("cuda", dtype=torch.float32, batch=1)
    graphs = DecodeGraphs()
    plain, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 120, graphs=graphs)
    heads = random_heads("amphista", model, num_heads=4, seed=2)
    spec, _ = decode(SpeculativeDecoder(model, cache, heads, TreeSpec("tree-32", 4, torch.device("cuda")),
                                        SamplingParams()), prompts, 120, graphs=graphs)
    assert spec == plain, _first_difference(plain, spec)


@needs_gpu
def test_speculative_penalties_equal_plain_under_graphs():
    """Repetition, presence and frequency penalties per tree node (sampling.tree_penalties: a bmm, gathers and
    scatters inside the captured step; seen / counts copied in as state): greedy through graphs, with rows of
    other lengths, emits plain greedy decoding's tokens under the same penalties (fp32, as the test above)."""
    model, cache, prompts = _setup("cuda", dtype=torch.float32, batch=2)
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.6)
    graphs = DecodeGraphs()
    plain, _ = decode(PlainDecoder(model, cache, params), prompts, 80, graphs=graphs)
    heads = random_heads("amphista", model, num_heads=4, seed=2)
    for tree in ("tree-32", "dynamic-16"):
        spec, _ = decode(SpeculativeDecoder(model, cache, heads, TreeSpec(tree, 4, torch.device("cuda")), params),
                         prompts, 80, graphs=graphs)
        assert spec == plain, (tree, _first_difference(plain, spec))
    assert graphs.stats.replays > 0 and graphs.stats.failed_captures == 0, graphs.stats.to_dict()


@needs_gpu
def test_bans_equal_eager_and_plain_under_graphs():
    """allowed_token_ids and bad words of one and two tokens (a bias row, the words and each row's latest tokens as
    state the graphs copy in; tree nodes checked against their own paths inside the captured step): plain decoding
    through graphs emits eager plain decoding's tokens, and speculative greedy decoding through graphs the same."""
    model, cache, prompts = _setup("cuda", dtype=torch.float32, batch=2)
    eager, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 60)
    row = eager[0]
    params = SamplingParams(allowed_token_ids=[t for t in range(512) if t != row[3]], bad_words_ids=[[row[1]],
                                                                                                   row[5:7]])
    want, _ = decode(PlainDecoder(model, cache, params), prompts, 60)
    assert want != eager
    graphs = DecodeGraphs()
    got, _ = decode(PlainDecoder(model, cache, params), prompts, 60, graphs=graphs)
    assert got == want, _first_difference(want, got)
    heads = random_heads("amphista", model, num_heads=4, seed=2)
    for tree in ("tree-32", "dynamic-16"):
        spec, _ = decode(SpeculativeDecoder(model, cache, heads, TreeSpec(tree, 4, torch.device("cuda")), params),
                         prompts, 60, graphs=graphs)
        assert spec == want, (tree, _first_difference(want, spec))
    assert graphs.stats.replays > 0 and graphs.stats.failed_captures == 0, graphs.stats.to_dict()


@needs_gpu
@pytest.mark.parametrize("kind", ["plain", "amphista"])       # two tests: 68 s as one on an H100, a suite's tail
def test_merge_in_kernel_decodes_like_two_launch_merge(kind):
    """Tree attention's merge="kernel" (kernels/triton_kernels/tree_attention.py: the last split merges, with
    arrival counters that every graph replay must find re-armed) emits the same tokens as the two-launch
    merge, eager and replayed, plain and speculative (fp32: no near-tie can flip)."""
    from amphista_engine.kernels import use_backend
    from amphista_engine.kernels.split_merge import merge_mode
    model, cache, prompts = _setup("cuda", dtype=torch.float32)
    heads = random_heads("amphista", model, num_heads=4, seed=2)
    spec = TreeSpec("mc_sim_7b_63", 4, torch.device("cuda"))
    outs = {}
    with use_backend("triton"):
        for mode in ("launch", "kernel"):
            with merge_mode(mode):
                graphs = DecodeGraphs()
                make = (lambda: PlainDecoder(model, cache, SamplingParams())) if kind == "plain" else \
                    (lambda: SpeculativeDecoder(model, cache, heads, spec, SamplingParams()))
                outs[mode, "eager"] = decode(make(), prompts)[0]
                outs[mode, "graphs"] = decode(make(), prompts, graphs=graphs)[0]
                assert graphs.stats.failed_captures == 0, graphs.stats.to_dict()
    for key, got in outs.items():
        want = outs["launch", "eager"]
        assert got == want, (key, _first_difference(want, got))


@needs_gpu
@pytest.mark.parametrize("tree", ["tree-32", "mc_sim_7b_63"])
def test_bf16_greedy_equals_plain_with_exact_greedy(tree, monkeypatch):
    """AMPHISTA_EXACT_GREEDY=1 (kernels/gpu_exact.py): in bf16, where the default path lets a near-tie part
    the decoders, greedy speculative decoding through graphs emits plain greedy decoding's tokens exactly."""
    from amphista_engine.kernels import gpu_exact
    from amphista_engine.kernels.routed_linear import route_linears
    monkeypatch.setenv(gpu_exact.ENV_VAR, "1")
    model, cache, prompts = _setup("cuda", dtype=torch.bfloat16)
    route_linears(model)
    assert model.invariant_decode(cache)
    graphs = DecodeGraphs()
    plain, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 160, graphs=graphs)
    heads = random_heads("amphista", model, num_heads=4, seed=2)
    spec, _ = decode(SpeculativeDecoder(model, cache, heads, TreeSpec(tree, 4, torch.device("cuda")),
                                        SamplingParams()), prompts, 160, graphs=graphs)
    assert spec == plain, _first_difference(plain, spec)


@needs_gpu
def test_sampling_through_graphs_runs():
    """Seeded sampling is captured with its generator registered (or runs eagerly without that API); the
    tokens are valid and the default (unseeded) generator works too."""
    model, cache, prompts = _setup("cuda")
    for seed, min_p in ((7, 0.0), (None, 0.0), (5, 0.05)):
        graphs = DecodeGraphs()
        params = SamplingParams(temperature=0.8, top_p=0.9, seed=seed, min_p=min_p)
        toks, _ = decode(PlainDecoder(model, cache, params), prompts, 60, graphs=graphs)
        assert all(0 <= t < 512 for r in toks for t in r)
        assert graphs.stats.captures + graphs.stats.failed_captures >= 1
        heads = random_heads("amphista", model, num_heads=4, seed=2)
        dec = SpeculativeDecoder(model, cache, heads, TreeSpec("tree-16", 4, torch.device("cuda")), params)
        toks, _ = decode(dec, prompts, 60, graphs=graphs)
        assert all(0 <= t < 512 for r in toks for t in r)


@needs_gpu
def test_seeded_sampling_through_graphs_repeats():
    """The seed's promise (the same seed, the same answer) under graphs: a run on fresh graphs and a second run on
    the captured ones draw the same tokens, plain and speculative (unrun on a GPU when written, 2026-12-07)."""
    model, cache, prompts = _setup("cuda")
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    heads = random_heads("amphista", model, num_heads=4, seed=2)
    for make in (lambda: PlainDecoder(model, cache, params),
                 lambda: SpeculativeDecoder(model, cache, heads, TreeSpec("tree-16", 4, torch.device("cuda")), params)):
        graphs = DecodeGraphs()
        first, _ = decode(make(), prompts, 60, graphs=graphs)
        again, _ = decode(make(), prompts, 60, graphs=graphs)
        assert first == again


@needs_gpu
def test_graphs_recapture_when_the_cache_moves():
    model, cache, prompts = _setup("cuda")
    graphs = DecodeGraphs()
    ref, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 40, graphs=graphs)
    cache2 = KVCache.for_model(model.config, 2, 1024, torch.bfloat16, "cuda")   # what Engine does on growth
    got, _ = decode(PlainDecoder(model, cache2, SamplingParams()), prompts, 40, graphs=graphs)
    assert got == ref and graphs.stats.dropped >= 1


# ---- everywhere: the bookkeeping, with a CPU stand-in for CUDA graphs (graph_standin.py) ---------------------
def _strict(graphs):
    """No module tensor built or rebound during a capture (graph_standin.py records them)."""
    assert not graphs.built_in_capture, graphs.built_in_capture


@pytest.mark.parametrize("kind,tree", [(None, None), ("amphista", "mc_sim_7b_63"), ("medusa", "dynamic-16")])
def test_graph_bookkeeping_on_cpu(kind, tree, one_thread):
    """Keys, warm-up, capture, state moved into the captured tensors for a new decoder, `last_count`
    re-pointed after each replay, recapture when the cache moves: the same tokens as eager decoding."""
    model, cache, prompts = _setup("cpu", dtype=torch.float32)
    heads = None if kind is None else random_heads(kind, model, num_heads=4, seed=2)
    spec = None if kind is None else TreeSpec(tree, 4, torch.device("cpu"))

    def make(c=cache):
        if kind is None:
            return PlainDecoder(model, c, SamplingParams())
        return SpeculativeDecoder(model, c, heads, spec, SamplingParams())

    n = 40
    eager, eager_counts = decode(make(), prompts, n)
    graphs = CPUGraphs()
    got, counts = decode(make(), prompts, n, graphs=graphs)
    assert got == eager and counts == eager_counts, _first_difference(eager, got)
    st = graphs.stats
    assert st.captures >= 1 and st.replays >= 1 and st.failed_captures == 0, st.to_dict()
    captures, pending = st.captures, _pending(graphs)
    again, _ = decode(make(), prompts, n, graphs=graphs)                 # new decoder, same graphs
    assert again == eager, _first_difference(eager, again)
    assert graphs.stats.captures <= captures + pending
    cache2 = KVCache.for_model(model.config, 2, 1024, torch.float32, "cpu")
    moved, _ = decode(make(cache2), prompts, n, graphs=graphs)          # the engine reallocated its cache
    assert moved == eager and graphs.stats.dropped >= 1
    _strict(graphs)


def test_a_backend_picked_between_runs_gets_graphs_of_its_own(one_thread):
    """A graph replays the kernels its capture recorded: a run under another backend (a use_backend block, or
    set_backend, between runs) or another kernel mode (AMPHISTA_TREE_MERGE's block here) must capture its own, not
    replay the first one's."""
    from amphista_engine.kernels import cpu_available, use_backend
    if not cpu_available():
        pytest.skip("needs the CPU extension: a second backend")
    model, cache, prompts = _setup("cpu", dtype=torch.float32)
    graphs = CPUGraphs()
    with use_backend("torch"):
        first, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 6, graphs=graphs)
    keys = set(graphs.graphs)
    with use_backend("cpu"):
        second, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 6, graphs=graphs)
    assert keys and set(graphs.graphs) - keys, "the cpu backend's run replayed the torch backend's graphs"
    assert {k[-1][0] for k in graphs.graphs} == {"torch", "cpu"}
    keys = set(graphs.graphs)
    from amphista_engine.kernels import split_merge
    with split_merge.merge_mode("launch" if split_merge.default_merge() != "launch" else "kernel"):
        decode(PlainDecoder(model, cache, SamplingParams()), prompts, 6, graphs=graphs)
    assert set(graphs.graphs) - keys, "a run under another merge mode replayed the first one's graphs"
    _strict(graphs)


def test_uncapturable_step_falls_back_to_eager(recwarn):
    model, cache, prompts = _setup("cpu", dtype=torch.float32, batch=1)

    class Failing(CPUGraphs):
        def _record(self, decoder, eager, kv_len):
            raise RuntimeError("operation not permitted when stream is capturing")

    eager, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 30)
    graphs = Failing()
    got, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 30, graphs=graphs)
    assert got == eager
    assert graphs.stats.failed_captures >= 1 and graphs.stats.replays == 0 and graphs.uncapturable
    assert any("CUDA graph capture failed" in str(w.message) for w in recwarn.list)


# ---- everywhere: the flag and the CPU ----------------------------------------------------------------------
def test_graphs_off_on_cpu_and_behind_the_flag(monkeypatch):
    model, cache, prompts = _setup("cpu", dtype=torch.float32, batch=1)
    eager, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 12)
    graphs = DecodeGraphs()
    dec = graphs.attach(PlainDecoder(model, cache, SamplingParams()))
    assert "step_device" not in vars(dec)                   # CPU decoder: untouched
    got, _ = decode(dec, prompts, 12)
    assert got == eager and graphs.stats.captures == graphs.stats.replays == 0
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "0")
    assert not DecodeGraphs().enabled and not DecodeGraphs(enabled=True).enabled
    monkeypatch.setenv(cuda_graphs.ENV_VAR, "1")
    assert DecodeGraphs().enabled and not DecodeGraphs(enabled=False).enabled


def test_graph_keys_separate_what_changes_the_kernels():
    model, cache, prompts = _setup("cpu", dtype=torch.float32, batch=1)
    greedy = PlainDecoder(model, cache, SamplingParams(seed=3))
    sampled = PlainDecoder(model, cache, SamplingParams(temperature=0.7, seed=3))
    for d in (greedy, sampled):
        with torch.inference_mode():
            d.prefill(prompts)
    k = DecodeGraphs.key
    assert k(greedy, 128) != k(greedy, 256)                 # KV bucket
    assert k(greedy, 128) != k(sampled, 128)                # sampling mode
    min_p = PlainDecoder(model, cache, SamplingParams(temperature=0.7, seed=3, min_p=0.1))
    with torch.inference_mode():
        min_p.prefill(prompts)
    assert k(min_p, 128) != k(sampled, 128)                 # min_p's cut is baked into the captured kernels
    other = PlainDecoder(model, cache, SamplingParams(seed=9))
    with torch.inference_mode():
        other.prefill(prompts)
    assert k(greedy, 128) == k(other, 128)                  # greedy graphs are shared whatever the seed
    fp = DecodeGraphs.fingerprint(greedy)
    assert fp == DecodeGraphs.fingerprint(other)            # same cache buffers
    cache2 = KVCache.for_model(model.config, 1, 1024, torch.float32, "cpu")
    moved = PlainDecoder(model, cache2, SamplingParams())
    assert DecodeGraphs.fingerprint(moved) != fp


def test_latency_benchmark_smoke_on_cpu(tmp_path):
    """The end-to-end benchmark's code path (random models built on the meta device, heads built on the
    device, plain / Medusa / Amphista steps, the report) runs in seconds on the CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("AMPHISTA_BACKEND",)}
    r = subprocess.run([sys.executable, "benchmarks/latency_gpu.py", "--smoke", "--device", "cpu", "--dtype", "float32",
                        "--out", str(tmp_path), "--draft-vocab", "128"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "latency.json").read_text())
    methods = {(row["method"], row["tree"]) for row in res["rows"]}
    assert {("plain", "-"), ("medusa", "tree-16"), ("amphista", "tree-16"), ("amphista", "dynamic-16"),
            ("amphista V'=128", "tree-16"), ("plain, routed (default)", "-"), ("plain, triton linear", "-"),
            ("plain, triton linear unfused", "-"), ("plain, triton linear unfused, pdl", "-")} <= methods
    assert all(row["step_ms"] > 0 for row in res["rows"])
    assert {"commit", "date", "torch", "device"} <= set(res["meta"])
    assert (tmp_path / "latency.md").read_text().startswith("# Decode-step latency")



def test_latency_mode_rows_on_cpu():
    """latency_gpu.mode_rows, the A/B rows of the opt-in GPU modes (exact greedy, merge in kernel), runs its
    plain and 64-node Amphista steps inside the mode's context on the CPU too (graphs are off there)."""
    import contextlib
    import importlib.util
    spec = importlib.util.spec_from_file_location("latency_gpu", ROOT / "benchmarks" / "latency_gpu.py")
    lat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lat)
    model = lat.random_model(lat.SMOKE, torch.device("cpu"), torch.float32, 512)
    cache = KVCache.for_model(model.config, 1, 512, torch.float32, torch.device("cpu"))
    entered = []

    @contextlib.contextmanager
    def mode():
        entered.append(True)
        yield

    rows = lat.mode_rows("test mode", mode, model, cache, ["tree-16", "mc_sim_7b_63"], list(range(1, 20)), 2,
                         plain_ms=1.0, floor_ms=0.5, shape_name="smoke")
    assert entered == [True]
    assert [(r["method"], r["tree"], r["nodes"]) for r in rows] == [("plain, test mode", "-", 1),
                                                                     ("amphista, test mode", "mc_sim_7b_63", 64)]
    assert all(r["step_ms"] > 0 and r["ratio_vs_plain"] == round(r["step_ms"], 3) for r in rows)
    assert rows[0]["pct_of_bw_floor"] is not None and rows[1]["pct_of_bw_floor"] is None


def test_graphs_keep_penalties_and_biases_apart(one_thread):
    """Greedy steps with a repetition/presence/frequency penalty or a logit_bias replay their own graphs: greedy keys
    once ignored repetition_penalty, so a greedy run with penalty 1.5 replayed the graph captured without one. One
    DecodeGraphs runs them in turn (bias values differ only in the copied-in state tensor), each as eager does."""
    model = random_tiny_model(seed=11)          # greedy falls into repeating a token: every penalty shows
    cache = KVCache.for_model(model.config, 2, 256, torch.float32, "cpu")
    prompts = [[5, 9, 2, 33, 17], [60, 61, 62, 63, 1, 2, 3]]
    graphs = CPUGraphs()
    cases = [SamplingParams(), SamplingParams(repetition_penalty=1.5), SamplingParams(repetition_penalty=2.5),
             SamplingParams(presence_penalty=3.0), SamplingParams(frequency_penalty=2.0),
             SamplingParams(logit_bias={25: -100}), SamplingParams(logit_bias={11: 6.0}),
             SamplingParams(temperature=0.8, seed=4, logit_bias={11: 6.0}, frequency_penalty=1.0)]
    greedy, _ = decode(PlainDecoder(model, cache, SamplingParams()), prompts, 24)
    row = greedy[0]
    # a bias row from allowed_token_ids or a one-token bad word alone (once keyed as "no bias"), and bad words of two
    # tokens (state of one shape; other words replay the same graph with their own), each banning what greedy said
    cases += [SamplingParams(allowed_token_ids=[t for t in range(64) if t != row[1]]),
              SamplingParams(bad_words_ids=[[row[2]]]), SamplingParams(bad_words_ids=[row[3:5]]),
              SamplingParams(bad_words_ids=[row[-2:]])]
    answers = []
    for params in cases:
        eager, _ = decode(PlainDecoder(model, cache, params), prompts, 24)
        for _ in range(2):                 # the second run replays what the first captured
            got, _ = decode(PlainDecoder(model, cache, params), prompts, 24, graphs=graphs)
            assert got == eager, (params, _first_difference(eager, got))
        answers.append(eager)
    assert len({str(a) for a in answers}) == len(cases)       # each option changed the answer
    assert graphs.stats.replays > 0
    _strict(graphs)


def test_graphs_hold_back_ending_tokens_for_min_tokens(one_thread):
    """min_tokens through the graph bookkeeping: `produced` and the held-back ids are state tensors, min_tokens and
    how many ids are in the key; runs with other ids of the same count replay the same graph with their own ids."""
    model = random_tiny_model(seed=11)
    cache = KVCache.for_model(model.config, 2, 256, torch.float32, "cpu")
    prompts = [[5, 9, 2, 33, 17], [60, 61, 62, 63, 1, 2, 3]]
    graphs = CPUGraphs()
    params = SamplingParams(logit_bias={26: 30.0, 32: 30.0})

    def make(ban, n):
        dec = PlainDecoder(model, cache, params)
        dec.min_tokens, dec.ban_ids = n, torch.tensor(ban)
        return dec
    for ban, n in (([26], 6), ([32], 6), ([26], 9), ([32], 6)):
        eager, _ = decode(make(ban, n), prompts, 20)
        got, _ = decode(make(ban, n), prompts, 20, graphs=graphs)
        assert got == eager, (ban, n, _first_difference(eager, got))
        assert all(ban[0] not in row[:n] for row in got)
    assert graphs.stats.replays > 0
    _strict(graphs)

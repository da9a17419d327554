"""Qwen2 (q/k/v biases) and Qwen3 (q/k norms) targets on a GPU: the routed products add their bias after the product,
the q/k norms run through the backend's RMSNorm on per-head views, and both are captured in the CUDA graphs. Their CPU
checks are test_model_families.py; these run wherever CUDA is (benchmarks/gpu_suite.sh picks up test_cuda_*)."""
import pytest
import torch

from amphista_engine import Engine
from amphista_engine.heads import random_heads
from conftest import TINY_HF
from test_model_families import write_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, write_model(path, request.param)


def test_fp32_logits_match_transformers_on_the_gpu(tiny):
    kind, path, hf = tiny
    hf = hf.cuda()
    engine = Engine.from_pretrained(str(path), device="cuda", dtype="fp32", max_seq_len=256)
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 29), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ours, ref = engine.model(ids, torch.arange(29, device="cuda")[None]).float(), hf(ids).logits.float()
    assert float((ours - ref).norm() / ref.norm()) < 1e-3, kind     # TF32 may be on in either


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graphs_equal_eager_and_speculative_greedy_equals_plain(tiny, dtype):
    kind, path, _ = tiny
    out = {}
    for graphs in (True, False):
        engine = Engine.from_pretrained(str(path), device="cuda", dtype=dtype, max_seq_len=512, cuda_graphs=graphs)
        engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
        for method in ("none", "amphista"):
            out[graphs, method] = engine.generate("The quick brown fox", max_new_tokens=200, chat=False,
                                                  speculative=method, tree="dynamic-8" if method != "none" else None
                                                  ).token_ids
    assert out[True, "none"] == out[False, "none"], (kind, dtype, "plain: graphs vs eager")
    assert out[True, "amphista"] == out[False, "amphista"], (kind, dtype, "amphista: graphs vs eager")
    if dtype == "fp32":        # bf16 speculative equals plain only under AMPHISTA_EXACT_GREEDY=1 (kernels/gpu_exact.py)
        a, b = out[True, "amphista"], out[True, "none"]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        assert first is None, f"{kind}: speculative and plain differ first at token {first}: {a[first]} vs {b[first]}"

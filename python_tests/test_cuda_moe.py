"""Qwen3-MoE and Mixtral targets on a GPU (new 2026-12-06, CPU-checked in test_moe.py): MoEFeedForward's gathered
decode path and dense prefill path on CUDA, captured in the decode graphs (static shapes, no host sync by design,
never run on a GPU before). These run wherever CUDA is (benchmarks/gpu_suite.sh picks up test_cuda_*)."""
import pytest
import torch

from amphista_engine import Engine
from model_helpers import cuda_logits, graphs_and_eager_answers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request, tmp_path_factory):
    from test_moe import write_hf
    return write_hf(tmp_path_factory.mktemp(request.param) / "m", request.param)


def test_moe_fp32_logits_match_transformers_on_the_gpu(moe):
    from test_moe import IDS, hf_model
    hf = hf_model(moe).cuda()
    engine = Engine.from_pretrained(str(moe), device="cuda", dtype="fp32", max_seq_len=256)
    for n in (40, 100):                 # under and over MOE_GATHER_ROWS: both MoE paths
        ours, ref = cuda_logits(engine, hf, IDS[:n])
        assert float((ours - ref).norm() / ref.norm()) < 1e-3, n     # TF32 may be on in either


def test_moe_graphs_equal_eager_and_speculative_equals_plain(moe):
    from test_moe import IDS
    out = graphs_and_eager_answers(moe, IDS[:20])
    assert out[True, "none"] == out[False, "none"], "plain: graphs vs eager"
    assert out[True, "amphista"] == out[False, "amphista"], "amphista: graphs vs eager"
    assert out[True, "amphista"] == out[True, "none"], "fp32 speculative vs plain"

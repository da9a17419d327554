"""Gemma 3 targets and structured output on a GPU (both new 2026-12-06, CPU-checked in test_gemma3.py and
test_structured_output.py): Gemma's sliding layers past the window take SDPA with a dense windowed mask, its full
layers the kernels' tree attention, and the graphs capture both; a constrained run decodes eagerly with host masks
copied to the device each step. These run wherever CUDA is (benchmarks/gpu_suite.sh picks up test_cuda_*)."""
import re

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.heads import random_heads
from model_helpers import cuda_logits, graphs_and_eager_answers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    from test_gemma3 import WINDOWED, write_gemma3
    return write_gemma3(tmp_path_factory.mktemp("gemma3") / "w", **WINDOWED)


def test_gemma3_fp32_logits_past_the_window_match_transformers(windowed):
    from test_gemma3 import IDS
    hf = transformers.Gemma3ForCausalLM.from_pretrained(windowed, dtype=torch.float32).cuda().eval()
    engine = Engine.from_pretrained(str(windowed), device="cuda", dtype="fp32", max_seq_len=256)
    ours, ref = cuda_logits(engine, hf, IDS[:40])
    assert float((ours - ref).norm() / ref.norm()) < 1e-3       # TF32 may be on in either


def test_gemma3_graphs_equal_eager_and_speculative_equals_plain(windowed):
    from test_gemma3 import IDS
    out = graphs_and_eager_answers(windowed, IDS[:30])
    assert out[True, "none"] == out[False, "none"], "plain: graphs vs eager"
    assert out[True, "amphista"] == out[False, "amphista"], "amphista: graphs vs eager"
    assert out[True, "amphista"] == out[True, "none"], "fp32 speculative vs plain"


def test_structured_output_on_the_gpu(tiny_hf_dir):
    pytest.importorskip("llguidance")
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cuda", dtype="fp32", max_seq_len=256)
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
    rf = {"type": "regex", "regex": r"[a-e]{2,4}-[0-9]{2}\."}
    plain = engine.generate("The quick brown fox", max_new_tokens=16, response_format=rf, speculative="none")
    spec = engine.generate("The quick brown fox", max_new_tokens=16, response_format=rf, speculative="amphista",
                           tree="dynamic-8")
    assert re.fullmatch(rf["regex"], plain.text) and plain.finish_reason == "eos", plain.text
    assert spec.token_ids == plain.token_ids
    # a graphed run after a constrained one (which detached its decoder from the graphs) still replays graphs
    free = engine.generate("The quick brown fox", max_new_tokens=16, speculative="none")
    again = engine.generate("The quick brown fox", max_new_tokens=16, speculative="none")
    assert free.token_ids == again.token_ids
    for seed in range(3):
        r = engine.generate("The quick brown fox", max_new_tokens=16, response_format=rf, temperature=1.0,
                            seed=seed, speculative="amphista", tree="dynamic-8")
        assert re.fullmatch(rf["regex"], r.text), (seed, r.text)

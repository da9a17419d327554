"""Token logprobs under real CUDA graphs (their CPU checks, through a stand-in for graphs, are test_logprobs.py): a
step that computes them is a graph key of its own and rebinds step_logprobs, which a replay re-points. Runs wherever
CUDA is (benchmarks/gpu_suite.sh picks up test_cuda_*)."""
import pytest
import torch

from amphista_engine import Engine
from amphista_engine.heads import random_heads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_logprobs_through_graphs_equal_eager(tiny_hf_dir, speculative):
    out = {}
    for graphs in (False, True):
        engine = Engine.from_pretrained(str(tiny_hf_dir), device="cuda", dtype="fp32", max_seq_len=512,
                                        cuda_graphs=graphs, max_batch_size=2)
        engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
        # a run without logprobs first: its graphs must not serve the run that asks for them
        engine.generate_batch(["The quick brown fox", "def f(x):"], 40, chat=False, speculative=speculative)
        out[graphs] = engine.generate_batch(["The quick brown fox", "def f(x):"], 120, chat=False,
                                            speculative=speculative, logprobs=True)
    for eager, graphed in zip(out[False], out[True]):
        assert graphed.token_ids == eager.token_ids
        assert len(graphed.token_logprobs) == len(graphed.token_ids)
        assert max(abs(a - b) for a, b in zip(graphed.token_logprobs, eager.token_logprobs)) < 1e-4

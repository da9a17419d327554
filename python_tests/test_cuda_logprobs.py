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


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_top_logprobs_through_graphs_equal_eager(tiny_hf_dir, speculative):
    """top_logprobs=N: N is part of the graph key and the step's top tensors are rebound, re-pointed after a replay;
    a run with another N first, on the same graphs, must not serve this one."""
    out = {}
    prompts = ["The quick brown fox", "def f(x):"]
    for graphs in (False, True):
        engine = Engine.from_pretrained(str(tiny_hf_dir), device="cuda", dtype="fp32", max_seq_len=512,
                                        cuda_graphs=graphs, max_batch_size=2)
        engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
        engine.generate_batch(prompts, 40, chat=False, speculative=speculative, logprobs=True, top_logprobs=2)
        out[graphs] = engine.generate_batch(prompts, 120, chat=False, speculative=speculative, logprobs=True,
                                            top_logprobs=5)
        if graphs:
            assert engine.graphs.stats.replays > 0, engine.graphs.stats.to_dict()
    for eager, graphed in zip(out[False], out[True]):
        assert graphed.token_ids == eager.token_ids
        assert len(graphed.top_logprobs) == len(graphed.token_ids)
        for got, want in zip(graphed.top_logprobs, eager.top_logprobs):
            assert len(got) == 5 and [t for t, _ in got] == [t for t, _ in want]
            assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-4

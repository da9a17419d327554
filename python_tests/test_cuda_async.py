"""The asyncio API on a GPU (its CPU checks are test_async_api.py): each async call runs its sync run in a worker
thread of its own, so CUDA graphs captured in one worker are replayed from another, on that thread's current stream.
Runs wherever CUDA is (benchmarks/gpu_suite.sh picks up test_cuda_*)."""
import asyncio

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.heads import random_heads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_async_runs_replay_graphs_captured_in_another_thread(tiny_hf_dir, speculative):
    prompts = ["The quick brown fox", "def f(x):"]
    eager = Engine.from_pretrained(str(tiny_hf_dir), device="cuda", dtype="fp32", max_seq_len=512,
                                   cuda_graphs=False, max_batch_size=2)
    eager.load_heads(random_heads("amphista", eager.model, num_heads=3, seed=1))
    want = eager.generate_batch(prompts, 120, chat=False, speculative=speculative)
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cuda", dtype="fp32", max_seq_len=512,
                                    cuda_graphs=True, max_batch_size=2)
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))

    async def twice():
        first = await engine.agenerate_batch(prompts, 120, chat=False, speculative=speculative)    # captures
        chunks = [item async for item in engine.astream_batch(prompts, 120, chat=False, speculative=speculative)]
        return first, chunks, engine.last_results

    first, chunks, second = asyncio.run(twice())
    assert engine.graphs.stats.replays > 0, engine.graphs.stats.to_dict()
    for got in (first, second):
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert ["".join(d for b, d in chunks if b == row) for row in range(2)] == [r.text for r in want]

"""The committed self-distillation shards (benchmarks/results/training_smollm2/distill/): every record usable,
ids unique across shards, and no MT-Bench question among the prompts (training on evaluation data is banned)."""
from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import pytest

from amphista_engine.training.data import load_shard

ROOT = Path(__file__).resolve().parents[1]
DISTILL = ROOT / "benchmarks/results/training_smollm2/distill"
SHARDS = sorted(DISTILL.glob("*.jsonl.gz"))
MT_BENCH = ROOT.parent / "shared/data/mt_bench.jsonl"
VOCAB = json.loads((ROOT / "amphista_engine/data/heads/smollm2-135m-amphista/config.json").read_text())["vocab_size"]


@functools.cache
def _records() -> tuple:
    """Every shard decompressed and parsed once for the module's tests (none of them changes a record)."""
    out = []
    for path in SHARDS:
        with gzip.open(path, "rt") as f:
            for line in f:
                out.append((path.name, json.loads(line)))
    return tuple(out)


def records():
    yield from _records()


def test_committed_shards_load_whole():
    assert SHARDS, f"no committed shards in {DISTILL}"
    data = load_shard(SHARDS, VOCAB, max_len=1 << 16)
    n = sum(1 for _ in records())
    # no malformed, duplicated or out-of-vocabulary record; an answer of < 2 tokens is the target's own (skipped)
    short = data.skipped.pop("empty prompt or answer", 0)
    assert not data.skipped, dict(data.skipped)
    assert short <= n // 100 and len(data.sequences) == n - short and data.num_tokens > 100 * n
    ends = {r["finish_reason"] for _, r in records()}
    assert ends <= {"eos", "length"} and "length" in ends


def test_committed_prompts_are_not_mt_bench_questions():
    if not MT_BENCH.is_file():
        pytest.skip(f"{MT_BENCH} is not on this machine")
    questions = {" ".join(t.split()) for line in MT_BENCH.read_text().splitlines() if line.strip()
                 for t in json.loads(line)["turns"]}
    assert len(questions) >= 80
    prompts = ((name, r["id"], " ".join(r["prompt"].split())) for name, r in records())
    leaked = [(name, rid) for name, rid, prompt in prompts if any(q in prompt for q in questions)]  # anywhere in one
    assert not leaked, leaked[:5]


def test_packaged_eval_keys_cover_mt_bench():
    """distill and train refuse MT-Bench questions by the keys packaged in amphista_engine/data: they must be
    those of every turn of the evaluation file."""
    from amphista_engine.training.data import _eval_keys, eval_prompt_key
    if not MT_BENCH.is_file():
        pytest.skip(f"{MT_BENCH} is not on this machine")
    turns = [t for line in MT_BENCH.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"]]
    assert {eval_prompt_key(t) for t in turns} == _eval_keys() and len(turns) == 160

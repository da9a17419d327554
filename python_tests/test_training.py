"""Training: distillation shard I/O, head training on a tiny random target, checkpoints, resume, bad data."""
from __future__ import annotations

import json

import pytest
import torch

from amphista_engine.errors import ConfigError, InputError
from amphista_engine.heads import load_heads, new_heads
from amphista_engine.training.data import ShardWriter, load_shard, read_prompts
from amphista_engine.training.plan import BatchPlan, epoch_batches
from amphista_engine.training.trainer import TrainConfig, head_features, train_heads

from conftest import greedy_records, needs_smollm2

K = 3


# target: conftest's tiny model; this module's shard holds longer answers than conftest's
@pytest.fixture(scope="module")
def shard(tmp_path_factory, target):
    path = tmp_path_factory.mktemp("shard") / "tiny.jsonl"
    with ShardWriter(path) as w:
        for r in greedy_records(target):
            w.write(r)
    return path


def cfg(shard, out, **kw):
    base = dict(data=[str(shard)], out=str(out), kind="amphista", num_heads=K, steps=12, batch_tokens=340,
                lr=3e-3, eval_frac=0.2, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def greedy_tokens(target, prompt, n, heads=None, tree=None):
    """n greedy tokens from plain decoding, or from speculative decoding with `heads` over `tree`."""
    from amphista_engine.generation import PlainDecoder
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.sampling import SamplingParams
    from amphista_engine.speculative import SpeculativeDecoder, TreeSpec
    cache = KVCache.for_model(target.config, 1, 256, torch.float32, "cpu")
    if heads is None:
        dec = PlainDecoder(target, cache, SamplingParams())
    else:
        dec = SpeculativeDecoder(target, cache, heads, TreeSpec(tree, heads.num_heads, "cpu"), SamplingParams())
    out = [int(dec.prefill([prompt])[0])]
    while len(out) < n:
        toks, cnt = dec.step()
        out += toks[0, :int(cnt[0])].tolist()
    return out[:n]


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_features_match_forward_train(target, kind):
    heads = new_heads(kind, target, num_heads=K, dtype=torch.float32)
    torch.nn.init.normal_(heads.res.weight, std=0.1)
    hidden, nxt = torch.randn(2, 9, 32), torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(heads.logits(head_features(heads, hidden, nxt)), heads.forward_train(hidden, nxt),
                               rtol=0, atol=0)
    rows = torch.tensor([[0, 3], [1, 8], [1, 0]])
    torch.testing.assert_close(heads.logits(head_features(heads, hidden, nxt, rows)),
                               heads.forward_train(hidden, nxt)[rows[:, 0], rows[:, 1]], rtol=1e-5, atol=1e-5)


def test_medusa_features_are_contiguous(target):
    """Medusa's batched ResBlocks compute K-outermost; handed on strided, their [N, K, d] features made F.linear fall
    back to a bmm against the LM head copied per row (~15x slower training steps with KL at every position). They
    must come out contiguous and equal to the row-by-row computation."""
    heads = new_heads("medusa", target, num_heads=K, dtype=torch.float32)
    torch.nn.init.normal_(heads.res.weight, std=0.1)
    hidden, nxt = torch.randn(2, 12, 32), torch.randint(0, 64, (2, 12))
    rows = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(6), indexing="ij"), -1).reshape(-1, 2)
    feats = head_features(heads, hidden, nxt, rows)
    assert feats.is_contiguous()
    one_by_one = torch.cat([head_features(heads, hidden, nxt, rows[i:i + 1]) for i in range(rows.shape[0])])
    torch.testing.assert_close(feats, one_by_one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,loss,mse", [("amphista", "kl", 1.0), ("medusa", "ce", 0.0)])
def test_training_lowers_loss_and_raises_accuracy(shard, target, tmp_path, kind, loss, mse):
    res = train_heads(cfg(shard, tmp_path / kind, kind=kind, loss=loss, steps=16, eval_every=16, mse_weight=mse,
                          loss_positions=64, lr=1e-2 if kind == "medusa" else 4e-3), target=target)
    first, last = res["history"][0], res["history"][-1]
    assert first["step"] == 0 and last["step"] == 16
    assert last["loss"] < 0.9 * first["loss"]
    assert last["top1"][0] > first["top1"][0] + 0.05
    assert sum(last["top1"]) > sum(first["top1"])


def test_save_load_round_trip_identical_logits(shard, target, tmp_path):
    res = train_heads(cfg(shard, tmp_path / "h", steps=3, save_dtype="fp32"), target=target)
    trained = res["heads"].eval()
    loaded = load_heads(tmp_path / "h", target, dtype=torch.float32)
    assert loaded.config.extra["training"]["step"] == 3
    hidden, nxt = torch.randn(1, 11, 32), torch.randint(0, 64, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_train(hidden, nxt), trained.forward_train(hidden, nxt),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_resume_after_kill_is_exact(shard, target, tmp_path, kind):
    full = train_heads(cfg(shard, tmp_path / "full", kind=kind, steps=8, loss_positions=40), target=target)
    train_heads(cfg(shard, tmp_path / "cut", kind=kind, steps=8, loss_positions=40, stop_after=3), target=target)
    resumed = train_heads(cfg(shard, tmp_path / "cut", kind=kind, steps=8, loss_positions=40, resume=True),
                          target=target)
    assert resumed["steps"] == 8
    a, b = full["heads"].state_dict(), resumed["heads"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(tmp_path / "full" / "trainer_state.pt", weights_only=False)
    sb = torch.load(tmp_path / "cut" / "trainer_state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 8
    assert sa["scheduler"] == sb["scheduler"]
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ga["exp_avg"], gb["exp_avg"]) and torch.equal(ga["exp_avg_sq"], gb["exp_avg_sq"])


def test_batch_plan_runs_through_epochs_of_different_sizes():
    """Each epoch packs its own shuffle into a different number of batches; steps must walk every batch of
    every epoch once, in order (a fixed steps-per-epoch once indexed past a shorter epoch's end)."""
    import random
    from amphista_engine.training.data import Sequence
    r = random.Random(1)
    seqs = [Sequence(str(i), list(range(r.randint(20, 300))), 10) for i in range(500)]
    sizes = [len(epoch_batches(seqs, 1024, 0, e)) for e in range(5)]
    assert len(set(sizes)) > 1 and min(sizes[1:]) < sizes[0]          # the case that crashed
    want = [(e, i) for e in range(5) for i in range(sizes[e])]
    plan = BatchPlan(seqs, 1024, 0)
    assert [plan.locate(s) for s in range(len(want))] == want
    late = BatchPlan(seqs, 1024, 0)                                     # a resumed run starts mid-plan
    step = sum(sizes[:3]) + 2
    assert late.locate(step) == (3, 2)
    assert late.batch(step) == [seqs[i] for i in epoch_batches(seqs, 1024, 0, 3)[2]]


def test_resume_refuses_other_recipe(shard, target, tmp_path):
    train_heads(cfg(shard, tmp_path / "o", steps=2), target=target)
    with pytest.raises(ConfigError, match="another recipe"):
        train_heads(cfg(shard, tmp_path / "o", steps=4, kind="medusa", resume=True), target=target)
    with pytest.raises(InputError, match="no trainer state"):
        train_heads(cfg(shard, tmp_path / "none", steps=2, resume=True), target=target)
    # a finished run is not replaced without a word: --resume continues it, --overwrite replaces it
    with pytest.raises(InputError, match="already holds trainer_state.pt and model.safetensors: pass --resume"):
        train_heads(cfg(shard, tmp_path / "o", steps=2), target=target)
    assert train_heads(cfg(shard, tmp_path / "o", steps=2, overwrite=True), target=target)["steps"] == 2


def test_hidden_cache_reused_across_epochs(shard, target, tmp_path):
    first = train_heads(cfg(shard, tmp_path / "c", steps=6, cache_hidden=str(tmp_path / "cache"), eval_frac=0.0),
                        target=target)
    assert first["steps"] == 6
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 36
    cold = torch.load(tmp_path / "c" / "trainer_state.pt", weights_only=False)["heads"]
    warm = train_heads(cfg(shard, tmp_path / "c2", steps=6, cache_hidden=str(tmp_path / "cache"), eval_frac=0.0),
                       target=target)
    for k, v in warm["heads"].state_dict().items():     # a warm cache gives the same run as a cold one
        assert torch.equal(v, cold[k]), k


def target_misses(monkeypatch) -> list[int]:
    """After each hidden-state read, how many sequences the target has had to compute so far."""
    from amphista_engine.training.hidden_cache import HiddenSource
    seen, orig = [], HiddenSource.get

    def spy(self, batch, x):
        out = orig(self, batch, x)
        seen.append(self.misses)
        return out
    monkeypatch.setattr(HiddenSource, "get", spy)
    return seen


def test_fill_cache_then_train_reads_only_the_cache(shard, target, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="--cache-hidden"):
        train_heads(cfg(shard, tmp_path / "x", fill_cache=True), target=target)
    got = train_heads(cfg(shard, tmp_path / "x", fill_cache=True, cache_hidden=cache), target=target)
    assert got == {"sequences": 36, "cached_before": 0, "computed": 36}
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 36
    next((tmp_path / "cache").glob("*.pt")).unlink()     # a refill computes only what is missing
    again = train_heads(cfg(shard, tmp_path / "x", fill_cache=True, cache_hidden=cache), target=target)
    assert again == {"sequences": 36, "cached_before": 35, "computed": 1}
    seen = target_misses(monkeypatch)
    train_heads(cfg(shard, tmp_path / "t", steps=3, cache_hidden=cache), target=target)
    assert seen and max(seen) == 0          # training never ran the target


def test_fill_planned_fills_what_the_steps_read(shard, target, tmp_path, monkeypatch):
    """--fill-planned fills the sequences the first --steps steps read plus the held-out ones, no others, and a
    run of those steps then never runs the target."""
    from amphista_engine.training.plan import planned_sequences, split_heldout
    with pytest.raises(ConfigError, match="--fill-planned only applies"):
        train_heads(cfg(shard, tmp_path / "x", fill_planned=True), target=target)
    cache = tmp_path / "cache"
    weights = {"tiny": 0.5}             # a weight < 1 leaves part of the data out of an epoch
    seqs = load_shard([str(shard)], target.config.vocab_size, 1024).sequences
    kw = dict(steps=1, cache_hidden=str(cache), source_weights=weights)
    got = train_heads(cfg(shard, tmp_path / "x", fill_cache=True, fill_planned=True, **kw), target=target)
    train, held = split_heldout(seqs, 0.2)
    plan = BatchPlan(train, 340, 3, weights)
    want = {s.id for s in plan.batch(0)} | {s.id for s in held[:64]}
    assert got["computed"] == len(want) < len(seqs)
    assert {s.id for s in planned_sequences(plan, 1)} | {s.id for s in held[:64]} == want
    seen = target_misses(monkeypatch)
    train_heads(cfg(shard, tmp_path / "t", **kw), target=target)
    assert seen and max(seen) == 0          # the planned steps and the evals read only the cache
    whole = planned_sequences(plan, 10 * len(plan.batches(0)))     # several epochs: every training sequence
    assert {s.id for s in whole} == {s.id for s in train}


def test_hidden_cache_keeps_one_compute_dtype(shard, target, tmp_path):
    """A cache filled by a bf16 target serves an fp32 training run, but never takes fp32-computed entries."""
    import copy
    cache = tmp_path / "cache"
    bf16 = copy.deepcopy(target).to(torch.bfloat16)
    got = train_heads(cfg(shard, tmp_path / "x", fill_cache=True, cache_hidden=str(cache)), target=bf16)
    assert got["computed"] == 36
    assert json.loads((cache / "meta.json").read_text())["computed_in"] == "bfloat16"
    done = train_heads(cfg(shard, tmp_path / "t", steps=2, cache_hidden=str(cache)), target=target)
    assert done["steps"] == 2                # full cache: read as stored by the fp32 run
    next(cache.glob("*.pt")).unlink()
    with pytest.raises(ConfigError, match=r"filled by a bfloat16 target.*1 of 36.*--dtype bf16"):
        train_heads(cfg(shard, tmp_path / "t2", steps=2, cache_hidden=str(cache)), target=target)
    with pytest.raises(ConfigError, match="filled by a bfloat16 target"):
        train_heads(cfg(shard, tmp_path / "x", fill_cache=True, cache_hidden=str(cache)), target=target)
    again = train_heads(cfg(shard, tmp_path / "x", fill_cache=True, cache_hidden=str(cache)), target=bf16)
    assert again == {"sequences": 36, "cached_before": 35, "computed": 1}


# ---- the distillation shard --------------------------------------------------------------------------------
def test_shard_writer_trims_truncated_record_and_resumes(tmp_path):
    path = tmp_path / "s.jsonl"
    with ShardWriter(path) as w:
        w.write({"id": "a", "prompt_ids": [1], "answer_ids": [2, 3]})
        w.write({"id": "b", "prompt_ids": [1], "answer_ids": [2, 3]})
    with open(path, "ab") as f:                # a crash in the middle of writing record c
        f.write(b'{"id": "c", "prompt_ids": [1], "answ')
    w = ShardWriter(path)
    assert w.ids == {"a", "b"} and w.trimmed > 0
    w.write({"id": "c", "prompt_ids": [1], "answer_ids": [4, 5]})
    w.close()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    recs = [json.loads(line) for line in lines[:-1]]
    assert [r["id"] for r in recs] == ["a", "b", "c"] and recs[2]["answer_ids"] == [4, 5]


def test_distill_resumes_without_duplicates(tmp_path, tiny_hf_dir):
    from amphista_engine.engine import Engine
    from amphista_engine.training.distill import distill

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "source": "s" + str(i % 2), "prompt": f"Hello {i} world"})
                               + "\n" for i in range(5)))
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128, max_batch_size=2)
    out = tmp_path / "d.jsonl"
    c1 = distill(prompts, out, limit=3, batch_size=2, max_new_tokens=6, engine=engine, progress=False)
    assert c1["written"] == 3
    with open(out, "ab") as f:
        f.write(b'{"id": "p3", "pro')          # killed mid-record
    c2 = distill(prompts, out, batch_size=2, max_new_tokens=6, engine=engine, progress=False)
    assert c2["done_before"] == 3 and c2["written"] == 2
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == [f"p{i}" for i in range(5)]
    r = recs[0]
    assert r["prompt_ids"] == engine.encode_prompt(r["prompt"]) and 1 <= len(r["answer_ids"]) <= 6
    assert r["answer"] == engine.tokenizer.decode(r["answer_ids"])
    # greedy and batched: the same as one-by-one generation
    assert r["answer_ids"] == engine.generate(r["prompt"], max_new_tokens=6).token_ids
    assert all(x["max_new_tokens"] == 6 for x in recs)
    # resuming with another answer budget would mix answers cut at 6 and at 8 tokens in one shard
    with pytest.raises(InputError, match="holds answers written with --max-new-tokens 6; this run asks for 8"):
        distill(prompts, out, batch_size=2, max_new_tokens=8, engine=engine, progress=False)


def test_distill_offset_worker_takes_the_tail(tmp_path, tiny_hf_dir):
    """Two workers (the second with --offset, its own shard) together cover the prompts exactly once."""
    from amphista_engine.engine import Engine
    from amphista_engine.training.distill import distill

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "source": "s" + str(i % 2), "prompt": f"Hi {i}"})
                               + "\n" for i in range(5)))
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64, max_batch_size=2)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    distill(prompts, a, limit=3, balance_by_source=True, batch_size=2, max_new_tokens=2, engine=engine,
            progress=False)
    c = distill(prompts, b, offset=3, balance_by_source=True, batch_size=2, max_new_tokens=2, engine=engine,
                progress=False)
    assert c["prompts"] == 2 and c["written"] == 2
    ids = [json.loads(line)["id"] for f in (a, b) for line in f.read_text().splitlines()]
    assert sorted(ids) == [f"p{i}" for i in range(5)]
    with pytest.raises(InputError, match="--offset"):
        distill(prompts, b, offset=-1, max_new_tokens=2, engine=engine, progress=False)
    with pytest.raises(InputError, match="--offset 3 is past the 3 prompts of .* taken by --limit 3"):
        distill(prompts, b, offset=3, limit=3, max_new_tokens=2, engine=engine, progress=False)


def test_distill_batches_alike_lengths(tmp_path, tiny_hf_dir, monkeypatch):
    """Batches prefill right-padded, so distill groups prompts of alike length (within windows of 16 batches)."""
    from amphista_engine.engine import Engine
    from amphista_engine.training.distill import distill

    prompts = tmp_path / "p.jsonl"
    lengths = [1, 9, 2, 8, 3, 7, 4, 6, 5, 9, 1, 8]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "source": "s", "prompt": " ".join(["word"] * n)}) + "\n"
                               for i, n in enumerate(lengths)))
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128, max_batch_size=2)
    seen, real = [], engine.generate_batch
    monkeypatch.setattr(engine, "generate_batch", lambda ps, **kw: seen.append(ps) or real(ps, **kw))
    c = distill(prompts, tmp_path / "d.jsonl", batch_size=2, max_new_tokens=2, engine=engine, progress=False)
    assert c["written"] == 12 and len(seen) == 6
    widths = [[len(p.split()) for p in batch] for batch in seen]
    assert sum(widths, []) == sorted(lengths)            # 12 prompts < one window of 16 batches: fully sorted
    assert max(max(w) - min(w) for w in widths) <= 1


def test_read_prompts_formats_and_refusals(tmp_path):
    sg = tmp_path / "sharegpt.json"
    sg.write_text(json.dumps([{"id": "x", "conversations": [{"from": "human", "value": "Q1"},
                                                            {"from": "gpt", "value": "A1"},
                                                            {"from": "human", "value": "Q2"}]}]))
    assert [p.prompt for p in read_prompts(sg)] == ["Q1", "Q2"]
    jl = tmp_path / "train.jsonl"
    jl.write_text("".join(json.dumps({"id": f"{s}{i}", "source": s, "prompt": "p\u2028q"}) + "\n"
                          for s in "ab" for i in range(4 if s == "a" else 1)))
    assert [p.source for p in read_prompts(jl, limit=2)] == ["a", "a"]
    bal = read_prompts(jl, limit=2, balance_by_source=True)
    assert sorted(p.source for p in bal) == ["a", "b"] and bal[0].prompt == "p\u2028q"
    mt = tmp_path / "questions.jsonl"
    mt.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["hi"]}) + "\n")
    with pytest.raises(InputError, match="evaluation"):
        read_prompts(mt)
    named = tmp_path / "mt_bench_train.jsonl"
    named.write_text(json.dumps({"id": "1", "source": "s", "prompt": "hi"}) + "\n")
    with pytest.raises(InputError, match="evaluation"):
        read_prompts(named)
    # an MT-Bench question in a training-format file is refused by its text (case and spacing aside), and in a
    # shard too, whatever the file is called
    question = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural " \
               "experiences and must-see attractions."
    copied = tmp_path / "mine.jsonl"
    copied.write_text(json.dumps({"id": "1", "source": "s", "prompt": "ok"}) + "\n"
                      + json.dumps({"id": "x-1", "source": "s", "prompt": "  " + question.upper() + "\n"}) + "\n")
    with pytest.raises(InputError, match="1 prompt\\(s\\) are MT-Bench evaluation questions \\(first: id x-1\\)"):
        read_prompts(copied)
    shard_file = tmp_path / "shard.jsonl"
    shard_file.write_text(json.dumps({"id": "x-1", "source": "s", "prompt": question, "prompt_ids": [1, 2],
                                      "answer_ids": [3, 4, 5]}) + "\n")
    with pytest.raises(InputError, match="MT-Bench evaluation questions"):
        load_shard([shard_file], 100, 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "prompt": "ok"}\n{"id": 2, "prompt": \n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: malformed JSON"):
        read_prompts(bad)


# ---- bad training data -------------------------------------------------------------------------------------
def test_bad_data_clear_errors_or_counted_skips(tmp_path, target, shard):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="no usable training records"):
        train_heads(cfg(empty, tmp_path / "e"), target=target)
    with pytest.raises(InputError, match="not found"):
        train_heads(cfg(tmp_path / "missing.jsonl", tmp_path / "e"), target=target)
    mixed = tmp_path / "mixed.jsonl"
    good = shard.read_text()
    mixed.write_text(good
                     + "{not json\n"
                     + json.dumps({"id": "long", "prompt_ids": [3] * 300, "answer_ids": [4, 5]}) + "\n"
                     + json.dumps({"id": "oov", "prompt_ids": [3], "answer_ids": [999, 5]}) + "\n"
                     + json.dumps({"id": "noans", "prompt_ids": [3], "answer_ids": []}) + "\n"
                     + json.dumps({"id": "r0", "prompt_ids": [3], "answer_ids": [4, 5]}) + "\n"
                     + '{"id": "cut", "prompt_ids": [1, 2')
    data = load_shard(mixed, 64, 256)
    assert len(data.sequences) == 36
    assert dict(data.skipped) == {"malformed record": 1, "longer than max_seq_len=256": 1,
                                  "token id out of the target's vocabulary": 1, "empty prompt or answer": 1,
                                  "duplicate id": 1, "truncated last line": 1}
    res = train_heads(cfg(mixed, tmp_path / "m", steps=3), target=target)   # trains on the good records
    assert res["steps"] == 3 and sum(res["skipped"].values()) == 6


def test_gzipped_shard_reads_like_the_plain_one(tmp_path, shard):
    import gzip
    gz = tmp_path / "tiny.jsonl.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    plain, packed = load_shard(shard, 64, 256), load_shard(gz, 64, 256)
    assert [(s.id, s.ids, s.prompt_len) for s in packed.sequences] == \
           [(s.id, s.ids, s.prompt_len) for s in plain.sequences]
    both = load_shard([gz, shard], 64, 256)      # the same records twice: counted as duplicates
    assert len(both.sequences) == 36 and both.skipped["duplicate id"] == 36
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(shard.read_bytes())[:-40])
    with pytest.raises(InputError, match="not a readable gzip file"):
        load_shard(cut, 64, 256)
    fake = tmp_path / "plain.jsonl.gz"
    fake.write_bytes(shard.read_bytes())
    with pytest.raises(InputError, match="not a readable gzip file"):
        load_shard(fake, 64, 256)


def test_trained_heads_keep_greedy_output(shard, target, tmp_path):
    """Greedy speculative decoding with trained heads equals plain greedy decoding."""
    res = train_heads(cfg(shard, tmp_path / "g", steps=6, eval_frac=0.0), target=target)
    heads = load_heads(tmp_path / "g", target, dtype=torch.float32)
    prompt = json.loads(shard.read_text().splitlines()[-1])["prompt_ids"]
    assert greedy_tokens(target, prompt, 16, heads, f"chain-{K}") == greedy_tokens(target, prompt, 16)
    assert res["steps"] == 6


def test_eval_tau_per_category(tmp_path, tiny_hf_dir):
    from amphista_engine.engine import Engine
    from amphista_engine.heads import save_heads
    from amphista_engine.training.evaltau import eval_tau

    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256)
    save_heads(new_heads("medusa", engine.model, num_heads=2, dtype=torch.float32), tmp_path / "heads")
    q = tmp_path / "questions.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [f"Hello {i}", "more"]}) + "\n"
                         for i, c in enumerate(["writing", "writing", "math"])))
    res = eval_tau(q, tmp_path / "heads", engine=engine, tree="chain-2", max_new_tokens=8, per_category=1,
                   out=tmp_path / "tau.json", quiet=True)
    assert res["kind"] == "medusa" and res["questions"] == 2 and res["tree_used"] == "chain-2"
    assert set(res["per_category"]) == {"writing", "math"}
    assert all(v["tau"] >= 1.0 for v in res["per_category"].values())
    assert json.loads((tmp_path / "tau.json").read_text())["overall"]["tau"] == res["overall"]["tau"]
    # resumable: a run cut after its first question reuses it and answers only the rest
    saved = json.loads((tmp_path / "tau.json").read_text())
    saved["per_question"] = saved["per_question"][:1]
    (tmp_path / "tau.json").write_text(json.dumps({**saved, "partial": True}))
    calls = []
    real = engine.generate
    engine.generate = lambda *a, **k: calls.append(a) or real(*a, **k)
    again = eval_tau(q, tmp_path / "heads", engine=engine, tree="chain-2", max_new_tokens=8, per_category=1,
                     out=tmp_path / "tau.json", quiet=True)
    assert len(calls) == 1 and again["per_question"] == res["per_question"]
    assert again["overall"] == res["overall"] and "partial" not in json.loads((tmp_path / "tau.json").read_text())
    with pytest.raises(InputError, match="other settings"):     # another token budget: refuse to mix
        eval_tau(q, tmp_path / "heads", engine=engine, tree="chain-2", max_new_tokens=9, out=tmp_path / "tau.json",
                 quiet=True)


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_shipped_heads_keep_greedy_output(smollm2, kind):
    """The heads shipped for smollm2-135m load for it, and greedy speculative output equals plain greedy, with the
    default tree and with every tree fitted to them (tuned-N, mix-N in their config.json)."""
    from amphista_engine.engine import Engine
    from amphista_engine.shipped_heads import shipped_heads

    path = shipped_heads("smollm2-135m", kind)
    if path is None:
        pytest.skip(f"no {kind} heads shipped")
    engine = Engine(smollm2, max_seq_len=1024)
    engine.load_heads(path)
    prompt = "Write a haiku about the sea."
    plain = engine.generate(prompt, max_new_tokens=4)
    spec = engine.generate(prompt, max_new_tokens=4, speculative=kind)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.tau >= 1.0
    fitted = engine.heads.config.extra.get("trees", {})
    assert {"tuned-63", "mix-64"} <= set(fitted)
    for tree in fitted:
        assert engine.generate(prompt, max_new_tokens=4, speculative=kind, tree=tree).token_ids == plain.token_ids, tree


def test_frequent_tokens_ranks_answer_tokens_only():
    from amphista_engine.training.data import Sequence
    from amphista_engine.training.trainer import frequent_tokens
    seqs = [Sequence("a", [9, 9, 9, 1, 1, 2], 3), Sequence("b", [9, 3, 2, 2, 7], 2)]   # prompts: 9 9 9 | 9 3
    ids, coverage = frequent_tokens(seqs, 2, 10)
    assert ids.tolist() == [2, 1] and coverage == pytest.approx(5 / 6)   # 9 appears only in prompts


def test_training_with_draft_vocabulary(shard, target, tmp_path):
    """--draft-vocab: heads score the N most frequent answer tokens; training still learns, the checkpoint
    loads with the vocabulary, resume is exact and greedy speculative output is unchanged."""
    from amphista_engine.training.data import load_shard
    from amphista_engine.training.plan import split_heldout
    from amphista_engine.training.trainer import frequent_tokens
    kw = dict(steps=16, eval_every=16, loss_positions=64, lr=4e-3, mse_weight=1.0, draft_vocab=40)
    res = train_heads(cfg(shard, tmp_path / "dv", **kw), target=target)
    first, last = res["history"][0], res["history"][-1]
    assert last["loss"] < 0.9 * first["loss"] and last["top1"][0] > first["top1"][0] + 0.05
    train_seqs, _ = split_heldout(load_shard([str(shard)], 64, 256).sequences, 0.2)
    expect, _ = frequent_tokens(train_seqs, 40, 64)
    heads = load_heads(tmp_path / "dv", target, dtype=torch.float32)
    assert heads.config.draft_vocab_size == 40 and torch.equal(heads.draft_vocab, expect)
    cut = dict(kw, steps=8, eval_every=0)
    full = train_heads(cfg(shard, tmp_path / "full", **cut), target=target)
    train_heads(cfg(shard, tmp_path / "cut", stop_after=3, **cut), target=target)
    resumed = train_heads(cfg(shard, tmp_path / "cut", resume=True, **cut), target=target)
    for k, v in full["heads"].state_dict().items():
        assert torch.equal(v, resumed["heads"].state_dict()[k]), k
    with pytest.raises(ConfigError, match="exceeds"):
        train_heads(cfg(shard, tmp_path / "big", draft_vocab=65), target=target)

    prompt = json.loads(shard.read_text().splitlines()[-1])["prompt_ids"]
    plain = greedy_tokens(target, prompt, 24)
    for tree in ("tree-16", "dynamic-16"):
        assert greedy_tokens(target, prompt, 24, heads, tree) == plain


def test_init_from_grows_heads_and_keeps_their_drafts(shard, target, tmp_path):
    """--init-from: a deeper copy of trained heads drafts exactly what they drafted (added layers are
    pass-throughs), so training starts at the source's held-out loss; layouts that cannot map are refused."""
    from amphista_engine.training.warm_start import warm_start
    kw = dict(loss_positions=64, lr=4e-3, draft_vocab=40)
    src = train_heads(cfg(shard, tmp_path / "src", steps=6, eval_every=6, save_dtype="fp32", **kw), target=target)
    grown = new_heads("amphista", target, num_heads=K, dtype=torch.float32, draft_vocab_size=40,
                      layers_per_stage=2, aeb_layers=2)
    assert warm_start(grown, load_heads(tmp_path / "src", target, dtype=torch.float32)) == ["aeb.1", "sal.1", "sal.3"]
    hidden, nxt = torch.randn(2, 13, 32), torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        ref = load_heads(tmp_path / "src", target, dtype=torch.float32).forward_train(hidden, nxt)
        torch.testing.assert_close(grown.forward_train(hidden, nxt), ref, rtol=0, atol=0)
    assert ref.abs().max() > 0

    res = train_heads(cfg(shard, tmp_path / "grown", steps=6, eval_every=6, init_from=str(tmp_path / "src"),
                          layers_per_stage=2, aeb_layers=2, **kw), target=target)
    first, last = res["history"][0], res["history"][-1]
    assert first["step"] == 0 and first["loss"] == pytest.approx(src["history"][-1]["loss"], rel=1e-4)
    assert last["loss"] < first["loss"]
    assert load_heads(tmp_path / "grown", target).config.layers_per_stage == 2
    with pytest.raises(ConfigError, match="differ.*kind"):
        train_heads(cfg(shard, tmp_path / "m", kind="medusa", init_from=str(tmp_path / "src"), **kw), target=target)
    with pytest.raises(ConfigError, match="only grow"):
        train_heads(cfg(shard, tmp_path / "s", init_from=str(tmp_path / "grown"), **kw), target=target)


def test_init_from_keeps_the_source_draft_vocabulary(shard, target, tmp_path, capsys):
    """A warm start on other data keeps the source heads' draft vocabulary (not this data's most frequent
    tokens), and the log says so with that vocabulary's coverage of this data."""
    from amphista_engine.heads.checkpoint import save_heads
    kw = dict(loss_positions=64, lr=4e-3, draft_vocab=40)
    train_heads(cfg(shard, tmp_path / "src", steps=2, eval_every=0, save_dtype="fp32", **kw), target=target)
    src = load_heads(tmp_path / "src", target, dtype=torch.float32)
    other = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40]
    save_heads(src.set_draft_vocab(other), tmp_path / "other", dtype=torch.float32)
    capsys.readouterr()
    train_heads(cfg(shard, tmp_path / "warm", steps=2, eval_every=0, init_from=str(tmp_path / "other"), **kw),
                target=target)
    assert torch.equal(load_heads(tmp_path / "warm", target).draft_vocab, other)
    assert "draft vocabulary = the source heads 40 tokens" in capsys.readouterr().err


def test_init_from_widens_mlps_and_keeps_their_drafts(shard, target, tmp_path):
    """Wider SAL/AEB MLPs from trained heads: the old units keep their weights, the new ones start silent
    (zero w2 columns) but trainable, so drafts are unchanged at step 0 and the new units move in training."""
    from amphista_engine.training.warm_start import warm_start
    kw = dict(loss_positions=64, lr=4e-3, draft_vocab=40)
    src = train_heads(cfg(shard, tmp_path / "src", steps=6, eval_every=6, save_dtype="fp32", **kw), target=target)
    source = load_heads(tmp_path / "src", target, dtype=torch.float32)
    ws, wa = source.config.sal_intermediate_size, source.config.aeb_intermediate_size
    wide = dict(sal_intermediate_size=ws + 24, aeb_intermediate_size=wa + 40)
    grown = new_heads("amphista", target, num_heads=K, dtype=torch.float32, draft_vocab_size=40, **wide)
    assert warm_start(grown, source) == []
    hidden, nxt = torch.randn(2, 13, 32), torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        # equal up to the summation order of a longer reduction (zero terms added)
        torch.testing.assert_close(grown.forward_train(hidden, nxt), source.forward_train(hidden, nxt),
                                   rtol=1e-5, atol=1e-5)
    w13 = grown.sal[0].feed_forward.w13.weight
    assert w13[ws:ws + 24].abs().max() > 0 and w13[-24:].abs().max() > 0   # trainable: the new units see their input

    res = train_heads(cfg(shard, tmp_path / "wide", steps=6, eval_every=6, init_from=str(tmp_path / "src"),
                          **wide, **kw), target=target)
    first, last = res["history"][0], res["history"][-1]
    assert first["loss"] == pytest.approx(src["history"][-1]["loss"], rel=1e-4) and last["loss"] < first["loss"]
    trained = load_heads(tmp_path / "wide", target, dtype=torch.float32)
    assert trained.config.sal_intermediate_size == ws + 24 and trained.config.aeb_intermediate_size == wa + 40
    assert trained.sal[0].feed_forward.w2.weight[:, ws:].abs().max() > 0
    assert trained.aeb[0].feed_forward.w2.weight[:, wa:].abs().max() > 0
    with pytest.raises(ConfigError, match="only grow.*sal_intermediate_size"):
        train_heads(cfg(shard, tmp_path / "n", init_from=str(tmp_path / "src"), sal_intermediate_size=ws - 8, **kw),
                    target=target)
    with pytest.raises(ConfigError, match="--aeb-intermediate-size must be >= 1"):
        train_heads(cfg(shard, tmp_path / "z", aeb_intermediate_size=0), target=target)


def test_log_into_a_missing_folder(shard, target, tmp_path):
    log = tmp_path / "not" / "yet" / "train.jsonl"
    train_heads(cfg(shard, tmp_path / "h", steps=2, eval_every=2, log=str(log)), target=target)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()][-1] == 2


def test_source_weights_shape_each_epoch():
    """w copies per epoch (fractions drawn per epoch, seeded), 0 drops a source, no weights = the old plan."""
    import random
    from amphista_engine.training.data import Sequence
    from amphista_engine.training.plan import parse_source_weights
    r = random.Random(2)
    seqs = [Sequence(str(i), list(range(r.randint(5, 40))), 2, "abc"[i % 3]) for i in range(300)]
    w = parse_source_weights("a=3, b=0.5,c=0")
    assert w == {"a": 3.0, "b": 0.5, "c": 0.0}
    counts = []
    for e in range(4):
        flat = [i for b in epoch_batches(seqs, 256, 7, e, w) for i in b]
        n = {src: sum(seqs[i].source == src for i in flat) for src in "abc"}
        assert n["a"] == 300 and n["c"] == 0 and 20 < n["b"] < 80          # 100 a's x 3; about half the b's
        assert all(flat.count(i) == 3 for i in range(0, 300, 3))
        counts.append(n["b"])
    assert len(set(counts)) > 1                                             # drawn afresh each epoch
    assert epoch_batches(seqs, 256, 7, 1, w) == epoch_batches(seqs, 256, 7, 1, dict(w))   # a pure function
    assert epoch_batches(seqs, 256, 7, 1, {}) == epoch_batches(seqs, 256, 7, 1)
    plan = BatchPlan(seqs, 256, 7, w)
    assert plan.batch(5) == [seqs[i] for i in epoch_batches(seqs, 256, 7, 0, w)[5]]


@pytest.mark.parametrize("spec, match", [("tiny=x", "bad entry"), ("tiny=-1", "bad entry"), ("=2", "bad entry"),
                                         ("tiyn=2", "not in the training data: tiyn"), ("tiny=0", "weight 0")])
def test_bad_source_weights_are_named(shard, target, tmp_path, spec, match):
    with pytest.raises(ConfigError, match=match):
        train_heads(cfg(shard, tmp_path / "o", steps=1, source_weights=spec), target=target)


def test_source_weights_train_and_resume(shard, target, tmp_path):
    """A weighted run trains (the source is read from the shard) and its recipe includes the weights."""
    r = train_heads(cfg(shard, tmp_path / "o", steps=2, source_weights="tiny=2"), target=target)
    assert r["steps"] == 2
    with pytest.raises(ConfigError, match="another recipe"):
        train_heads(cfg(shard, tmp_path / "o", steps=2, source_weights="tiny=3", resume=True), target=target)


def test_mse_on_a_subset_of_rows(shard, target, tmp_path):
    """--mse-positions N: N >= every row = the all-rows recipe exactly; fewer rows = another (still learning)
    run whose per-step MSE is measured on those rows only."""
    kw = dict(steps=10, eval_every=10, loss_positions=16, mse_weight=1.0, lr=4e-3)
    logs = {n: tmp_path / f"{n}.jsonl" for n in ("all", "big", "sub")}
    ref = train_heads(cfg(shard, tmp_path / "all", log=str(logs["all"]), **kw), target=target)
    big = train_heads(cfg(shard, tmp_path / "big", log=str(logs["big"]), mse_positions=10_000, **kw), target=target)
    sub = train_heads(cfg(shard, tmp_path / "sub", log=str(logs["sub"]), mse_positions=24, **kw), target=target)
    for a, b in zip(ref["heads"].parameters(), big["heads"].parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(ref["heads"].parameters(), sub["heads"].parameters()))
    steps = lambda p: [json.loads(l) for l in open(p) if '"eval"' not in l]
    assert [r["loss"] for r in steps(logs["big"])] == [r["loss"] for r in steps(logs["all"])]
    assert steps(logs["sub"])[0]["loss"] != steps(logs["all"])[0]["loss"]
    first, last = sub["history"][0], sub["history"][-1]
    assert last["loss"] < first["loss"] and sum(last["top1"]) > sum(first["top1"])


@pytest.mark.parametrize("kw", [dict(mse_positions=8), dict(mse_positions=8, mse_weight=1.0),
                                dict(mse_positions=8, mse_weight=1.0, loss_positions=16)])
def test_mse_positions_needs_its_partners(shard, target, tmp_path, kw):
    with pytest.raises(ConfigError, match="--mse-positions"):
        train_heads(cfg(shard, tmp_path / "o", steps=1, **kw), target=target)


def test_distill_sampled_answers_of_chosen_sources(tmp_path, tiny_hf_dir):
    """--sources keeps those prompts; --samples N with a temperature writes N sampled answers per prompt (ids
    ID#sK), they differ, a rerun adds nothing, and the held-out split keeps one prompt's answers together."""
    from amphista_engine.engine import Engine
    from amphista_engine.training.data import Sequence
    from amphista_engine.training.distill import distill
    from amphista_engine.training.plan import split_heldout

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "source": "ab"[i % 2], "prompt": f"Tell me {i}"})
                               + "\n" for i in range(6)))
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=128, max_batch_size=4)
    out = tmp_path / "d.jsonl"
    kw = dict(batch_size=4, max_new_tokens=12, engine=engine, progress=False, sources="b", samples=3,
              temperature=1.5)
    c = distill(prompts, out, **kw)
    assert c["written"] == 9
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(f"p{i}#s{k}" for i in (1, 3, 5) for k in range(3))
    assert all(r["source"] == "b" and r["temperature"] == 1.5 for r in recs)
    by_prompt = {}
    for r in recs:
        by_prompt.setdefault(r["id"].split("#")[0], set()).add(tuple(r["answer_ids"]))
    assert any(len(answers) > 1 for answers in by_prompt.values())     # sampled, not three greedy copies
    assert distill(prompts, out, **kw)["written"] == 0
    seqs = [Sequence(f"q{i}#s{k}", [1, 2, 3], 1) for i in range(200) for k in range(3)]
    train, held = split_heldout(seqs, 0.1)
    assert held and {s.id.split("#")[0] for s in train}.isdisjoint({s.id.split("#")[0] for s in held})
    # Few prompts, none hashed under the fraction: the fallback prompt is held out and no longer trained on.
    few = [Sequence(f"q{i}#s{k}", [1, 2, 3], 1) for i in range(3) for k in range(2)]
    train, held = split_heldout(few, 0.01)
    assert len(held) == 2 and len(train) == 4 and {s.id for s in train}.isdisjoint({s.id for s in held})
    assert split_heldout(few[:2], 0.01) == (few[:2], [])         # one prompt: nothing left to hold out
    with pytest.raises(InputError, match="--samples"):
        distill(prompts, out, engine=engine, progress=False, samples=2)
    with pytest.raises(InputError, match="--sources: no prompts of zz"):
        distill(prompts, out, engine=engine, progress=False, sources="b,zz", max_new_tokens=12)


def test_train_cli_takes_default_for_the_shipped_heads(monkeypatch, capsys):
    """`train --init-from default` starts from the shipped heads, as generate and eval-tau read 'default'."""
    from amphista_engine.cli import main
    from amphista_engine.shipped_heads import shipped_heads
    from amphista_engine.training import trainer
    seen = {}
    monkeypatch.setattr(trainer, "train_heads", lambda cfg: seen.setdefault("cfg", cfg) and {"final_eval": {}})
    assert main(["train", "--data", "x.jsonl", "--out", "o", "--init-from", "default", "--eval-frac", "0"]) == 0
    assert seen["cfg"].init_from == str(shipped_heads("smollm2-135m", "amphista"))
    assert "no held-out evaluation (--eval-frac 0" in capsys.readouterr().err


# ---- settings checked before any work; messages that say what happened ------------------------------------------
def _cli(argv, capsys) -> tuple[int, str]:
    from amphista_engine.cli import main
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--limit", "0"], "--limit must be a positive integer, got 0"),
    (["--limit", "-3"], "--limit must be a positive integer, got -3"),
    (["--max-seq-len", "-5"], "--max-seq-len must be at least 2"),
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000 leaves no room for a prompt"),
    (["--temperature", "-1"], "--temperature must be 0 (greedy answers) or a finite number"),
    (["--top-p", "0"], "--top-p must be in"),
])
def test_distill_refuses_bad_settings_before_loading(tmp_path, capsys, extra, match):
    """A bad distill setting is one error line before the model loads (the model path here does not exist, so a
    check that came late would fail on the load instead)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "source": "s", "prompt": "hi"}) + "\n")
    rc, err = _cli(["distill", "--prompts", str(prompts), "--out", str(tmp_path / "d.jsonl"),
                    "--model", str(tmp_path / "no-model")] + extra, capsys)
    assert rc == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "d.jsonl").exists()


def test_distill_refuses_a_gzip_out(tmp_path, capsys):
    """distill appends plain JSONL record by record; a .gz name would hold plain text that train then refuses as a
    broken gzip file, so the name is refused before anything loads."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "source": "s", "prompt": "hi"}) + "\n")
    rc, err = _cli(["distill", "--prompts", str(prompts), "--out", str(tmp_path / "d.jsonl.gz"),
                    "--model", str(tmp_path / "no-model")], capsys)
    assert rc == 2 and "distill writes plain JSONL" in err and "gzip it when it is complete" in err
    assert not (tmp_path / "d.jsonl.gz").exists()


def test_read_prompts_limit_and_encoding(tmp_path, capsys):
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps({"id": f"p{i}", "source": "s", "prompt": f"q{i}"}) + "\n" for i in range(5)))
    assert len(read_prompts(jl, limit=5)) == 5 and len(read_prompts(jl)) == 5
    for bad in (0, -3):      # `prompts[:0]` was read as "no limit", `prompts[:-3]` as "all but 3"
        with pytest.raises(InputError, match=f"--limit must be a positive integer, got {bad}"):
            read_prompts(jl, limit=bad)
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps({"id": "a", "source": "s", "prompt": "caf\u00e9"}, ensure_ascii=False)
                      .encode("latin-1") + b"\n")
    with pytest.raises(InputError, match=r"latin1.jsonl: not UTF-8 text \(byte 0xe9"):
        read_prompts(latin)
    rc, err = _cli(["distill", "--prompts", str(latin), "--out", str(tmp_path / "x.jsonl"),
                    "--model", str(tmp_path / "no-model")], capsys)
    assert rc == 2 and "not UTF-8 text" in err and "Traceback" not in err


@pytest.mark.parametrize("kw, match", [
    (dict(stop_after=0), "--stop-after must be a step >= 1, got 0"),
    (dict(stop_after=-2), "--stop-after must be a step >= 1, got -2"),
    (dict(warmup=-5), "--warmup must be >= 0, got -5"),
    (dict(loss_positions=-1), "--loss-positions must be >= 0"),
    (dict(save_every=-1), "--save-every must be >= 0"),
    (dict(eval_every=-1), "--eval-every must be >= 0"),
    (dict(eval_max_seqs=-1), "--eval-max-seqs must be >= 0"),
    (dict(max_seq_len=-5), "--max-seq-len must be at least 2"),
    (dict(stage_of_head="a,b,c"), "--stage-of-head 'a,b,c': expected a comma list of 3 stage indices"),
    (dict(stage_of_head="0,1"), "lists 2 stage\\(s\\) for 3 heads"),
])
def test_train_refuses_bad_settings_up_front(shard, target, tmp_path, kw, match):
    with pytest.raises((ConfigError, InputError), match=match):
        train_heads(cfg(shard, tmp_path / "o", **kw), target=target)
    assert not (tmp_path / "o").exists()       # refused before any output


def test_train_cli_checks_before_loading(shard, tmp_path, capsys):
    base = ["train", "--data", str(shard), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "no-model")]
    rc, err = _cli(base + ["--stage-of-head", "a,b,c,d"], capsys)
    assert rc == 2 and "--stage-of-head 'a,b,c,d': expected a comma list" in err and "Traceback" not in err
    (tmp_path / "logdir").mkdir()
    rc, err = _cli(base + ["--log", str(tmp_path / "logdir")], capsys)
    assert rc == 2 and "is a directory" in err
    rc, err = _cli(base + ["--stop-after", "0"], capsys)
    assert rc == 2 and "--stop-after must be a step >= 1" in err


def test_train_says_why_there_is_no_final_evaluation(shard, target, tmp_path, capsys, monkeypatch):
    """The CLI prints the final held-out evaluation; when there is none, it says why (stopped early, the run had
    already finished, --eval-max-seqs 0, nothing held out), and a finished run resumed prints its evaluation."""
    from amphista_engine.training import trainer
    real = trainer.train_heads
    monkeypatch.setattr(trainer, "train_heads", lambda c: real(c, target=target))
    out = tmp_path / "o"
    base = ["train", "--data", str(shard), "--out", str(out), "--num-heads", str(K), "--steps", "4",
            "--batch-tokens", "340", "--eval-frac", "0.2"]

    def run(*extra):
        from amphista_engine.cli import main
        rc = main(base + list(extra))
        got = capsys.readouterr()
        return rc, got.out.strip(), got.err

    rc, stdout, err = run("--stop-after", "2")
    assert rc == 0 and stdout == "{}"
    assert "no held-out evaluation (stopped at step 2 of 4 (--stop-after)" in err and "held out no sequence" not in err
    rc, stdout, err = run("--resume")
    assert rc == 0 and json.loads(stdout)["top1"] and "no held-out evaluation" not in err
    rc, stdout, err = run("--resume")           # finished: nothing to train, the saved final evaluation
    assert rc == 0 and json.loads(stdout)["top1"]
    assert "is at step 4 of 4: nothing left to train" in err and "4/4 steps in" not in err
    rc, stdout, err = run("--overwrite", "--eval-max-seqs", "0")
    assert rc == 0 and stdout == "{}" and "no held-out evaluation (--eval-max-seqs 0: the " in err
    rc, stdout, err = run("--overwrite", "--eval-frac", "0")
    assert "no held-out evaluation (--eval-frac 0.0 held out no sequence)" in err


def test_distill_records_its_target_and_train_refuses_another(tmp_path, tiny_hf_dir, target, shard):
    """Records name the target that wrote them; train (and a resumed distill) refuse a shard of another target,
    while shards written before the field existed still load."""
    from amphista_engine.engine import Engine
    from amphista_engine.heads import lm_head_fingerprint
    from amphista_engine.training.distill import distill

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "source": "s", "prompt": f"Hello {i}"}) + "\n"
                               for i in range(3)))
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64, max_batch_size=2)
    out = tmp_path / "d.jsonl"
    distill(prompts, out, batch_size=2, max_new_tokens=4, engine=engine, progress=False)
    fp = lm_head_fingerprint(engine.model)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["target_fingerprint"] for r in recs} == {fp}
    assert len(load_shard(out, 300, 64, fingerprint=fp).sequences) == 3
    with pytest.raises(InputError, match=r"d.jsonl: record p\d was distilled from another target"):
        train_heads(cfg(out, tmp_path / "h"), target=target)
    with pytest.raises(InputError, match="distilled from another target"):
        load_shard(out, 300, 64, fingerprint=lm_head_fingerprint(target))
    assert load_shard(shard, 64, 256, fingerprint=fp).sequences      # no field: an older shard, taken
    with open(out, "a") as f:
        f.write(json.dumps({**recs[0], "id": "other", "target_fingerprint": "V1-d1-0"}) + "\n")
    with pytest.raises(InputError, match="holds answers of another target"):
        distill(prompts, out, batch_size=2, max_new_tokens=4, engine=engine, progress=False)


def test_resume_refuses_a_changed_recipe_and_warns_for_stage_settings(shard, target, tmp_path, capsys):
    """--resume names the settings that differ from the saved recipe: data, split and layout are refused;
    settings a staged recipe changes on purpose (--loss-positions 0 for KL everywhere) go on with a warning."""
    train_heads(cfg(shard, tmp_path / "o", steps=2, loss_positions=40), target=target)
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(shard.read_text().splitlines(keepends=True)[:30]))
    for kw, match in [(dict(data=[str(fewer)]), "--data .* \\(the records read differ\\)"),
                      (dict(eval_frac=0.3), "--eval-frac 0.2 -> 0.3"),
                      (dict(max_seq_len=200), "--max-seq-len 1024 -> 200"),
                      (dict(draft_vocab=40), "--draft-vocab 0 -> 40"),
                      (dict(seed=4), "--seed 3 -> 4")]:
        with pytest.raises(ConfigError, match="another recipe or target: " + match):
            train_heads(cfg(shard, tmp_path / "o", steps=4, loss_positions=40, resume=True, **kw), target=target)
    capsys.readouterr()
    res = train_heads(cfg(shard, tmp_path / "o", steps=4, loss_positions=0, warmup=0, resume=True), target=target)
    err = capsys.readouterr().err
    assert res["steps"] == 4
    assert "warning: --resume continues with --loss-positions 40 -> 0; --warmup None -> 0" in err
    train_heads(cfg(shard, tmp_path / "o", steps=6, loss_positions=0, warmup=0, resume=True, eval_every=2,
                    save_every=1), target=target)
    assert "warning" not in capsys.readouterr().err


def test_resume_notes_that_fitted_trees_are_dropped(shard, target, tmp_path, capsys):
    train_heads(cfg(shard, tmp_path / "o", steps=2), target=target)
    conf = tmp_path / "o" / "config.json"
    c = json.loads(conf.read_text())
    c["extra"]["trees"] = {"tuned-4": [[0], [1], [0, 0]]}      # as `tree-search --save` adds them
    conf.write_text(json.dumps(c))
    capsys.readouterr()
    train_heads(cfg(shard, tmp_path / "o", steps=3, resume=True), target=target)
    assert "the trees fitted to these heads (tuned-4) are dropped" in capsys.readouterr().err
    assert "trees" not in json.loads(conf.read_text())["extra"]


@needs_smollm2
def test_text_less_records_of_mt_bench_questions_are_refused(smollm2, tmp_path, shard):
    """A record with only prompt_ids (no prompt text) of an MT-Bench question is refused: train decodes the ids
    with the target's tokenizer and checks the question inside the chat template."""
    from amphista_engine.engine import Engine
    from amphista_engine.training.data import prompt_text_decoder
    question = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural " \
               "experiences and must-see attractions."
    engine = Engine(smollm2, max_seq_len=1024)
    decode = prompt_text_decoder(smollm2.tokenizer)
    ids = engine.encode_prompt(question)
    assert decode(ids) == question
    path = tmp_path / "textless.jsonl"
    path.write_text(json.dumps({"id": "ok", "source": "s", "prompt_ids": engine.encode_prompt("Name a fruit."),
                                "answer_ids": [1, 2, 3]}) + "\n"
                    + json.dumps({"id": "x-1", "source": "s", "prompt_ids": ids, "answer_ids": [1, 2, 3]}) + "\n")
    V = smollm2.model.config.vocab_size
    assert len(load_shard(path, V, 1024).sequences) == 2        # without a tokenizer the ids cannot be read
    with pytest.raises(InputError, match=r"MT-Bench evaluation questions \(first: id x-1\)"):
        load_shard(path, V, 1024, prompt_text=decode)
    with pytest.raises(InputError, match="MT-Bench evaluation questions"):
        train_heads(cfg(path, tmp_path / "h", steps=1), target=smollm2.model, tokenizer=smollm2.tokenizer)


def test_text_less_records_with_a_template_less_tokenizer(tiny_hf_dir, tmp_path):
    """A tokenizer without a chat template encodes the bare question: decoding the ids finds it as well."""
    from amphista_engine.tokenizer import load_tokenizer
    from amphista_engine.training.data import prompt_text_decoder
    tok = load_tokenizer(tiny_hf_dir)
    question = "Describe a vivid and unique character, using strong imagery and creative language. " \
               "Please answer in fewer than two paragraphs."
    path = tmp_path / "textless.jsonl"
    path.write_text(json.dumps({"id": "q", "prompt_ids": tok.encode(question), "answer_ids": [5, 6, 7]}) + "\n")
    with pytest.raises(InputError, match="MT-Bench evaluation questions"):
        load_shard(path, 300, 1024, prompt_text=prompt_text_decoder(tok))


def _three_questions(tmp_path):
    q = tmp_path / "questions.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": "writing", "turns": [f"Hello {i}"]}) + "\n"
                         for i in range(3)))
    return q


def test_eval_tau_checks_before_loading(tmp_path, capsys):
    """An --out that is a directory (it failed after the first question, leaving OUT.tmp) and a question file
    that is not UTF-8 are one error line before the model loads."""
    q = _three_questions(tmp_path)
    rc, err = _cli(["eval-tau", "--questions", str(q), "--heads", "x", "--out", str(tmp_path),
                    "--model", str(tmp_path / "no-model")], capsys)
    assert rc == 2 and "--out" in err and "is a directory" in err
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"question_id": 1, "category": "w", "turns": ["caf\xe9"]}\n')
    rc, err = _cli(["eval-tau", "--questions", str(latin), "--heads", "x", "--model", str(tmp_path / "no")], capsys)
    assert rc == 2 and "not UTF-8 text" in err and "Traceback" not in err


def test_eval_tau_keeps_rows_outside_a_smaller_limit(tmp_path, tiny_hf_dir):
    """A rerun into the same --out with a smaller --limit summarises its questions, and keeps the rows of the
    others, so a later run over all of them answers nothing anew."""
    from amphista_engine.engine import Engine
    from amphista_engine.heads import save_heads
    from amphista_engine.training.evaltau import eval_tau

    q = _three_questions(tmp_path)
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256)
    save_heads(new_heads("medusa", engine.model, num_heads=2, dtype=torch.float32), tmp_path / "heads")
    out = tmp_path / "tau.json"
    kw = dict(engine=engine, tree="chain-2", max_new_tokens=6, out=out, quiet=True)
    full = eval_tau(q, tmp_path / "heads", **kw)
    one = eval_tau(q, tmp_path / "heads", limit=1, **kw)
    assert one["questions"] == 1 and [r["question_id"] for r in one["per_question"]] == [0]
    calls = []
    real = engine.generate
    engine.generate = lambda *a, **k: calls.append(a) or real(*a, **k)
    again = eval_tau(q, tmp_path / "heads", **kw)        # the rows of questions 1 and 2 were kept
    assert calls == [] and again["per_question"] == full["per_question"]

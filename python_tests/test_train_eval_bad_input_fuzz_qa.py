"""A seeded sweep of bad input to the training and evaluation commands (distill, train, tree-search, eval-tau, eval,
bench, perplexity), run in-process on a tiny checkpoint: every case must end in one `amphista: error:` line and exit
code 2 (or argparse's usage error), never a trace, a hang or a success on a bad value.

Pinned (2026-12 fuzz QA): `train --sal-intermediate-size 99999999999` died with torch's allocator trace;
`distill --sources ,` and `tree-search --nodes ''` did nothing and reported success; `distill --temperature 1e-30`
(or inf) was refused only after the model load, in the sampler's words; `train --weight-decay 1e30` saved heads of
weights ~1e27 and reported success; `--source-weights s=1,s=2` kept the last; `--resume` on another shard of the
same ids and lengths (distilled anew) went on as the same data; an --out inside the package's shipped heads (distill,
eval-tau, tree-search, bench, eval) was written into.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import signal
import traceback
from pathlib import Path

import pytest

from amphista_engine.cli import main

from conftest import write_tiny_hf

pytestmark = pytest.mark.usefixtures("one_thread_module")

V = 300     # the tiny checkpoint's vocabulary
INTS = ["0", "-1", "-7", "9" * 5000, "1.5", "abc", "", "nan"]
FLOATS = ["-1", "nan", "inf", "-inf", "1e309", "abc", ""]


def _records(n=12, seed=0):
    r = random.Random(seed)
    return [{"id": f"r{i}", "source": "s", "prompt_ids": [r.randrange(3, V) for _ in range(5)],
             "answer_ids": [r.randrange(3, V) for _ in range(12)]} for i in range(n)]


def _jl(rows) -> str:
    return "".join(json.dumps(x) + "\n" for x in rows)


class _Hang(Exception):
    pass


def _run(argv, timeout=60):
    """(outcome, rc, stderr): ERROR (rc 2 with one error line, or argparse's usage), ACCEPTED (rc 0), CRASH, HANG."""
    err = io.StringIO()

    def alarm(*_):
        raise _Hang()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
    except _Hang:
        return "HANG", None, err.getvalue()
    except BaseException:       # noqa: BLE001 -- any escape is the finding
        return "CRASH", None, err.getvalue() + traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    text = err.getvalue()
    # a progress bar's \r line may precede the error on the same line
    errors = [x for x in text.replace("\r", "\n").splitlines() if x.startswith("amphista: error:")]
    if rc == 2 and (len(errors) == 1 or "usage:" in text):
        return "ERROR", rc, text
    return ("ACCEPTED" if rc == 0 else f"RC{rc}"), rc, text


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread_module):
    from amphista_engine import shipped_heads
    root = tmp_path_factory.mktemp("fuzz")
    hf = write_tiny_hf(root / "tiny")
    shard = root / "shard.jsonl"
    shard.write_text(_jl(_records()))
    prompts = root / "prompts.jsonl"
    prompts.write_text(_jl([{"id": f"p{i}", "source": "s", "prompt": f"Tell me about cats {i}."} for i in range(3)]))
    questions = root / "questions.jsonl"
    questions.write_text(_jl([{"question_id": i, "category": "c", "turns": [f"Say hi {i}."]} for i in range(2)]))
    text = root / "text.txt"
    text.write_text("hello world this is a little text to score. " * 20)
    heads = root / "heads"
    assert _run(["train", "--data", str(shard), "--out", str(heads), "--model", str(hf), "--device", "cpu",
                 "--steps", "1", "--batch-tokens", "200", "--num-heads", "2", "--eval-frac", "0.2"])[0] == "ACCEPTED"
    fake = root / "package_heads"       # --out inside the shipped heads: never the package's own folder
    (fake / "smollm2-135m-amphista").mkdir(parents=True)
    real = shipped_heads.DATA
    shipped_heads.DATA = fake
    yield dict(root=root, hf=hf, shard=shard, prompts=prompts, questions=questions, text=text, heads=heads,
               fake=fake)
    shipped_heads.DATA = real


def _base(cmd, w, d):
    m = ["--model", str(w["hf"]), "--device", "cpu"]
    return {
        "distill": ["distill", "--prompts", str(w["prompts"]), "--out", str(d / "o.jsonl"), *m, "--max-new-tokens",
                    "4", "--max-seq-len", "64", "--limit", "2"],
        "train": ["train", "--data", str(w["shard"]), "--out", str(d / "h"), *m, "--steps", "1", "--batch-tokens",
                  "200", "--num-heads", "2", "--eval-frac", "0.2"],
        "tree-search": ["tree-search", "--data", str(w["shard"]), "--heads", str(w["heads"]), *m, "--nodes", "4",
                        "--dynamic", "", "--eval-frac", "0.2"],
        "eval-tau": ["eval-tau", "--questions", str(w["questions"]), "--heads", str(w["heads"]), *m,
                     "--max-new-tokens", "4", "--max-seq-len", "512", "--tree", "chain-2"],
        "eval": ["eval", "--questions", str(w["questions"]), "--methods", "ar,amphista", "--heads-amphista",
                 str(w["heads"]), *m, "--max-new-tokens", "4", "--max-seq-len", "512", "--tree", "chain-2",
                 "--warmup", "0", "--out", str(d / "ev"), "--no-progress"],
        "bench": ["bench", *m, "--trees", "chain-2", "--repeats", "1", "--warmup", "0", "--prompt-tokens", "8",
                  "--out", str(d / "b"), "--json"],
        "perplexity": ["perplexity", "--file", str(w["text"]), *m, "--ctx", "16", "--max-seq-len", "64", "--quiet"],
    }[cmd]


def _bad_file(kind, d, r, mt):
    """A bad data file of `kind` (shard, prompts, questions, text): (label, path)."""
    good = {"shard": _records(), "prompts": [{"id": "a", "source": "s", "prompt": "hello there"}],
            "questions": [{"question_id": 1, "category": "c", "turns": ["hi there"]}],
            "text": []}[kind]
    variants = {"empty": "", "whitespace": "\n \n\t\n", "binary": "\x00\x01garbage\x00"}
    if kind != "text":
        variants.update({
            "plain-text": "just some text\nmore\n", "list-lines": _jl([[1, 2, 3]] * 3), "number-lines": "1\n2\n",
            "null-lines": "null\nnull\n", "string-lines": _jl(["a", "b"]),
            "missing-field": _jl([{k: v for k, v in x.items() if k != sorted(x)[0]} for x in good]),
            "nested": _jl([{"data": x} for x in good]), "mt-bench-copy": _jl(mt[:3]),
            # the evaluation questions under another name and shape: the guard goes by content
            "mt-prompts": _jl([{"id": f"q{i}", "source": "s", "prompt": q["turns"][0]} for i, q in enumerate(mt[:2])]),
            "mt-prompt-recased": _jl([{"id": "z", "source": "s", "prompt": "  " + mt[5]["turns"][0].upper() + "\n"}]),
        })
    if kind == "shard":
        variants.update({
            "neg-ids": _jl([{**x, "answer_ids": [-1] * 12} for x in good]),
            "oov-ids": _jl([{**x, "answer_ids": [V + 5] * 12} for x in good]),
            "float-ids": _jl([{**x, "answer_ids": [1.5] * 12} for x in good]),
            "empty-answers": _jl([{**x, "answer_ids": []} for x in good]),
            "mt-in-shard": _jl([{**x, "prompt": mt[3]["turns"][0]} for x in good]),
            "prompt-file": _jl([{"id": "a", "source": "s", "prompt": "hi"}]),
        })
    if kind == "questions":
        variants.update({
            "turns-empty": _jl([{"question_id": 1, "category": "c", "turns": []}]),
            "turns-str": _jl([{"question_id": 1, "category": "c", "turns": "hi"}]),
            "turns-nonstr": _jl([{"question_id": 1, "category": "c", "turns": [5]}]),
            "category-num": _jl([{"question_id": 1, "category": 5, "turns": ["hi"]}]),
            "qid-missing": _jl([{"category": "c", "turns": ["hi"]}]),
        })
    if kind == "prompts":
        variants.update({
            "sharegpt-no-human": json.dumps([{"conversations": [{"from": "gpt", "value": "x"}]}]),
            "sharegpt-mt": json.dumps([{"conversations": [{"from": "human", "value": mt[9]["turns"][0]}]}]),
            "sharegpt-bad-item": json.dumps([5, 6]), "sharegpt-empty": "[]",
            "prompt-num": _jl([{"id": "a", "prompt": 5}]),
        })
    label = r.choice(sorted(variants))
    d.mkdir(parents=True, exist_ok=True)
    path = d / ("mt_bench.jsonl" if label == "mt-bench-copy" and r.random() < 0.5 else f"{kind}.jsonl")
    path.write_text(variants[label])
    return label, path


FLAGS = {
    "distill": {"--limit": INTS, "--offset": ["-1", "99", "abc"], "--batch-size": INTS, "--max-new-tokens": INTS,
                "--max-seq-len": INTS, "--samples": INTS, "--temperature": FLOATS + ["1e-30"],
                "--top-p": FLOATS + ["0"], "--sources": [",", " ", "nosuch"], "--prompts": "FILE:prompts",
                "--out": "OUT"},
    "train": {"--num-heads": INTS, "--lambda": FLOATS + ["0"], "--steps": INTS, "--epochs": FLOATS + ["0"],
              "--batch-tokens": INTS, "--lr": FLOATS + ["0"], "--weight-decay": FLOATS + ["1e30"],
              "--warmup": ["-1", "abc", "9" * 5000, "1000"], "--clip": FLOATS,
              "--eval-frac": FLOATS + ["1"], "--max-seq-len": INTS,
              "--stop-after": INTS, "--chunk": INTS, "--stage-of-head": ["a,b", "0,0,0", "-1,-1"],
              "--mse-weight": FLOATS, "--draft-vocab": INTS + ["1", "99999"], "--layers-per-stage": INTS,
              "--sal-intermediate-size": INTS + ["99999999999"], "--source-weights": ["s", "s=-1", "s=nan", "=1",
                                                                                   "s=1,s=2", "s=0"],
              "--data": "FILE:shard", "--out": "OUT", "--init-from": ["nosuch", ""],
              "--resume": ["--num-heads 3", "--lr 0.01", "--seed 5", "--kind medusa", "--data OTHER",
                           "--batch-tokens 300", "--max-seq-len 100"]},
    "tree-search": {"--nodes": ["", "0", "1", "-4", "a", "100000", "9" * 5000], "--dynamic": ["0", "1", "a", "99999"],
                    "--eval-frac": FLOATS + ["0", "1"], "--max-seq-len": INTS, "--prefix": ["", "dynamic", "a b",
                                                                                             "chain", "x/y"],
                    "--source-weights": ["s=-1", "s=nan", "x"], "--data": "FILE:shard",
                    "--heads": ["nosuch", "none", "", "MODEL", "SHARD"], "--out": "OUT"},
    "eval-tau": {"--max-new-tokens": INTS, "--max-seq-len": INTS, "--limit": INTS, "--per-category": INTS,
                 "--tree": "TREE", "--questions": "FILE:questions", "--heads": ["nosuch", "none", "", "MODEL", "SHARD"],
                 "--out": "OUT"},
    "eval": {"--max-new-tokens": INTS, "--max-seq-len": INTS, "--limit": INTS, "--per-category": INTS,
             "--warmup": ["-1", "abc"], "--temperature": FLOATS, "--tree": "TREE", "--methods": ["", ",", "foo"],
             "--questions": "FILE:questions", "--heads-amphista": ["nosuch", "", "MODEL", "SHARD"], "--out": "OUT"},
    "bench": {"--num-heads": INTS, "--prompt-tokens": INTS, "--repeats": INTS, "--warmup": ["-1", "abc"],
              "--trees": ["", ",", "nosuch", "chain-0", "dynamic-0", "dynamic--1"],
              "--draft-vocab": ["-1", "abc", "", "99999", "nan"],
              "--tau": ["abc", "0", "-1", "nan", "inf", "0.5", "medusa=", "foo=2", "medusa=2,medusa=3", "TAUFILE"],
              "--heads-amphista": ["nosuch", "", "MODEL", "SHARD", "default"], "--out": "OUT"},
    "perplexity": {"--ctx": INTS, "--chunks": INTS, "--max-seq-len": INTS, "--file": "FILE:text"},
}
TREES = ["", "nosuch", "[]", "[[]]", "[[-1]]", "[[0,0,0,0,0,0,0,0,0]]", "[[0],[0]]", "dynamic-0", "dynamic--1",
         "dynamic-99999", "chain-0", "{\"a\": 1}", "[[\"a\"]]", "[[1.5]]", "[0, 1]", "TREEFILE"]
OUTS = ["SHIPPED", "SHIPPED-HEADS", "MODELFILE", "SHARD", "HEADSFILE", "NESTED", "QUESTIONS"]


def _case(cmd, r, w, d, mt):
    """(a label of the bad value, argv)"""
    argv = _base(cmd, w, d)
    flag = r.choice(sorted(FLAGS[cmd]))
    pool = FLAGS[cmd][flag]
    if isinstance(pool, list):
        value = r.choice(pool)
    elif pool.startswith("FILE:"):
        label, path = _bad_file(pool[5:], d, r, mt)
        value = f"{path}"
        argv[argv.index(flag) + 1] = value
        return f"{flag}={label}", argv
    elif pool == "OUT":
        label = r.choice(OUTS)
        value = {"SHIPPED": w["fake"] / "x", "SHIPPED-HEADS": w["fake"] / "smollm2-135m-amphista" / "y",
                 "MODELFILE": w["hf"] / "model.safetensors", "SHARD": w["shard"],
                 "HEADSFILE": w["heads"] / "model.safetensors", "NESTED": w["text"] / "sub",
                 "QUESTIONS": w["questions"]}[label]
        if flag not in argv:
            argv += [flag, ""]
        argv[argv.index(flag) + 1] = str(value)
        return f"--out={label}", argv
    else:       # TREE
        value = r.choice(TREES)
        if value == "TREEFILE":
            d.mkdir(parents=True, exist_ok=True)
            (d / "tree.json").write_text(r.choice(["", "[[0],[1]", "{}", "[[0],[0,5]]"]))
            value = str(d / "tree.json")
    value = {"MODEL": str(w["hf"]), "SHARD": str(w["shard"])}.get(value, value)
    if value == "TAUFILE":
        d.mkdir(parents=True, exist_ok=True)
        (d / "tau.json").write_text(r.choice(["", "[]", "{}", '{"overall": 5}', '{"overall": {"amphista": {}}}',
                                              '{"overall": {"amphista": {"tau": -1}}}']))
        value = str(d / "tau.json")
    if flag == "--resume":      # a finished run, resumed with one setting of the recipe changed
        assert _run(argv)[0] == "ACCEPTED"
        other, v = value.split(" ", 1)
        if other == "--data":       # the same ids and lengths, other tokens
            v = str(d / "other.jsonl")
            (d / "other.jsonl").write_text(_jl(_records(seed=9)))
        argv += ["--resume"]
        if other in argv:
            argv[argv.index(other) + 1] = v
        else:
            argv += [other, v]
        return f"--resume {value}", argv
    if flag == "--epochs":
        i = argv.index("--steps")
        del argv[i:i + 2]
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return f"{flag}={value[:30]!r}", argv


# bad values that are in fact accepted, by design: a --limit past the questions runs them all, ...
def _allowed(cmd, label):
    if cmd == "distill" and label == "--out=SHARD":     # a shard distill wrote: it resumes it
        return True
    return (cmd in ("eval", "eval-tau", "perplexity") and label.startswith(("--limit=", "--per-category=", "--chunks="))
            and "9999" in label)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_seeded_sweep_of_bad_input(world, tmp_path, seed):
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"
    if not src.is_file():
        pytest.skip("../shared/data/mt_bench.jsonl not found")
    mt = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    r = random.Random(seed)
    counts, bad = {}, []
    cmds = sorted(FLAGS)
    for i in range(150):
        cmd = cmds[i % len(cmds)]
        d = tmp_path / f"c{i}"
        label, argv = _case(cmd, r, world, d, mt)
        outcome, rc, err = _run(argv)
        counts[cmd] = counts.get(cmd, 0) + 1
        if outcome != "ERROR" and not (outcome == "ACCEPTED" and _allowed(cmd, label)):
            bad.append(f"{cmd} {label}: {outcome}: {err.strip()[-600:]}")
        assert not any(p.is_file() for p in world["fake"].rglob("*")), f"{cmd} {label} wrote into the shipped heads"
    assert not bad, "\n".join(bad)
    assert set(counts) == set(FLAGS)


# ---- one regression test per bug the sweep found -------------------------------------------------------------

def _one(world, tmp_path, cmd, *extra, drop=()):
    argv = [a for a in _base(cmd, world, tmp_path) if a not in drop] + list(extra)
    return _run(argv)


def test_heads_too_large_to_allocate_are_named_not_traced(world, tmp_path):
    outcome, _, err = _one(world, tmp_path, "train", "--sal-intermediate-size", "99999999999")
    assert outcome == "ERROR" and "Traceback" not in err
    assert "--sal-intermediate-size 99999999999" in err and "do not fit in memory" in err


def test_distill_sources_naming_no_source_is_refused(world, tmp_path):
    outcome, _, err = _one(world, tmp_path, "distill", "--sources", ",")
    assert outcome == "ERROR" and "--sources ',' names no source" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_tree_search_with_no_node_count_is_refused(world, tmp_path):
    outcome, _, err = _one(world, tmp_path, "tree-search", "--nodes", "")
    assert outcome == "ERROR" and "--nodes '' names no tree size" in err
    from amphista_engine.errors import InputError
    from amphista_engine.training.tree_search import tree_search
    with pytest.raises(InputError, match="--nodes"):
        tree_search(world["shard"], world["heads"], model=str(world["hf"]), nodes=[], dynamic=[], device="cpu")


@pytest.mark.parametrize("t", ["1e-30", "inf", "nan"])
def test_distill_temperature_is_checked_before_the_load(world, tmp_path, monkeypatch, t):
    from amphista_engine import engine
    monkeypatch.setattr(engine.Engine, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    outcome, _, err = _one(world, tmp_path, "distill", "--temperature", t)
    assert outcome == "ERROR" and "--temperature must be 0 (greedy answers) or a finite number" in err


def test_a_weight_decay_that_flips_the_weights_is_refused(world, tmp_path):
    outcome, _, err = _one(world, tmp_path, "train", "--weight-decay", "1e30")
    assert outcome == "ERROR" and "--weight-decay 1e+30 with --lr 0.001" in err and "below 1000" in err
    assert not (tmp_path / "h").exists()
    assert _one(world, tmp_path, "train", "--weight-decay", "0.1")[0] == "ACCEPTED"


def test_resume_on_a_shard_of_the_same_ids_and_lengths_but_other_tokens_is_refused(world, tmp_path):
    assert _one(world, tmp_path, "train")[0] == "ACCEPTED"
    other = tmp_path / "other.jsonl"
    other.write_text(_jl(_records(seed=9)))        # ids r0.. and lengths as the shard's: distilled anew
    argv = _base("train", world, tmp_path)
    argv[argv.index("--data") + 1] = str(other)
    argv[argv.index("--steps") + 1] = "2"
    outcome, _, err = _run(argv + ["--resume"])
    assert outcome == "ERROR" and "(the records read differ)" in err


def test_duplicate_source_weights_are_refused(world, tmp_path):
    outcome, _, err = _one(world, tmp_path, "train", "--source-weights", "s=1,s=2")
    assert outcome == "ERROR" and "source 's' is given twice" in err


@pytest.mark.parametrize("cmd", ["distill", "eval-tau", "tree-search", "bench", "eval"])
def test_out_inside_the_shipped_heads_is_refused(world, tmp_path, cmd):
    target = world["fake"] / "smollm2-135m-amphista" / ("b" if cmd in ("bench", "eval") else "x.json")
    outcome, _, err = _one(world, tmp_path, cmd, "--out", str(target))
    assert outcome == "ERROR" and "is inside the package's shipped heads" in err
    assert not any(p.is_file() for p in world["fake"].rglob("*"))


def test_distill_with_every_prompt_too_long_is_refused(world, tmp_path):
    """Every prompt skipped as too long wrote a shard of no record and exited 0."""
    outcome, _, err = _one(world, tmp_path, "distill", "--max-new-tokens", "62")
    assert outcome == "ERROR" and "prompts are longer than the 2 tokens the cache leaves them" in err, err

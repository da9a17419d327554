"""`amphista eval` (Spec-Bench-format runner) and `amphista bench` on tiny random models, on the CPU."""
from __future__ import annotations

import json

import pytest
import torch

from amphista_engine.errors import AmphistaError, InputError
from amphista_engine.cli import main as cli_main
from amphista_engine.evaluation.bench import parse_tau, run_bench
from amphista_engine.evaluation.runner import run_eval

QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Hello, world!", "Now say it again, shorter."]},
    {"question_id": 2, "category": "coding", "turns": ["def f(x):\n    return x * 2"]},
    {"question_id": 3, "category": "coding", "turns": ["The quick brown fox"]},
]
KW = dict(max_new_tokens=6, warmup=1, progress=False, log=lambda msg: None)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def setup(tiny_hf_dir, tmp_path_factory):
    """One engine on the tiny model, random Medusa and Amphista heads saved as checkpoints, 3 questions."""
    from conftest import tiny_engine_with_saved_heads
    root = tmp_path_factory.mktemp("eval")
    engine, heads = tiny_engine_with_saved_heads(tiny_hf_dir, root)
    q = root / "questions.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in QUESTIONS))
    return engine, heads, q


def _count_calls(monkeypatch, engine, alter=None):
    calls = []
    real = engine.generate

    def generate(prompt, **kw):
        calls.append(kw.get("speculative"))
        res = real(prompt, **kw)
        if alter:
            alter(prompt, kw, res)
        return res

    monkeypatch.setattr(engine, "generate", generate)
    return calls


def test_summary_keys_counts_and_files(setup, tmp_path):
    engine, heads, q = setup
    s = run_eval(q, engine=engine, heads=heads, out=tmp_path, plot=True, **KW)
    assert s["methods"] == ["ar", "medusa", "amphista"]
    assert set(s["categories"]) == {"writing", "coding"}
    for m in s["methods"]:
        o = s["overall"][m]
        assert {"questions", "turns", "new_tokens", "wall_s", "tokens_per_s", "tau", "speedup",
                "decoding_steps", "accept_hist"} <= set(o)
        assert o["questions"] == 3 and o["turns"] == 4          # question 1 has two turns
        assert o["tokens_per_s"] > 0 and o["tau"] >= 1.0
        assert s["categories"]["writing"][m]["turns"] == 2 and s["categories"]["coding"][m]["questions"] == 2
    assert s["overall"]["ar"]["speedup"] == 1.0 and s["overall"]["ar"]["tau"] == 1.0
    assert s["equality"] == {m: {"checked": 3, "mismatches": 0, "first_mismatch": None} for m in ("medusa", "amphista")}
    lines = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and {(r["question_id"], r["method"]) for r in lines} == \
        {(x["question_id"], m) for x in QUESTIONS for m in s["methods"]}
    first = next(r for r in lines if r["question_id"] == 1 and r["method"] == "amphista")["choices"][0]
    assert len(first["turns"]) == len(first["token_ids"]) == len(first["wall_time"]) == 2
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["meta"]["n_questions"] == 3 and on_disk["overall"]["medusa"]["turns"] == 4
    used = on_disk["meta"]["tree_used"]                     # the tree each method's heads ran, named
    assert set(used) == {"medusa", "amphista"} and all(isinstance(t, str) and t for t in used.values())
    assert KW.get("tree") is None or set(used.values()) == {KW["tree"]}
    assert "| **overall** |" in (tmp_path / "summary.md").read_text()
    for png in ("tau_per_category.png", "speedup_per_category.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_multi_turn_carries_each_methods_own_answers(setup, tmp_path, monkeypatch):
    engine, heads, q = setup
    prompts = {}

    def alter(prompt, kw, res):
        prompts.setdefault(kw.get("speculative"), []).append(prompt)
        if kw.get("speculative") == "medusa":
            res.text = "medusa's own answer"     # what the next turn must carry, for medusa only

    _count_calls(monkeypatch, engine, alter)
    run_eval(q, methods="ar,medusa", heads=heads, engine=engine, out=tmp_path, limit=1, **{**KW, "warmup": 0})
    ar_answer = json.loads((tmp_path / "answers.jsonl").read_text().splitlines()[0])["choices"][0]["turns"][0]
    follow_up = {"role": "user", "content": QUESTIONS[0]["turns"][1]}
    for method, answer in ((None, ar_answer), ("medusa", "medusa's own answer")):
        turn1, turn2 = prompts[method]
        assert turn2 == turn1 + [{"role": "assistant", "content": answer}, follow_up]


def test_detects_injected_mismatch(setup, tmp_path, monkeypatch):
    engine, heads, q = setup

    def alter(prompt, kw, res):     # medusa "gets question 2 wrong" in its first token
        if kw.get("speculative") == "medusa" and prompt[0]["content"].startswith("def f"):
            res.token_ids[0] = (res.token_ids[0] + 1) % 300

    _count_calls(monkeypatch, engine, alter)
    s = run_eval(q, engine=engine, heads=heads, out=tmp_path, **KW)
    assert s["equality"]["amphista"]["mismatches"] == 0
    eq = s["equality"]["medusa"]
    assert eq["checked"] == 3 and eq["mismatches"] == 1
    assert eq["first_mismatch"]["question_id"] == 2 and eq["first_mismatch"]["turn"] == 1
    assert eq["first_mismatch"]["token_position"] == 0
    assert "first: question 2" in (tmp_path / "summary.md").read_text()


def test_resumes_without_recomputing(setup, tmp_path, monkeypatch):
    engine, heads, q = setup
    calls = _count_calls(monkeypatch, engine)
    run_eval(q, engine=engine, heads=heads, out=tmp_path, limit=2, **KW)
    assert len(calls) == 3 + 3 * 3                 # warm-up per method + (2 + 1 turns) x 3 methods
    calls.clear()
    s = run_eval(q, engine=engine, heads=heads, out=tmp_path, **KW)
    assert len(calls) == 3 + 3                     # warm-up + question 3 only
    assert s["overall"]["amphista"]["questions"] == 3
    calls.clear()
    # A run killed mid-write leaves a torn last line: that answer alone is recomputed.
    f = tmp_path / "answers.jsonl"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    s = run_eval(q, engine=engine, heads=heads, out=tmp_path, **KW)
    assert calls == [None, "medusa", "amphista", "amphista"]     # warm-ups, then the torn answer
    assert len(f.read_text().splitlines()) == 9 and s["overall"]["ar"]["turns"] == 4
    with pytest.raises(InputError, match="different configuration.*max_new_tokens"):
        run_eval(q, engine=engine, heads=heads, out=tmp_path, **{**KW, "max_new_tokens": 7})


def test_bad_input_errors(setup, tmp_path):
    _, heads, q = setup
    with pytest.raises(InputError, match="questions file not found: .*nope.jsonl"):
        run_eval(tmp_path / "nope.jsonl", heads=heads, out=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n\n{\"question_id\": 2, \"category\": \n")
    with pytest.raises(InputError, match=r"bad.jsonl:3: not a valid JSON line"):
        run_eval(bad, heads=heads, out=tmp_path)
    latin1 = tmp_path / "latin1.jsonl"         # "café" saved as Latin-1: refused by name, not a decode trace
    latin1.write_bytes(json.dumps(QUESTIONS[0]).encode() + b'\n{"question_id": 2, "category": "w", '
                       b'"turns": ["caf\xe9"]}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at offset \d+"):
        run_eval(latin1, heads=heads, out=tmp_path)
    with pytest.raises(InputError, match=r"unknown category 'math'.*has: coding, writing"):
        run_eval(q, heads=heads, categories="coding,math", out=tmp_path)
    with pytest.raises(InputError, match=r"unknown method 'eagle'.*ar .*medusa, amphista"):
        run_eval(q, methods="ar,eagle", heads=heads, out=tmp_path)
    with pytest.raises(InputError, match=r"one tree: name it.*--tree auto is for generate"):
        run_eval(q, heads=heads, tree="auto", out=tmp_path)
    with pytest.raises(InputError, match=r"no medusa heads are shipped for model 'x'.*--heads-medusa"):
        run_eval(q, methods="medusa", model="x", out=tmp_path)
    swapped = {"medusa": heads["amphista"], "amphista": heads["medusa"]}
    with pytest.raises(InputError, match="holds amphista heads, not medusa heads"):
        run_eval(q, engine=setup[0], heads=swapped, out=tmp_path / "swap", **KW)


def test_failed_run_does_not_block_the_corrected_rerun(setup, tmp_path):
    """A run refused for its heads or tree answered nothing: the same --out must take the corrected run."""
    engine, heads, q = setup
    out = tmp_path / "r2"
    with pytest.raises(InputError, match="holds medusa heads, not amphista heads"):
        run_eval(q, methods="amphista", engine=engine, heads={"amphista": heads["medusa"]}, out=out, limit=1, **KW)
    with pytest.raises(AmphistaError, match="tree 'tuned-99': the loaded heads carry no such fitted tree"):
        run_eval(q, methods="amphista", engine=engine, heads=heads, tree="tuned-99", out=out, limit=1, **KW)
    assert not (out / "run_config.json").exists()
    s = run_eval(q, methods="amphista", engine=engine, heads=heads, tree="tree-16", out=out, limit=1, **KW)
    assert s["overall"]["amphista"]["questions"] == 1
    # A config left without answers (older versions wrote it first) describes nothing either.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "run_config.json").write_text(json.dumps({"model": "other", "max_new_tokens": 99, "heads": {}}))
    run_eval(q, methods="ar", engine=engine, out=stale, limit=1, **KW)
    assert json.loads((stale / "run_config.json").read_text())["max_new_tokens"] == KW["max_new_tokens"]


def test_resume_refuses_heads_retrained_in_place(setup, tmp_path):
    """Same heads path, other weights: the answers in --out came from the old heads and must not be reused."""
    from amphista_engine.heads import random_heads, save_heads
    engine, heads, q = setup
    path = tmp_path / "heads"
    save_heads(random_heads("medusa", engine.model, num_heads=4, seed=1), path)
    kw = dict(methods="medusa", engine=engine, heads={"medusa": str(path)}, out=tmp_path / "out", limit=1, **KW)
    run_eval(q, **kw)
    run_eval(q, **kw)                                    # unchanged weights resume
    save_heads(random_heads("medusa", engine.model, num_heads=4, seed=2), path)
    with pytest.raises(InputError, match=r"different configuration \(medusa heads' weights: digest"):
        run_eval(q, **kw)


def test_corrupt_run_config_is_named(setup, tmp_path, capsys):
    engine, heads, q = setup
    run_eval(q, methods="ar", engine=engine, out=tmp_path, limit=1, **KW)
    for text in ("{broken", "[1, 2]"):
        (tmp_path / "run_config.json").write_text(text)
        with pytest.raises(InputError, match=r"run_config.json is not a valid run config"):
            run_eval(q, methods="ar", engine=engine, out=tmp_path, limit=1, **KW)


def test_plots_skip_plain_only_runs_and_name_the_tree_used(setup, tmp_path, monkeypatch):
    import matplotlib.figure
    engine, heads, q = setup
    logged = []
    s = run_eval(q, methods="ar", engine=engine, out=tmp_path / "ar", limit=1, plot=True,
                 **{**KW, "log": logged.append})
    assert s["plots"] == [] and not list((tmp_path / "ar").glob("*.png"))
    assert any("no plots" in m for m in logged)
    titles = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (titles.append(fig.axes[0].get_title()), real(fig, *a, **k)))
    s = run_eval(q, methods="ar,medusa", engine=engine, heads=heads, out=tmp_path / "m", limit=1, plot=True, **KW)
    used = s["meta"]["tree_used"]["medusa"]              # --tree unset: the engine's default for this device
    assert len(titles) == 2 and all(f"tree {used} |" in t and "tree default" not in t for t in titles)


def test_eval_cli(setup, tiny_hf_dir, tmp_path, capsys):
    _, heads, q = setup
    argv = ["eval", "--questions", str(q), "--model", str(tiny_hf_dir), "--device", "cpu", "--max-seq-len", "512",
            "--heads-medusa", heads["medusa"], "--heads-amphista", heads["amphista"], "--max-new-tokens", "4",
            "--categories", "coding", "--limit", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "| coding | 1 | 1 |" in out and "0 mismatches in 1 questions" in out
    assert cli_main(["eval", "--questions", str(tmp_path / "missing.jsonl")]) == 2
    assert "questions file not found" in capsys.readouterr().err
    (tmp_path / "file").write_text("")          # --out under a file: the OS's reason and the path, no trace
    assert cli_main(argv[:-3] + ["--out", str(tmp_path / "file" / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"amphista: error: Not a directory: {tmp_path / 'file' / 'out'}" in err and "Traceback" not in err


def test_bench_tiny_random_cpu(tmp_path, capsys):
    argv = ["bench", "--random-weights", "--shape", "tiny", "--device", "cpu", "--trees", "chain-4,tree-16,dynamic-8",
            "--prompt-tokens", "32", "--repeats", "2", "--warmup", "1", "--tau", "medusa=1.5,amphista=2",
            "--plot", "--out", str(tmp_path), "--json", "--draft-vocab", "0,100"]
    assert cli_main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prefill_ms"] > 0 and r["plain_step_ms"] > 0
    assert r["meta"]["cuda_graphs"] is False               # never on the CPU
    assert [(x["method"], x.get("draft_vocab"), x["tree"]) for x in r["rows"]] == [("plain", None, "-")] + [
        (m, v, t) for m in ("medusa", "amphista") for v in (512, 100) for t in ("chain-4", "tree-16", "dynamic-8")]
    for row in r["rows"][1:]:
        assert row["break_even_tau"] == pytest.approx(row["step_ms"] / r["plain_step_ms"], rel=1e-3, abs=1e-4)
        assert row["tokens_per_s_at_tau"] == pytest.approx(row["tau"] * 1e3 / row["step_ms"], rel=1e-3)
        assert row["verify_ms"] > 0
    assert r["rows"][1]["nodes"] == 5 and r["rows"][-1]["tau"] == 2.0
    assert (tmp_path / "step_cost.png").read_bytes()[:4] == b"\x89PNG"
    assert list(tmp_path.glob("bench_random-tiny_cpu_float32.*"))


def test_bench_times_the_linears_the_engine_runs():
    """bench lays out the linears as the Engine does on this device (packed for oneDNN on a CPU where it can):
    timing MKL's linears instead once overstated an AMD CPU's fp32 steps by ~1.2x."""
    from amphista_engine.evaluation.shapes import random_model
    from amphista_engine.kernels.linear_setup import LinearSetup
    setup = LinearSetup.for_device("cpu", torch.float32)
    target = random_model("tiny", "cpu", torch.float32, 256)
    r = run_bench(model=None, target=target, device="cpu", trees="chain-4", prompt_tokens=16, repeats=1, warmup=1,
                  methods=("amphista",), out=None, log=lambda m: None)
    assert r["meta"]["linears"] == setup.describe()
    kinds = {type(m).__name__ for m in target.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == ({"PackedLinear"} if setup.packed else {"Linear"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_cuda_times_graph_replays(tmp_path):
    """On a GPU, bench times steps as the Engine runs them (CUDA graphs), and --no-cuda-graphs times eager
    steps; both give every row and the eager phase split."""
    for graphs in (True, False):
        r = run_bench(random_weights=True, shape="tiny", device="cuda", trees="tree-16", prompt_tokens=32, repeats=3,
                      out=None, log=lambda m: None, cuda_graphs=graphs)
        assert r["meta"]["cuda_graphs"] is graphs
        assert [x["tree"] for x in r["rows"]] == ["-", "tree-16", "tree-16"]
        assert all(x["step_ms"] > 0 for x in r["rows"]) and all(x["verify_ms"] > 0 for x in r["rows"][1:])


def test_bench_refuses_large_on_cpu_and_bad_tau(tmp_path):
    with pytest.raises(InputError, match=r"llama-7b needs 25\.1 GiB .*--allow-large"):
        run_bench(random_weights=True, shape="llama-7b", device="cpu", out=None, log=lambda m: None)
    with pytest.raises(InputError, match="exceeds the vocabulary"):
        run_bench(random_weights=True, shape="tiny", device="cpu", draft_vocab="0,513", out=None, log=lambda m: None)
    with pytest.raises(InputError, match="comma list of integers"):
        run_bench(random_weights=True, shape="tiny", device="cpu", draft_vocab="all", out=None, log=lambda m: None)
    with pytest.raises(AmphistaError, match="unknown tree 'nope-3'"):
        run_bench(random_weights=True, shape="tiny", device="cpu", trees="nope-3", out=None, log=lambda m: None)
    with pytest.raises(InputError, match="--num-heads must be a positive integer, got 0"):
        run_bench(random_weights=True, shape="tiny", device="cpu", num_heads=0, out=None, log=lambda m: None)
    with pytest.raises(InputError, match="--warmup must be >= 0, got -1"):
        run_bench(random_weights=True, shape="tiny", device="cpu", warmup=-1, out=None, log=lambda m: None)
    assert parse_tau("2.5") == {"medusa": 2.5, "amphista": 2.5}
    with pytest.raises(InputError, match=">= 1"):
        parse_tau("medusa=0.5")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"overall": {"ar": {"tau": 1.0}, "amphista": {"tau": 2.4}}}))
    assert parse_tau(str(summary)) == {"amphista": 2.4}


def test_bench_refuses_a_cache_that_does_not_fit_before_allocating(monkeypatch):
    import amphista_engine.evaluation.shapes as shapes
    import amphista_engine.kv_cache as kv_cache
    from amphista_engine.errors import CacheFullError
    target = shapes.random_model("tiny", "cpu", torch.float32, 256)
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 64 << 20)

    def no_alloc(*a, **k):
        raise AssertionError("allocated a model before checking its cache")

    monkeypatch.setattr(shapes, "random_model", no_alloc)
    monkeypatch.setattr(target, "setup_rope", no_alloc)
    for kw in (dict(random_weights=True, shape="tiny"), dict(model=None, target=target)):
        with pytest.raises(CacheFullError, match=r"--prompt-tokens 1000000: max_seq_len=\d+ .* lower --prompt-tokens"):
            run_bench(device="cpu", trees="chain-4", prompt_tokens=10**6, out=None, log=lambda m: None, **kw)


def test_bench_tau_from_a_summary_names_its_tree(tmp_path):
    """A summary's tau was measured on one tree: rows of other trees keep the numbers but say so."""
    from amphista_engine.evaluation.bench import bench_markdown
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"overall": {"ar": {"tau": 1.0}, "amphista": {"tau": 2.4}},
                                   "meta": {"tree": None, "tree_used": {"amphista": "tree-16"}}}))
    logged = []
    r = run_bench(random_weights=True, shape="tiny", device="cpu", trees="chain-4,tree-16", prompt_tokens=16,
                  repeats=1, warmup=1, tau=str(summary), methods=("amphista",), out=None, log=logged.append)
    assert r["tau_source"] == {"file": str(summary), "tree": {"amphista": "tree-16"}}
    rows = {x["tree"]: x for x in r["rows"][1:]}
    assert all(x["tau"] == 2.4 and x["tau_tree"] == "tree-16" for x in rows.values())
    md = bench_markdown(r)
    assert "| chain-4 |" in md and "tree-16 (not this tree) |" in md
    note = "amphista tau 2.4 from {} was measured on tree tree-16; the rows for chain-4 assume".format(summary)
    assert note in md and any(note in m for m in logged)
    assert "(not this tree)" not in next(line for line in md.splitlines() if "| tree-16 | 16 |" in line)

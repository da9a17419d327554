"""A user who evaluates and benchmarks: `amphista eval`, `eval-tau` and `bench` end to end on tiny settings.

What they read must agree (stdout, summary.json, summary.md, the answers), the answers must be usable by Spec-Bench's
own speed.py, bad input must be refused by name, and a rerun into the same --out must never mix rows silently.
"""
from __future__ import annotations

import json
import statistics

import pytest

from amphista_engine.cli import main as cli_main
from amphista_engine.errors import InputError
from amphista_engine.evaluation.bench import run_bench
from amphista_engine.evaluation.runner import run_eval
from amphista_engine.training.evaltau import eval_tau

from conftest import interrupted_on_call, needs_smollm2, write_questions

pytestmark = pytest.mark.usefixtures("one_thread_module")

# Spec-Bench / MT-Bench question lines (../shared/data/mt_bench.jsonl's structure), shortened: two categories, one
# multi-turn question.
QUESTIONS = [
    {"question_id": 81, "category": "writing",
     "turns": ["Compose a short travel blog post about Hawaii.", "Rewrite it. Start every sentence with A."]},
    {"question_id": 82, "category": "writing", "turns": ["Draft a short email to your supervisor."]},
    {"question_id": 91, "category": "roleplay", "turns": ["Pretend yourself to be Elon Musk. Why go to Mars?"]},
]
QUIET = dict(progress=False, log=lambda msg: None)
# Spec-Bench's evaluation/speed.py reads these from every answer line (choices[0]); its answer files also carry
# question_id, answer_id, model_id and tstamp.
SPEC_BENCH_TOP = ("question_id", "category", "answer_id", "model_id", "choices", "tstamp")
SPEC_BENCH_CHOICE = ("index", "turns", "new_tokens", "wall_time", "decoding_steps", "accept_lengths")


def _write_questions(path, questions=QUESTIONS):
    return write_questions(path, questions)


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir, tmp_path_factory):
    from conftest import tiny_engine_with_saved_heads
    return tiny_engine_with_saved_heads(tiny_hf_dir, tmp_path_factory.mktemp("evalbench"))


def _speed_py(answers, base):
    """Spec-Bench's speed.py arithmetic: per-answer tokens/s (mean), mean accept length, speedup."""
    speeds = [sum(d["choices"][0]["new_tokens"]) / sum(d["choices"][0]["wall_time"]) for d in answers]
    base_speeds = [sum(d["choices"][0]["new_tokens"]) / sum(d["choices"][0]["wall_time"]) for d in base]
    accept = [n for d in answers for n in d["choices"][0]["accept_lengths"]]
    return statistics.mean(speeds), statistics.mean(accept), statistics.mean(speeds) / statistics.mean(base_speeds)


def _check_outputs_agree(out, stdout, methods):
    summary = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()
    assert md.strip() in stdout                                    # what was printed is what was saved
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    for m in methods:
        o = summary["overall"][m]
        cats = [g[m] for g in summary["categories"].values()]
        for key in ("questions", "turns", "new_tokens", "decoding_steps"):   # categories partition the overall
            assert sum(c[key] for c in cats) == o[key], (m, key)
        assert sum(c["wall_s"] for c in cats) == pytest.approx(o["wall_s"], abs=1e-3)
        recs = [r for r in answers if r["method"] == m]
        ch = [r["choices"][0] for r in recs]
        assert o["new_tokens"] == sum(map(sum, (c["new_tokens"] for c in ch)))
        assert o["tokens_per_s"] == pytest.approx(o["new_tokens"] / sum(map(sum, (c["wall_time"] for c in ch))),
                                                  rel=2e-3)
        assert o["tau"] == round(sum(map(sum, (c["step_tokens"] for c in ch))) /
                                 sum(map(sum, (c["decoding_steps"] for c in ch))), 4)
        # Spec-Bench's answer format, one file per method, as its speed.py reads a file (one method per file)
        spec = [json.loads(line) for line in (out / "spec_bench" / f"{m}.jsonl").read_text().splitlines()]
        assert summary["spec_bench_answers"][m] == str(out / "spec_bench" / f"{m}.jsonl")
        assert [r["question_id"] for r in spec] == [r["question_id"] for r in recs] and len(spec) == o["questions"]
        assert {r["method"] for r in spec} == {m} and len({r["answer_id"] for r in spec}) == len(spec)
        for r in spec:
            assert all(k in r for k in SPEC_BENCH_TOP) and all(k in r["choices"][0] for k in SPEC_BENCH_CHOICE)
            c = r["choices"][0]
            assert c["index"] == 0 and len(c["turns"]) == len(c["new_tokens"]) == len(c["wall_time"])
            assert len(c["accept_lengths"]) == sum(c["decoding_steps"])
            assert sum(c["accept_lengths"]) == sum(c["step_tokens"])
        if m != "ar":
            base = [json.loads(line) for line in (out / "spec_bench" / "ar.jsonl").read_text().splitlines()]
            _, accept, _ = _speed_py(spec, base)
            assert accept == pytest.approx(o["tau"], abs=1e-3)          # speed.py's "mean accepted tokens"
        row = next(line for line in md.splitlines() if line.startswith("| **overall** |"))
        if m != "ar":
            assert f"| {o['tau']:.2f} | {o['tokens_per_s']:.1f} | {o['speedup']:.2f}x |" in row
        else:
            assert f"| {o['tokens_per_s']:.1f} |" in row
    return summary


def test_every_output_exists_agrees_and_feeds_spec_bench_speed(tiny, tiny_hf_dir, tmp_path, capsys):
    """--out's files (answers, Spec-Bench answer files per method, summary json/md, plots) and stdout agree."""
    _, heads = tiny
    q = _write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "out"
    argv = ["eval", "--questions", str(q), "--model", str(tiny_hf_dir), "--device", "cpu", "--max-seq-len", "512",
            "--heads-medusa", heads["medusa"], "--heads-amphista", heads["amphista"], "--max-new-tokens", "8",
            "--per-category", "1", "--warmup", "0", "--plot", "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 0
    summary = _check_outputs_agree(out, capsys.readouterr().out, ["ar", "medusa", "amphista"])
    assert summary["meta"]["n_questions"] == 2 and summary["overall"]["ar"]["turns"] == 3     # 81 has two turns
    for png in ("tau_per_category.png", "speedup_per_category.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # a rerun of fewer methods, without --plot: nothing of the first run may pass for this summary
    assert cli_main(argv[:-4] + ["--methods", "ar,medusa", "--out", str(out), "--no-progress"]) == 0
    _check_outputs_agree(out, capsys.readouterr().out, ["ar", "medusa"])
    assert sorted(p.name for p in (out / "spec_bench").iterdir()) == ["ar.jsonl", "medusa.jsonl"]
    assert not list(out.glob("*.png"))


@needs_smollm2
def test_a_real_tau_agrees_everywhere_and_feeds_bench(tmp_path, capsys):
    """The shipped SmolLM2 heads reach tau > 1: the weighting of tau must hold on real numbers, and bench must take
    the summary's tau for the tree it was measured on."""
    q = _write_questions(tmp_path / "q.jsonl", QUESTIONS[1:])
    out = tmp_path / "real"
    # a shipped tree: the fitted ones the CPU default picks (mix-4) are not trees of bench's random heads
    argv = ["eval", "--questions", str(q), "--methods", "ar,amphista", "--device", "cpu", "--max-seq-len", "1024",
            "--tree", "chain-3", "--max-new-tokens", "16", "--per-category", "1", "--warmup", "0", "--out", str(out),
            "--no-progress"]
    assert cli_main(argv) == 0
    summary = _check_outputs_agree(out, capsys.readouterr().out, ["ar", "amphista"])
    tau, tree = summary["overall"]["amphista"]["tau"], summary["meta"]["tree_used"]["amphista"]
    assert tau > 1.0 and summary["equality"]["amphista"]["mismatches"] == 0
    bench = ["bench", "--random-weights", "--shape", "tiny", "--device", "cpu", "--trees", tree, "--prompt-tokens",
             "16", "--repeats", "2", "--warmup", "1", "--tau", str(out / "summary.json"), "--out", str(tmp_path / "b"),
             "--json"]
    assert cli_main(bench) == 0
    r = json.loads(capsys.readouterr().out)          # --json: stdout is one JSON object, nothing else
    plain = r["plain_step_ms"]
    assert r["tau"] == {"amphista": tau} and r["tau_source"]["tree"] == {"amphista": tree}
    for row in r["rows"][1:]:
        assert row["break_even_tau"] == pytest.approx(row["step_ms"] / plain, rel=1e-3)
        if row["method"] == "amphista":
            assert row["tau"] == tau and row["tau_tree"] == tree
            assert row["speedup_at_tau"] == pytest.approx(tau / row["break_even_tau"], rel=2e-3)
            assert row["tokens_per_s_at_tau"] == pytest.approx(tau * 1e3 / row["step_ms"], rel=1e-3)
    saved = json.loads(next((tmp_path / "b").glob("bench_*.json")).read_text())
    assert saved["rows"] == r["rows"]


def test_an_edited_question_is_not_answered_from_an_earlier_run(tiny, tmp_path):
    """Answers are kept by question_id: after the questions file is edited (same name, same ids), the old answers
    were summarized as answers to the new questions, without a word. eval and eval-tau refuse them."""
    engine, heads = tiny
    q = _write_questions(tmp_path / "q.jsonl")
    kw = dict(methods="ar,medusa", engine=engine, heads=heads, max_new_tokens=4, warmup=0, out=tmp_path / "o",
              **QUIET)
    run_eval(q, **kw)
    run_eval(q, **kw)                                   # the same file resumes (nothing to do)
    edited = [dict(QUESTIONS[0], turns=["Write a poem instead.", QUESTIONS[0]["turns"][1]])] + QUESTIONS[1:]
    _write_questions(q, edited)
    with pytest.raises(InputError, match=r"answers to another version of question 81 .*another --out"):
        run_eval(q, **kw)
    recategorized = QUESTIONS[:2] + [dict(QUESTIONS[2], category="writing")]
    with pytest.raises(InputError, match=r"another version of question 91 "):
        run_eval(_write_questions(q, recategorized), **kw)

    _write_questions(q)
    tau_kw = dict(engine=engine, tree="chain-2", max_new_tokens=4, out=tmp_path / "tau.json", quiet=True)
    engine.load_heads(heads["amphista"])
    eval_tau(q, heads["amphista"], **tau_kw)
    _write_questions(q, edited)
    with pytest.raises(InputError, match=r"rows for another version of question\(s\) 81 "):
        eval_tau(q, heads["amphista"], **tau_kw)


def test_a_rerun_with_another_cache_length_is_refused(tiny, tiny_hf_dir, tmp_path, capsys):
    """--max-seq-len caps each turn's budget near the end of the cache: it is part of the configuration."""
    _, heads = tiny
    q = _write_questions(tmp_path / "q.jsonl", QUESTIONS[2:])
    argv = ["eval", "--questions", str(q), "--model", str(tiny_hf_dir), "--device", "cpu", "--methods", "ar,amphista",
            "--heads-amphista", heads["amphista"], "--max-new-tokens", "4", "--warmup", "0",
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli_main(argv + ["--max-seq-len", "512"]) == 0
    capsys.readouterr()
    assert cli_main(argv + ["--max-seq-len", "400"]) == 2
    err = capsys.readouterr().err
    assert "different configuration (max_seq_len: 512 there, 400 now)" in err and "Traceback" not in err


def test_an_interrupted_rerun_leaves_no_summary_of_the_earlier_run(tiny, tmp_path, monkeypatch):
    """A rerun that adds questions and is stopped left the first run's summary.md (and plots) beside an answers file
    it does not count, to be read as this run's result. The summary is written once the run has all its answers."""
    engine, heads = tiny
    q = _write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "o"
    kw = dict(methods="ar,medusa", engine=engine, heads=heads, max_new_tokens=4, warmup=0, out=out, **QUIET)
    run_eval(q, limit=1, plot=True, **kw)
    assert (out / "summary.md").is_file() and (out / "tau_per_category.png").is_file()
    real = engine.generate
    monkeypatch.setattr(engine, "generate", interrupted_on_call(real, 2))
    with pytest.raises(KeyboardInterrupt):
        run_eval(q, **kw)
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert left == ["answers.jsonl", "run_config.json"], left
    monkeypatch.setattr(engine, "generate", real)
    s = run_eval(q, **kw)                                  # the resumed run completes and writes them again
    assert s["meta"]["n_questions"] == 3 and (out / "summary.md").is_file()
    assert len((out / "answers.jsonl").read_text().splitlines()) == 6


def test_bad_inputs_are_named(tiny, tmp_path):
    engine, heads = tiny
    q = _write_questions(tmp_path / "q.jsonl")
    kw = dict(engine=engine, heads=heads, max_new_tokens=4, warmup=0, **QUIET)
    # "--categories ," kept no question: a 0-question run reported "0 mismatches in 0 questions", exit 0
    for cats in (",", " , "):
        with pytest.raises(InputError, match=r"--categories .* names no category; q.jsonl has: roleplay, writing"):
            run_eval(q, categories=cats, out=tmp_path / "c", **kw)
    assert not (tmp_path / "c").exists()
    with pytest.raises(InputError, match=r"questions file .* is a directory; give the Spec-Bench-format JSONL"):
        run_eval(tmp_path, out=tmp_path / "d", **kw)
    with pytest.raises(InputError, match=r"is a directory"):
        eval_tau(tmp_path, heads["amphista"], engine=engine, quiet=True)


def test_eval_tau_does_not_overwrite_a_file_that_is_not_its_result(tiny, tmp_path):
    """`eval-tau --out` naming the questions file (or any other file) overwrote it with the result."""
    engine, heads = tiny
    q = _write_questions(tmp_path / "q.jsonl")
    before = q.read_text()
    with pytest.raises(InputError, match=r"--out .*q.jsonl exists and is not an eval-tau result"):
        eval_tau(q, heads["amphista"], model="/nonexistent/model", out=q, quiet=True)   # refused before the load
    assert q.read_text() == before
    empty = tmp_path / "empty.json"
    empty.write_text("")                          # an empty file (mktemp) is simply written
    engine.load_heads(heads["amphista"])
    r = eval_tau(q, heads["amphista"], engine=engine, tree="chain-2", max_new_tokens=4, limit=1, out=empty,
                 quiet=True)
    assert json.loads(empty.read_text())["overall"] == r["overall"]
    # rows of another target (model or dtype) are not resumed
    saved = json.loads(empty.read_text())
    empty.write_text(json.dumps({**saved, "dtype": "bfloat16"}))
    with pytest.raises(InputError, match=r"holds a run on another target \(\{'dtype': 'bfloat16'\}"):
        eval_tau(q, heads["amphista"], engine=engine, tree="chain-2", max_new_tokens=4, limit=1, out=empty,
                 quiet=True)


def test_bench_refuses_a_prompt_past_the_models_context(tiny, tmp_path, capsys):
    """--prompt-tokens past the positions the model was trained on timed nothing it serves, and a large one was
    OOM-killed in the prefill with no message (100000 on the tiny shape)."""
    engine, _ = tiny
    with pytest.raises(InputError, match=r"--prompt-tokens 600 is past the 512 positions .* use at most 512"):
        run_bench(model=None, target=engine.model, device="cpu", trees="chain-2", prompt_tokens=600, repeats=1,
                  warmup=0, out=None, log=lambda m: None)
    # --random-weights without --shape: refused before a "loading random None ..." line
    assert cli_main(["bench", "--random-weights", "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--random-weights needs --shape" in err and "None" not in err

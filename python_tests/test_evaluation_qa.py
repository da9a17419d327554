"""QA of `amphista eval | eval-tau | bench`: bad input named before the model load, the summary's arithmetic
(per category vs overall, markdown vs JSON), and the equality check against a deliberately broken decoder."""
from __future__ import annotations

import json
import math

import pytest

from amphista_engine.cli import main as cli_main
from amphista_engine.errors import ConfigError, InputError
from amphista_engine.evaluation.bench import bench_markdown, parse_tau, parse_tau_source, run_bench
from amphista_engine.evaluation.runner import run_eval, summarize, summary_markdown

QUIET = dict(progress=False, log=lambda msg: None)
NO_MODEL = "/nonexistent/model"      # a check that runs after the load would fail on this path instead


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _rec(qid, cat, method, turns):
    """An answer record as eval writes it; turns: [(new_tokens, wall_s, steps, step_tokens, token_ids)]."""
    keys = ("new_tokens", "wall_time", "decoding_steps", "step_tokens", "token_ids")
    ch = {k: [t[i] for t in turns] for i, k in enumerate(keys)}
    ch.update(turns=["x"] * len(turns), decode_ms=[t[1] * 1e3 for t in turns],
              accept_hist=[[0, t[2]] for t in turns])
    return {"question_id": qid, "category": cat, "method": method, "choices": [ch]}


# ---- --tau ---------------------------------------------------------------------------------------------------

def test_tau_values_and_files_that_are_not_taus_are_named(tmp_path):
    def summary(obj):
        p = tmp_path / f"s{len(list(tmp_path.iterdir()))}.json"
        p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        return str(p)

    cases = [
        (summary({"overall": {"amphista": {"tau": "2.1"}}}), r"overall\.amphista\.tau is '2\.1', not a number"),
        (summary({"overall": {"medusa": {"tokens_per_s": 3}}}), r"overall\.medusa\.tau is None, not a number"),
        (summary({"overall": {"amphista": {"tau": None}}}), r"overall\.amphista\.tau is None"),
        (summary({"overall": [1, 2]}), r"not an `amphista eval` summary\.json \(no 'overall' section\)"),
        (summary({"kind": "amphista", "overall": {"tau": 2.3, "mean_tau": 2.2}}),
         r"an `amphista eval-tau` result; pass its tau as --tau amphista=2\.3"),
        ("2.5.5", r"'2\.5\.5' is not a number"),
        ("medusa=nan", r"'nan' is not a number"),
        ("amphista=inf,medusa=2", r"'inf' is not a number"),
        ("nan", r"'nan' is not a number"),
        ("amphista=2,amphista=3", r"amphista is given twice"),
        ("-1", r"must be >= 1"),
        # eval writes tau 0 when no answer took a decoding step: not "must be >= 1", but what happened
        (summary({"overall": {"amphista": {"tau": 0.0}}}), r"measured no tau for amphista.*larger --max-new-tokens"),
    ]
    for tau, message in cases:
        with pytest.raises(InputError, match=message):
            parse_tau(tau)
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"overall": {"amphista": {"tau": 2.0}}, "note": "caf\xe9"}')
    with pytest.raises(InputError, match=r"latin1\.json: not UTF-8 text \(byte 0xe9"):
        parse_tau(str(bad))
    for value in (float("nan"), float("inf"), True):       # the API's numbers: no bool, nothing infinite
        with pytest.raises(InputError):
            parse_tau(value)
    assert parse_tau(2) == parse_tau("2") == parse_tau(" 2 ") == {"medusa": 2.0, "amphista": 2.0}
    assert parse_tau("medusa=1.5, amphista=2") == {"medusa": 1.5, "amphista": 2.0}


def test_bench_cli_reports_a_bad_tau_file_in_one_line(tmp_path, capsys):
    f = tmp_path / "summary.json"
    f.write_text(json.dumps({"overall": {"amphista": {"tau": [2]}}}))
    argv = ["bench", "--random-weights", "--shape", "tiny", "--device", "cpu", "--out", str(tmp_path / "b")]
    for tau in (str(f), "2.5.5"):
        assert cli_main(argv + ["--tau", tau]) == 2
        err = capsys.readouterr().err
        assert err.startswith("amphista: error: --tau") and err.count("\n") == 1 and "Traceback" not in err


def test_bench_notes_a_tau_measured_on_another_model(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"overall": {"amphista": {"tau": 2.4}},
                                   "meta": {"model": "smollm2-135m", "tree_used": {"amphista": "chain-4"}}}))
    assert parse_tau_source(str(summary))[1]["model"] == "smollm2-135m"
    logged = []
    r = run_bench(random_weights=True, shape="tiny", device="cpu", trees="chain-4", prompt_tokens=16, repeats=1,
                  warmup=0, tau=str(summary), methods=("amphista",), out=None, log=logged.append)
    note = "measured on model smollm2-135m, not on random tiny"
    assert note in bench_markdown(r) and any(note in m for m in logged)
    assert "(not this tree)" not in bench_markdown(r)          # the tree matches: only the model is noted


# ---- checked before the model load ---------------------------------------------------------------------------

def test_out_that_is_a_file_is_refused_by_name_before_loading(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "a", "turns": ["hi"]}) + "\n")
    out = tmp_path / "results"
    out.write_text("")
    with pytest.raises(InputError, match=r"--out .*results is a file"):
        run_eval(q, methods="ar", model=NO_MODEL, out=out, **QUIET)
    with pytest.raises(InputError, match=r"--out .*results is a file"):
        run_bench(random_weights=True, shape="tiny", device="cpu", trees="chain-4", out=out, log=lambda m: None)


def test_eval_and_eval_tau_check_their_numbers_before_loading(tmp_path):
    from amphista_engine.training.evaltau import eval_tau
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "a", "turns": ["hi"]}) + "\n")
    for t in (math.nan, math.inf):
        with pytest.raises(InputError, match=r"--temperature must be a finite number >= 0"):
            run_eval(q, methods="ar", model=NO_MODEL, out=tmp_path / "o", temperature=t, **QUIET)
    with pytest.raises(InputError, match=r"--max-new-tokens must be a positive integer, got True"):
        run_eval(q, methods="ar", model=NO_MODEL, out=tmp_path / "o", max_new_tokens=True, **QUIET)
    for n in (0, -3):
        with pytest.raises(InputError, match=rf"--max-new-tokens must be a positive integer, got {n}"):
            eval_tau(q, "default", model=NO_MODEL, max_new_tokens=n, quiet=True)


# ---- the summary's arithmetic --------------------------------------------------------------------------------

def test_overall_is_token_weighted_over_the_categories_and_markdown_agrees_with_json():
    recs = [_rec(1, "math", "ar", [(10, 2.0, 9, 9, [1]), (5, 1.0, 4, 4, [2])]),
            _rec(1, "math", "amphista", [(10, 1.0, 3, 9, [1]), (5, 0.5, 2, 4, [2])]),
            _rec(2, "coding", "ar", [(20, 4.0, 19, 19, [3])]),
            _rec(2, "coding", "amphista", [(20, 1.0, 5, 19, [3])])]
    s = summarize(recs, ["ar", "amphista"])
    o, a = s["overall"]["amphista"], s["overall"]["ar"]
    assert (o["questions"], o["turns"], o["new_tokens"], o["decoding_steps"]) == (2, 3, 35, 10)
    assert o["tau"] == round(32 / 10, 4) and a["tau"] == 1.0                   # all used tokens / all forwards
    assert o["tokens_per_s"] == round(35 / 2.5, 3) and a["tokens_per_s"] == round(35 / 7.0, 3)
    assert o["speedup"] == round(o["tokens_per_s"] / a["tokens_per_s"], 4)     # ratio of the same run's rows
    math_ = s["categories"]["math"]["amphista"]
    assert math_["tau"] == round(13 / 5, 4) and math_["speedup"] == round((15 / 1.5) / (15 / 3.0), 4)
    md = summary_markdown(s).splitlines()
    for name, g in (("math", s["categories"]["math"]), ("**overall**", s["overall"])):
        row = next(line for line in md if line.startswith(f"| {name} |"))
        x = g["amphista"]
        assert row == (f"| {name} | {x['questions']} | {x['turns']} | {g['ar']['tokens_per_s']:.1f} | "
                       f"{x['tau']:.2f} | {x['tokens_per_s']:.1f} | {x['speedup']:.2f}x |")


def test_a_category_named_overall_is_counted_once():
    recs = [_rec(1, "overall", m, [(10, 1.0, 9, 9, [1])]) for m in ("ar", "amphista")]
    recs += [_rec(2, "math", m, [(10, 1.0, 9, 9, [2])]) for m in ("ar", "amphista")]
    s = summarize(recs, ["ar", "amphista"])
    assert s["overall"]["amphista"]["questions"] == 2 and s["overall"]["ar"]["new_tokens"] == 20
    assert s["categories"]["overall"]["ar"]["questions"] == 1
    assert s["equality"]["amphista"]["checked"] == 2


def test_markdown_keeps_its_columns_and_shows_no_tau_without_a_decoding_step():
    # max_new_tokens 1: every token comes from the prefill, nothing was decoded, so no division and no tau
    recs = [_rec(1, "a|b", m, [(1, 0.0, 0, 0, [5])]) for m in ("ar", "medusa")]
    s = summarize(recs, ["ar", "medusa"])
    assert s["overall"]["ar"]["tokens_per_s"] == 0.0 and s["overall"]["medusa"]["speedup"] is None
    md = summary_markdown(s).splitlines()
    row = next(line for line in md if line.startswith("| a"))
    assert row == r"| a\|b | 1 | 1 | 0.0 | - | 0.0 | - |"
    assert all(line.replace(r"\|", "").count("|") == md[0].count("|") for line in md[:4])


# ---- a broken decoder on a real (tiny) engine ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_hf_dir, tmp_path_factory):
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads, save_heads
    root = tmp_path_factory.mktemp("evalqa")
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256)
    heads = str(save_heads(random_heads("amphista", engine.model, num_heads=4, seed=3), root / "amphista"))
    q = root / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in (
        {"question_id": "a", "category": "writing", "turns": ["Hello, world!", "Again."]},
        {"question_id": "b", "category": "coding", "turns": ["def f(x):"]})))
    return engine, heads, q


def test_eval_catches_a_speculative_decoder_that_emits_a_wrong_token(tiny, tiny_hf_dir, tmp_path, monkeypatch):
    from amphista_engine.speculative import SpeculativeDecoder
    engine, heads, q = tiny
    kw = dict(methods="ar,amphista", engine=engine, heads={"amphista": heads}, max_new_tokens=8, warmup=0, **QUIET)
    s = run_eval(q, out=tmp_path / "ok", **kw)
    assert s["equality"]["amphista"] == {"checked": 2, "mismatches": 0, "first_mismatch": None}
    for rec in map(json.loads, (tmp_path / "ok" / "answers.jsonl").read_text().splitlines()):
        c = rec["choices"][0]          # tau is what was counted: used tokens / target forwards, per turn
        assert all(sum(h) == n for h, n in zip(c["accept_hist"], c["decoding_steps"]))
        assert all(sum(i * k for i, k in enumerate(h)) == u for h, u in zip(c["accept_hist"], c["step_tokens"]))

    real = SpeculativeDecoder.step

    def broken(self):          # the third step's first emitted token is off by one: a lossy decoder
        out, count = real(self)
        if self.forwards == 3:
            out = out.clone()
            out[:, 0] = (out[:, 0] + 1) % engine.model.config.vocab_size
        return out, count

    monkeypatch.setattr(SpeculativeDecoder, "step", broken)
    s = run_eval(q, out=tmp_path / "broken", **kw)
    eq = s["equality"]["amphista"]
    assert eq["checked"] == 2 and eq["mismatches"] == 2
    assert eq["first_mismatch"]["question_id"] == "a" and eq["first_mismatch"]["turn"] == 1
    assert "2 mismatches in 2 questions" in (tmp_path / "broken" / "summary.md").read_text()
    argv = ["eval", "--questions", str(q), "--model", str(tiny_hf_dir), "--device", "cpu", "--max-seq-len", "256",
            "--methods", "ar,amphista", "--heads-amphista", heads, "--max-new-tokens", "8", "--warmup", "0",
            "--out", str(tmp_path / "cli"), "--no-progress"]
    assert cli_main(argv) == 1           # as the README says: scripts notice a lossy decoder


def test_bench_times_real_heads_with_their_own_count_and_fitted_trees(tiny, tmp_path):
    """--heads-X: bench times those heads (their head count and fitted trees, e.g. mix-4), not random heads of
    --num-heads; a fitted tree is a tree name only there. Wrong kinds and random weights are named."""
    from amphista_engine.heads import random_heads, save_heads
    engine = tiny[0]
    heads = random_heads("medusa", engine.model, num_heads=3, seed=5)
    heads.config.extra = {"trees": {"mix-3": [[0], [1], [0, 0]]}}
    path = save_heads(heads, tmp_path / "medusa3")
    kw = dict(model=None, target=engine.model, device="cpu", prompt_tokens=8, repeats=1, warmup=0, out=None,
              log=lambda m: None)
    r = run_bench(trees="mix-3,chain-3", methods=("medusa",), heads={"medusa": str(path)}, **kw)
    rows = {(x["method"], x["tree"]): x for x in r["rows"] if x["method"] != "plain"}
    assert rows[("medusa", "mix-3")]["num_heads"] == 3 and rows[("medusa", "mix-3")]["nodes"] == 4
    assert rows[("medusa", "chain-3")]["heads"] == str(path) and "| medusa3 |" in bench_markdown(r)
    r = run_bench(trees="chain-3", methods=("medusa", "amphista"), heads={"medusa": str(path)}, **kw)
    assert [x["heads"] for x in r["rows"][1:]] == [str(path), "random"] and r["rows"][2]["num_heads"] == 4
    with pytest.raises(Exception, match="mix-3"):            # random heads carry no fitted tree
        run_bench(trees="mix-3", methods=("amphista",), **kw)
    with pytest.raises(InputError, match="holds medusa heads, not amphista"):
        run_bench(trees="chain-3", methods=("amphista",), heads={"amphista": str(path)}, **kw)
    with pytest.raises(InputError, match="--random-weights has none"):
        run_bench(random_weights=True, shape="tiny", trees="chain-3", heads={"medusa": str(path)}, out=None,
                  log=lambda m: None)
    with pytest.raises(InputError, match="no medusa heads are shipped"):
        run_bench(trees="chain-3", methods=("medusa",), heads={"medusa": "default"}, **kw)


def test_a_resumed_out_says_its_speedups_come_from_several_runs(tiny, tmp_path):
    """A resumed --out mixed answers timed by different processes into one speedup without a word."""
    engine, heads, q = tiny
    kw = dict(engine=engine, heads={"amphista": heads}, max_new_tokens=4, warmup=0, out=tmp_path, **QUIET)
    one = run_eval(q, methods="ar,amphista", **kw)
    assert "runs" not in one and "timed by" not in summary_markdown(one)
    (tmp_path / "answers.jsonl").write_text("".join(               # as if amphista's answers came later
        line + "\n" for line in (tmp_path / "answers.jsonl").read_text().splitlines() if '"ar"' in line))
    two = run_eval(q, methods="ar,amphista", **kw)
    assert len(set(two["runs"]["ar"]) | set(two["runs"]["amphista"])) == 2
    assert "timed by 2 runs" in summary_markdown(two)


def test_bench_times_a_fitted_tree_for_the_method_whose_heads_carry_it(tiny, tmp_path):
    """`amphista bench --heads-amphista default --trees mix-4` (the CLI times both methods): mix-4 is timed for the
    heads that carry it and skipped, with a note, for the other method; a tree no method knows is still an error."""
    from amphista_engine.heads import random_heads, save_heads
    engine = tiny[0]
    heads = random_heads("medusa", engine.model, num_heads=3, seed=5)
    heads.config.extra = {"trees": {"mix-3": [[0], [1], [0, 0]]}}
    path = save_heads(heads, tmp_path / "medusa3")
    logs = []
    kw = dict(model=None, target=engine.model, device="cpu", prompt_tokens=8, repeats=1, warmup=0, out=None,
              log=logs.append, methods=("medusa", "amphista"), heads={"medusa": str(path)})
    r = run_bench(trees="mix-3,chain-3", **kw)
    assert [(x["method"], x["tree"]) for x in r["rows"][1:]] == [("medusa", "mix-3"), ("medusa", "chain-3"),
                                                                 ("amphista", "chain-3")]
    assert any("amphista: no tree 'mix-3'" in line for line in logs)
    with pytest.raises(ConfigError, match="unknown tree 'mix-9'"):
        run_bench(trees="mix-9,chain-3", **kw)

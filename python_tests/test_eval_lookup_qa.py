"""`amphista eval` with prompt lookup (lookup) and heads + lookup (amphista+lookup) beside plain decoding, on the real
SmolLM2 with its shipped heads: answers equal plain decoding's, a resumed run reuses the answers of the new methods,
each method's Spec-Bench file is written, and one --tree reaches every method (lookup verifies a chain only)."""
from __future__ import annotations

import json

import pytest

from amphista_engine.cli import main as cli_main
from amphista_engine.errors import InputError
from amphista_engine.evaluation.plots import COLORS
from amphista_engine.evaluation.runner import METHODS, method_trees, resolve_heads_paths, run_eval
from conftest import needs_smollm2, smollm2_with_shipped_heads, write_questions

pytestmark = [needs_smollm2, pytest.mark.usefixtures("one_thread_module")]

CODE = '''def add_numbers(a, b):
    result = a + b
    print("The sum is", result)
    return result


def multiply_numbers(a, b):
    result = a * b
    print("The product is", result)
    return result
'''
QUESTIONS = [
    # an edit of a given text: the answer copies most of the prompt, where a lookup drafts whole lines
    {"question_id": 1, "category": "coding", "turns": ["Add type hints to this Python code and show the full code:\n\n"
                                                       + CODE]},
    {"question_id": 2, "category": "writing",
     "turns": ["Write two sentences about the sea.", "Now make them shorter."]},
    {"question_id": 3, "category": "math", "turns": ["What is 12 times 7?"]},
]
NEW = ["lookup", "amphista+lookup"]
NO_MODEL = "/nonexistent/model-dir"      # a load would fail on it: errors that name something else came first


@pytest.fixture(scope="module")
def engine():
    return smollm2_with_shipped_heads()


@pytest.fixture
def questions(tmp_path):
    return write_questions(tmp_path / "q.jsonl", QUESTIONS)


def _run(engine, questions, out, **kw):
    return run_eval(questions, methods="ar,lookup,amphista+lookup", engine=engine, out=out, warmup=0,
                    progress=False, **{"max_new_tokens": 40, "log": lambda msg: None, **kw})


def test_lookup_methods_equal_plain_decoding_and_resume(engine, questions, tmp_path, monkeypatch):
    """The methods were unknown to eval ("known methods: ar, medusa, amphista")."""
    out = tmp_path / "o"
    s = _run(engine, questions, out)
    assert s["methods"] == ["ar", *NEW]
    assert s["equality"] == {m: {"checked": 3, "mismatches": 0, "first_mismatch": None} for m in NEW}
    for m in s["methods"]:
        assert s["overall"][m]["tau"] >= 1 and s["overall"][m]["turns"] == 4
    assert s["categories"]["coding"]["lookup"]["tau"] > 1.5            # the copy pays where the answer repeats
    used = s["meta"]["tree_used"]
    assert set(used) == set(NEW) and used["lookup"] == "chain-4" and used["amphista+lookup"].endswith("+chain-4")
    assert set(s["meta"]["heads"]) == {"amphista"}                  # amphista+lookup's heads; lookup has none
    for m in s["methods"]:
        path = out / "spec_bench" / f"{m}.jsonl"
        assert s["spec_bench_answers"][m] == str(path)
        assert [json.loads(x)["method"] for x in path.read_text().splitlines()] == [m] * 3
    assert "| lookup tau |" in (out / "summary.md").read_text()

    calls = []
    real = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: (calls.append(k.get("speculative")), real(*a, **k))[1])
    again = _run(engine, questions, out)          # every answer is there: nothing recomputed
    assert calls == [] and again["overall"]["lookup"]["tau"] == s["overall"]["lookup"]["tau"]
    f = out / "answers.jsonl"
    lines = f.read_text().splitlines()
    assert json.loads(lines[-1])["method"] == "amphista+lookup"
    f.write_text("\n".join(lines[:-1]) + "\n")     # an interrupted run: its last answer missing
    resumed = _run(engine, questions, out)
    assert calls == ["amphista+lookup"] and resumed["equality"]["amphista+lookup"]["mismatches"] == 0
    assert (out / "spec_bench" / "amphista+lookup.jsonl").is_file()


def test_one_tree_reaches_every_method(engine, questions, tmp_path, capsys):
    """A heads' tree given with lookup in the run runs lookup on its default chain, said, instead of refusing it
    mid-run (after the plain answers); the CLI takes the new names and plots them."""
    out = tmp_path / "o"
    argv = ["eval", "--questions", str(questions), "--methods", "ar,lookup,amphista+lookup", "--tree", "mix-4",
            "--limit", "1", "--max-new-tokens", "8", "--warmup", "0", "--no-progress", "--plot", "--out", str(out)]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "--tree mix-4 is the heads' tree; lookup verifies a chain, its default chain-4" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["tree_used"] == {"lookup": "chain-4", "amphista+lookup": "mix-4+chain-4"}
    assert (out / "tau_per_category.png").is_file() and set(METHODS) <= set(COLORS)

    trees = method_trees(["ar", "amphista", "lookup", "amphista+lookup"], "mix-4+chain-6")
    assert trees == {"ar": None, "amphista": "mix-4", "lookup": "chain-6", "amphista+lookup": "mix-4+chain-6"}
    assert method_trees(["ar", "lookup", "amphista"], "chain-3") == {"ar": None, "lookup": "chain-3",
                                                                     "amphista": "chain-3"}
    s = _run(engine, questions, tmp_path / "o2", tree="mix-4+chain-2", limit=1, max_new_tokens=8)
    assert s["meta"]["tree_used"] == {"lookup": "chain-2", "amphista+lookup": "mix-4+chain-2"}


def test_bad_methods_trees_and_heads_are_named_before_the_load(questions, tmp_path):
    kw = dict(model=NO_MODEL, out=tmp_path / "o", progress=False, log=lambda msg: None)
    with pytest.raises(InputError, match=r"unknown method 'eagle'.*lookup.*amphista\+lookup, medusa\+lookup"):
        run_eval(questions, methods="ar,eagle", **kw)
    with pytest.raises(InputError, match=r"--tree mix-4\+chain-4: its \+chain-4 is the prompt lookup's chain, but "
                                         r"--methods runs no lookup method"):
        run_eval(questions, methods="ar,amphista", tree="mix-4+chain-4", **kw)
    with pytest.raises(InputError, match=r"--tree chain-40: the prompt lookup's chain must be chain-K with "
                                         r"K in 1\.\.16, got chain-40"):
        run_eval(questions, methods="ar,lookup", tree="chain-40", **kw)
    with pytest.raises(InputError, match=r"--tree \+chain-4: name the heads' tree before \+chain-4"):
        run_eval(questions, methods="ar,amphista+lookup", tree="+chain-4", **kw)
    # lookup needs no heads, so a --heads-amphista none never stops it; amphista+lookup needs amphista's
    assert resolve_heads_paths(["ar", "lookup"], "smollm2-135m", {"amphista": "none"}) == {}
    with pytest.raises(InputError, match=r"--heads-amphista none: eval runs amphista, amphista\+lookup with drafting "
                                         r"heads; leave amphista, amphista\+lookup out of --methods to skip them"):
        resolve_heads_paths(["ar", "amphista", "amphista+lookup"], "smollm2-135m", {"amphista": "none"})
    assert resolve_heads_paths(["medusa+lookup"], "smollm2-135m", None).keys() == {"medusa"}

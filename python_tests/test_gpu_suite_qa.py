"""QA of the one-shot GPU suite (benchmarks/gpu_suite.sh, gpu_tune.sh) and what it runs, desk-checked without a GPU
(2026-12-05): a lent GPU comes by chance for ~15 minutes, and a bug in these scripts wastes the whole session.

The tests named *_on_cpu are CI's (the suite deselects them with -k "not on_cpu"); the one GPU test runs in the
suite: a NaN mid-answer under CUDA graphs (the per-step non-finite check, unrun on a GPU until then).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import interrupted_on_call

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HAS_GPU = torch.cuda.is_available()


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"suiteqa_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "AMPHISTA_CACHE_DIR": "off", "OMP_NUM_THREADS": "1", **extra}


def _dry_run(script: str, tmp_path: Path) -> dict[str, tuple[int, str]]:
    """{stage: (time limit in s, command line as printed)} from `bash benchmarks/<script> --dry-run`."""
    proc = subprocess.run(["bash", str(BENCH / script), "--dry-run", "--out", str(tmp_path / script)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {name: (int(limit), cmd) for name, limit, cmd in
            re.findall(r"^== (\S+) \(at most (\d+)s\): (.*)$", proc.stdout, re.M)}


def _python_argv(cmd: str) -> list[str] | None:
    """The arguments after the interpreter of a stage that runs a script or `-m amphista_engine...` (not pytest,
    pip, or `-c` code), or None."""
    try:
        words = shlex.split(cmd)
    except ValueError:              # the extension stage's `-c` code, printed in $'...' quoting
        return None
    at = next((i for i, w in enumerate(words) if re.search(r"python[\d.]*$", w)), None)
    if at is None or words[at + 1] == "-c" or words[at + 1:at + 3] in (["-m", "pytest"], ["-m", "pip"]):
        return None
    return words[at + 1:]


# Runs each command's own argparse on its real arguments in one process, stopping each right after parsing
PARSE_ONLY = r'''
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
real = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    real(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_args
results = {}
for name, argv in json.loads(sys.argv[1]):
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
        results[name] = "ran without parsing arguments"
    except Parsed:
        results[name] = "ok"
    except SystemExit as e:
        results[name] = f"exit {e.code}"
    except BaseException as e:
        results[name] = f"{type(e).__name__}: {e}"
print("RESULTS " + json.dumps(results))
'''


def test_every_script_the_gpu_scripts_run_takes_its_arguments_on_cpu(tmp_path):
    """Each python stage of gpu_suite.sh and gpu_tune.sh, on its exact command line: a renamed flag would only show
    on the GPU, as one failed stage (gpu_tune.sh's `--draft-vocab ""` is why the dry runs print quoted words)."""
    cmds = []
    for script in ("gpu_suite.sh", "gpu_tune.sh"):
        for name, (_, cmd) in _dry_run(script, tmp_path).items():
            argv = _python_argv(cmd)
            if argv is not None:
                cmds.append((f"{script} {name}", argv))
    assert len(cmds) >= 10, cmds        # suite: kernels latency bench profile agreement; tune: sweeps latency x2 ...
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(cmds)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=_env())
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(line[len("RESULTS "):])
    assert results == {name: "ok" for name, _ in cmds}, proc.stderr[-3000:]


# A pytest plugin: fixtures a collected test asks for that nothing defines. The suite's GPU tests skip on a CPU before
# their fixtures are looked up, so an unknown fixture would only show on the GPU.
FIXTURE_CHECK = r'''
import json
def pytest_collection_finish(session):
    bad = []
    for item in session.items:
        info = getattr(item, "_fixtureinfo", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if info is not None:
            bad += [f"{item.nodeid}: {n}" for n in info.names_closure
                    if n not in info.name2fixturedefs and n not in params and n != "request"]
    print("UNRESOLVED " + json.dumps(bad))
'''


def test_the_suites_test_selection_collects_with_every_fixture_on_cpu(tmp_path):
    """The suite's pytest stage, collected here with its own arguments: no collection error, no unknown fixture,
    and the GPU tests added since the last GPU run (2026-12-04) are in it."""
    (tmp_path / "suiteqa_fixtures.py").write_text(FIXTURE_CHECK)
    limit, cmd = _dry_run("gpu_suite.sh", tmp_path)["tests"]
    words = shlex.split(cmd)
    at = words.index("pytest")
    args = words[at + 1:]
    proc = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-p", "suiteqa_fixtures"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not re.search(r"\d+ errors?\b", proc.stdout.splitlines()[-1]), proc.stdout[-3000:]
    unresolved = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("UNRESOLVED "))[11:])
    assert unresolved == []
    ids = set(re.findall(r"^(python_tests/\S+::\S+)$", proc.stdout, re.M))
    assert sum("test_cuda_review_qa.py::test_tree_attention_edges" in i for i in ids) >= 10
    assert {"python_tests/test_acceptance.py::test_cuda_matches_cpu_without_host_sync",
            "python_tests/test_gpu_suite_qa.py::test_non_finite_logits_stop_a_graph_replayed_run_by_name",
            "python_tests/test_cuda_review_qa.py::test_cuda_backend_decodes_the_same_through_graphs"} <= ids
    assert not [i for i in ids if "on_cpu" in i]                   # CI's smoke tests stay out of the GPU's minutes
    assert limit >= 150


def test_suite_stage_limits_fit_its_budget_on_cpu(tmp_path):
    """latency_gpu.py's --time-budget only stops new configurations, so it must end well inside the stage's limit:
    with the whole budget ahead (the dry run, or --skip-build) it was 285 s against a 150 s limit, and the limit's
    SIGINT lost the shape under way. The budget, the kill grace and the summary fit GPU_SESSION.md's timeout."""
    stages = _dry_run("gpu_suite.sh", tmp_path)
    limit, cmd = stages["latency"]
    argv = shlex.split(cmd)
    assert float(argv[argv.index("--time-budget") + 1]) <= limit - 30
    budget = int(re.search(r"^BUDGET=(\d+)", (BENCH / "gpu_suite.sh").read_text(), re.M).group(1))
    outer = int(re.search(r"timeout (\d+) bash benchmarks/gpu_suite.sh", (BENCH / "GPU_SESSION.md").read_text())
                .group(1))
    assert budget + 15 + 30 <= outer               # --kill-after=15 on the last stage, ~5-30 s of summary
    assert stages["build-pip"][0] + stages["tests"][0] + stages["kernels"][0] + stages["agreement"][0] <= 540


def test_kernel_benchmarks_keep_their_rows_past_a_failure_and_an_interrupt_on_cpu(tmp_path, monkeypatch):
    """run_all.py wrote kernels.json only at its very end: the suite's stage limit (SIGINT), or one benchmark
    raising (a new row's launcher, say), lost every row of the stage. Now each benchmark's rows are saved as they
    come, a failing one is named in the file and the exit status, and an interrupt keeps the rows so far."""
    ra = _load(BENCH / "kernels" / "run_all.py")

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, bench):
            if self.name == "fails":
                raise RuntimeError("boom")
            if self.name == "stopped":
                raise KeyboardInterrupt
            return [{"kernel": self.name, "shape": "tiny", "case": "c", "backend": "torch", "ms": 0.001, "us": 1.0}]

    threads = torch.get_num_threads()
    monkeypatch.setattr(ra, "load", Fake)
    out = tmp_path / "kernels.json"
    try:
        monkeypatch.setattr(ra, "KERNELS", ["a", "fails", "b"])
        assert ra.main(["--quick", "--json", str(out)]) == 1
        doc = json.loads(out.read_text())
        assert [r["kernel"] for r in doc["rows"]] == ["a", "b"] and doc["errors"] == ["fails: RuntimeError: boom"]
        monkeypatch.setattr(ra, "KERNELS", ["a", "stopped", "b"])
        try:
            assert ra.main(["--quick", "--json", str(out)]) == 130
        except KeyboardInterrupt:                 # not this session's: pytest would stop every test after it
            pytest.fail("the interrupt escaped run_all.main")
        doc = json.loads(out.read_text())
        assert [r["kernel"] for r in doc["rows"]] == ["a"] and doc["errors"] == ["stopped: interrupted"]
    finally:
        torch.set_num_threads(threads)           # Bench takes one thread on a CPU


def test_latency_keeps_its_rows_when_the_stage_limit_interrupts_it_on_cpu(tmp_path, monkeypatch):
    """latency_gpu.py saved after each whole model shape: a SIGINT during the Llama-7B shape (all of gpu_decide's
    rows) left no latency.json at all."""
    lat = _load(BENCH / "latency_gpu.py")
    monkeypatch.setattr(lat, "time_steps", interrupted_on_call(lat.time_steps, 3))
    threads = torch.get_num_threads()
    try:
        assert lat.main(["--smoke", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path)]) == 130
    except KeyboardInterrupt:                     # not this session's: pytest would stop every test after it
        pytest.fail("the interrupt escaped latency_gpu.main")
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "latency.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["plain", "plain, routed (default)"]
    assert any("interrupted" in n for n in res["notes"]) and res["targets"] == {}
    assert "| smoke | plain |" in (tmp_path / "latency.md").read_text()


def test_gpu_decide_reads_every_committed_suite_run_and_kernels_alone_on_cpu(tmp_path):
    """gpu_decide.py on each committed suite folder; and where the latency stage left nothing (skipped by the
    budget), the kernels' decisions still come out instead of a bare 'latency.json not found'."""
    gd = _load(BENCH / "gpu_decide.py")
    runs = sorted((BENCH / "results" / "gpu").glob("*_suite"))
    assert len(runs) >= 4
    for run in runs:
        kern = run / "kernels.json"
        rows = gd.decisions(json.loads((run / "latency.json").read_text()),
                            json.loads(kern.read_text()) if kern.is_file() else None)
        assert len(rows) >= 7 and all(len(r) == 3 for r in rows), run
    (tmp_path / "kernels.json").write_text((runs[-1] / "kernels.json").read_text())
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_decide.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    verdicts = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[-1].rstrip(" |")
                for line in proc.stdout.splitlines()[2:]}
    assert verdicts["default backend triton (cuda opt-in)"] == "keep triton"
    assert verdicts["AMPHISTA_TREE_MERGE=auto"] == "not measured"          # said 'keep auto' on no numbers
    assert "latency rows read 'not measured'" in proc.stderr
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_decide.py"), str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "neither" in proc.stderr


# ---- a NaN mid-answer, plain and Amphista, greedy and sampled; on the GPU under CUDA graphs ------------------
NAN_RUN = r'''
import sys
import torch
from amphista_engine import Engine
from amphista_engine.errors import NonFiniteError
from amphista_engine.heads import random_heads

path, device = sys.argv[1], sys.argv[2]


def engine():
    eng = Engine.from_pretrained(path, device=device, dtype="float32", max_seq_len=256)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1).to(device))
    return eng


def replays(eng):
    return eng.graphs.stats.replays if getattr(eng, "graphs", None) is not None else 0


eng, fresh = engine(), engine()
w = eng.model.layers[0].attention_norm.weight
keep = w.detach().clone()
for spec in (None, "amphista"):
    for kw in ({}, dict(temperature=0.7, top_p=0.9, seed=1)):
        run = dict(chat=False, speculative=spec, **kw)
        # the second run: on CUDA the first one times the routed products' GEMMs (kernels/linear_choice.py)
        want = [fresh.generate("Hello there", max_new_tokens=24, **run).token_ids for _ in range(2)][1]
        for _ in range(2):            # with graphs: the second run replays what the first one warmed up
            got = eng.generate("Hello there", max_new_tokens=24, **run).token_ids
            assert got == want or kw, (spec, kw, got, want)      # seeded sampling: eager and replays may differ
        before = replays(eng)
        stream = eng.stream("The quick brown fox", max_new_tokens=40, **run)
        next(stream)
        with torch.no_grad():
            w.fill_(float("nan"))     # in place: the captured graphs read it at their next replay
        try:
            for _ in stream:
                pass
            raise AssertionError(f"no NonFiniteError ({spec}, {kw})")
        except NonFiniteError as err:
            assert "not finite" in str(err), err
        finally:
            with torch.no_grad():
                w.copy_(keep)
        if device != "cpu" and not kw:
            assert replays(eng) > before, "the NaN run replayed no graph"
        assert eng.last_result is None
        out = eng.generate("Hello there", max_new_tokens=24, **run)
        assert kw or out.token_ids == want, (spec, kw, "after", out.token_ids, want)
        assert all(0 <= t < eng.model.config.vocab_size for t in out.token_ids)
        print("ok", spec, kw)
torch.cuda.synchronize() if device != "cpu" else None
print("ALL OK")
'''


def _nan_run(tiny_hf_dir, device, tmp_path):
    script = tmp_path / "nan_run.py"
    script.write_text(NAN_RUN)
    # A subprocess: were NaN probabilities still handed to multinomial, CUDA's device-side assert would end the
    # context of this test worker and fail every later test on it.
    proc = subprocess.run([sys.executable, str(script), str(tiny_hf_dir), device], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=_env())
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_non_finite_logits_stop_a_graph_replayed_run_by_name(tiny_hf_dir, tmp_path):
    """On CUDA (graphs on, the default backend) a step whose logits turn NaN mid-answer stops the run with a
    NonFiniteError, plain and Amphista, greedy and sampled (top_p: the sort path GPUs take), and the next run on the
    engine decodes as a fresh engine does (the caches cleared without breaking the captured graphs)."""
    _nan_run(tiny_hf_dir, "cuda", tmp_path)


def test_non_finite_logits_stop_a_run_by_name_on_cpu(tiny_hf_dir, tmp_path):
    """The GPU test's script on the CPU: what it asserts holds where it can be checked without a GPU."""
    _nan_run(tiny_hf_dir, "cpu", tmp_path)

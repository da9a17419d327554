"""What `pip install .`, a wheel or an sdist carries, and how setup.py reacts to its environment switches.

No wheel is built here (the CUDA extension alone takes minutes): setuptools' own listings (egg_info's SOURCES.txt,
the sdist's contents; build_py's output, the wheel's Python part) are checked against what the code reads at run
time and what CMake compiles. setup.py runs in a subprocess or through runpy with setup() stubbed out, so nothing
is written into the checkout.
"""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

import amphista_engine
from amphista_engine import cli
from amphista_engine.evaluation import env
from amphista_engine.shipped_heads import SHIPPED
from amphista_engine.training.data import EVAL_HASHES

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "amphista_engine"


@pytest.fixture(scope="module")
def listings(tmp_path_factory):
    """(files the sdist holds, files build_py puts in the wheel), both relative to the project root."""
    tmp = tmp_path_factory.mktemp("pkg")
    egg, lib = tmp / "egg", tmp / "lib"
    egg.mkdir()
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg),
                           "build_py", "--build-lib", str(lib)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AMPHISTA_NO_CUDA": "1", "AMPHISTA_NO_CPU_EXT": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sources = {line.strip() for line in (egg / "amphista_engine.egg-info" / "SOURCES.txt").read_text().splitlines()}
    wheel = {str(p.relative_to(lib)) for p in lib.rglob("*") if p.is_file()}
    return sources, wheel


def test_sdist_holds_what_the_cuda_build_compiles(listings):
    """setuptools puts the CPU extension's sources in the sdist by itself, but not CMake's: without MANIFEST.in
    a wheel built from the sdist (what `python -m build` does) failed wherever nvcc exists, with "The source
    directory ... does not appear to contain CMakeLists.txt"."""
    sources, _ = listings
    needed = {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md"}
    needed |= {str(p.relative_to(ROOT)) for ext in ("cu", "cuh", "h", "cpp") for p in (ROOT / "csrc").rglob(f"*.{ext}")}
    assert any(n.endswith(".cu") for n in needed)
    assert sorted(needed - sources) == []


def test_every_file_read_at_run_time_is_package_data(listings):
    """The shipped heads (--heads default and the Medusa ones), the held-out prompt hashes and the Triton kernels
    are read next to the installed modules: each must be in both the sdist and the wheel."""
    sources, wheel = listings
    read = [p for methods in SHIPPED.values() for d in methods.values() for p in d.iterdir() if p.is_file()]
    read += [EVAL_HASHES] + list((PKG / "kernels" / "triton_kernels").glob("*.py"))
    assert len(read) > 5
    rel = {str(p.resolve().relative_to(ROOT)) for p in read}
    assert sorted(rel - sources) == []
    assert sorted(rel - wheel) == []


def _setup_module(monkeypatch):
    """setup.py's globals, with setup() stubbed (setup.py imports it from setuptools at run time)."""
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    return runpy.run_path(str(ROOT / "setup.py"), run_name="amphista_setup")


@pytest.mark.parametrize("value, archs", [("90", "90"), ("8.0 9.0", "80;90"), ("80,90a", "80;90a"), ("", "80;90"),
                                          ("sm_90", "90"), ("sm_80;sm_90", "80;90"), ("compute_90", "90-virtual"),
                                          ("native", "native"), ("all-major", "all-major")])
def test_cuda_arch_spellings(monkeypatch, value, archs):
    """nvcc's spelling ("sm_90", as the README writes the arch) and CMake's own words were refused."""
    monkeypatch.setenv("AMPHISTA_CUDA_ARCH", value)
    assert _setup_module(monkeypatch)["cuda_archs"]() == archs


@pytest.mark.parametrize("value", ["abc", ";", "9", "1000", "sm90x"])
def test_bad_cuda_arch_is_named(monkeypatch, value):
    monkeypatch.setenv("AMPHISTA_CUDA_ARCH", value)
    cuda_archs = _setup_module(monkeypatch)["cuda_archs"]
    with pytest.raises(SystemExit) as err:
        cuda_archs()
    assert f"AMPHISTA_CUDA_ARCH={value!r}" in str(err.value.code) and "'80;90'" in str(err.value.code)


def test_setup_runs_without_pybind11(monkeypatch):
    """`pip install --no-build-isolation` with no pybind11 died with a raw ModuleNotFoundError even where both
    extensions are skipped; now only a CPU build that runs needs it, and says so (AMPHISTA_CPU_OPTIONAL=1: skip)."""
    monkeypatch.setitem(sys.modules, "pybind11", None)
    monkeypatch.delenv("AMPHISTA_NO_CPU_EXT", raising=False)
    monkeypatch.delenv("AMPHISTA_CPU_OPTIONAL", raising=False)
    mod = _setup_module(monkeypatch)
    ext = mod["cpu_extension"]()
    cmd = mod["CMakeBuild"](setuptools.Distribution())
    cmd._failed, cmd.compiler = [], None
    with pytest.raises(RuntimeError, match="pybind11 is not importable"):
        cmd._build_cpu(ext)
    monkeypatch.setenv("AMPHISTA_CPU_OPTIONAL", "1")
    cmd._build_cpu(ext)
    assert cmd._failed == [ext]


def test_version_has_one_home_and_the_cli_prints_it(capsys):
    tomllib = pytest.importorskip("tomllib")     # Python >= 3.11; the package supports 3.10
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "amphista_engine.__version__"}
    with pytest.raises(SystemExit) as err:
        cli.main(["--version"])
    assert err.value.code == 0
    assert capsys.readouterr().out.strip() == f"amphista {amphista_engine.__version__}"


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, tmp_path, capsys):
    """matplotlib is an extra (`plot`), not a dependency: `--plot` ran the whole eval or bench first, then died
    with a ModuleNotFoundError traceback."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["1+1?"]}) + "\n")
    missing = str(tmp_path / "no-such-model")
    assert cli.main(["eval", "--questions", str(questions), "--methods", "ar", "--model", missing, "--plot",
                     "--out", str(tmp_path / "ev")]) == 2
    assert cli.main(["bench", "--model", missing, "--plot", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("--plot needs matplotlib" in line for line in err), err


def test_commit_is_unknown_for_a_package_inside_another_git_tree(monkeypatch, tmp_path):
    """Installed into a venv inside another project's git tree, eval and bench records named that project's
    HEAD as the engine's commit."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    subprocess.run(git + ["-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "other"], check=True)
    fake = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages" / "amphista_engine" / "evaluation"
    fake.mkdir(parents=True)
    monkeypatch.setattr(env, "__file__", str(fake / "env.py"))
    assert env.commit() == "unknown"


def test_commit_in_the_checkout():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert env.commit() == head.stdout.strip()


def test_build_switches_read_as_the_run_time_ones(monkeypatch):
    """setup.py took AMPHISTA_NO_CUDA etc. as on only when exactly "1": AMPHISTA_NO_CUDA=true built CUDA anyway (for
    minutes), as the run-time switches (env_settings.py) once read their own ways. Now one spelling set, and a typo
    stops the build by name."""
    flag = _setup_module(monkeypatch)["flag"]
    for word, on in (("", False), ("0", False), ("off", False), (" No ", False), ("1", True), ("true", True),
                     ("YES", True), ("on", True)):
        monkeypatch.setenv("AMPHISTA_NO_CUDA", word)
        assert flag("AMPHISTA_NO_CUDA") is on, word
    monkeypatch.setenv("AMPHISTA_NO_CUDA", "ture")
    with pytest.raises(SystemExit) as err:
        flag("AMPHISTA_NO_CUDA")
    assert "AMPHISTA_NO_CUDA='ture'" in str(err.value.code)

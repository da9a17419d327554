"""Builds the optional extensions (metadata: pyproject.toml): amphista_engine._C (CUDA kernels, through CMake)
and amphista_engine._cpu (CPU kernels, csrc/cpu, by the host C++ compiler).

Environment:
  AMPHISTA_NO_CUDA=1          skip the CUDA extension.
  AMPHISTA_NO_CPU_EXT=1       skip the CPU extension (the CPU then runs the torch reference ops).
  AMPHISTA_CPU_OPTIONAL=1     a failed CPU extension build warns and installs without it.
  AMPHISTA_CUDA_ARCH="80;90"  target architectures, CMake style ("8.0 9.0", "80,90", "sm_90", "native" work too).
  AMPHISTA_CUDA_OPTIONAL=1    a failed CUDA build warns and installs without it.
  CUDA_HOME / CUDA_PATH       toolkit to use; else nvcc on PATH; else /usr/local/cuda.

Policy: no nvcc at all means the user has no CUDA toolchain, so we skip with one line and the
package falls back to its pure-Python paths (the same for the CPU extension without a C++ compiler).
A build that *fails* with the compiler present is a real bug (wrong arch, broken toolkit) that would
otherwise surface much later as a silent slowdown, so it fails the install unless
AMPHISTA_CUDA_OPTIONAL=1 / AMPHISTA_CPU_OPTIONAL=1 says a fallback is acceptable.
pip hides build output unless run with -v, so the skip/warning lines show with `pip install -v`.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import CompileError, LinkError
except ImportError:                                   # setuptools < 59
    from distutils.errors import CompileError, LinkError

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH = "80;90"


def flag(name: str) -> bool:
    """A build switch, spelt as the package's run-time switches are (amphista_engine/env_settings.py, which setup.py
    cannot import): 1/true/yes/on, 0/false/no/off, any case; unset or empty: off. A typo stops the build: a
    misspelt AMPHISTA_NO_CUDA=ture compiled for minutes, then failed where the user meant to skip it."""
    word = os.environ.get(name, "").strip().lower()
    if word in ("", "0", "false", "no", "off"):
        return False
    if word in ("1", "true", "yes", "on"):
        return True
    sys.exit(f"amphista-engine: {name}={os.environ[name]!r}: use 1/true/yes/on or 0/false/no/off")


def find_nvcc():
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cand = Path(os.environ[env]) / "bin" / "nvcc"
            if cand.is_file():
                return str(cand)
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    cand = Path("/usr/local/cuda/bin/nvcc")
    return str(cand) if cand.is_file() else None


CMAKE_ARCH_WORDS = ("native", "all", "all-major")     # CMake (>= 3.24) resolves these itself


def cuda_archs():
    """AMPHISTA_CUDA_ARCH normalised to CMake's list form: "8.0, 9.0a" -> "80;90a"; nvcc's spelling too, as
    the README's "sm_90" invites: "sm_90" -> "90", "compute_90" -> "90-virtual"."""
    raw = os.environ.get("AMPHISTA_CUDA_ARCH", "").strip() or DEFAULT_ARCH
    if raw.lower() in CMAKE_ARCH_WORDS:
        return raw.lower()
    archs = [re.sub(r"^compute_(.+)$", r"\1-virtual", re.sub(r"^sm_", "", a.replace(".", "").lower()))
             for a in re.split(r"[;,\s]+", raw) if a]
    bad = [a for a in archs if not re.fullmatch(r"\d{2,3}[af]?(-real|-virtual)?", a)]
    if bad or not archs:
        sys.exit(f"amphista-engine: AMPHISTA_CUDA_ARCH={raw!r} is not a list of CUDA architectures like '80;90' "
                 f"(bad: {', '.join(bad) or 'none given'}); one of {', '.join(CMAKE_ARCH_WORDS)} also works")
    return ";".join(archs)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])  # CMake owns the sources


def cpu_extension():
    """amphista_engine._cpu: one translation unit, no libtorch, no -march (the hot loops carry their own
    AVX2 / AVX-512 variants, csrc/cpu/common.h). No -ffast-math and no FMA contraction: a sum's order is part
    of the result. -fno-trapping-math lets loops with selects (clamps, NaN checks) vectorise; it changes no
    value."""
    try:
        import pybind11
        include = [pybind11.get_include()]
    except ImportError:     # without build isolation: only a build that is not skipped needs it (_build_cpu)
        include = []

    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.h"))
    # OpenMP (libgomp.so.1, the soname torch's CPU wheels load: one thread pool for both); macOS's clang has none
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    return Extension("amphista_engine._cpu", sources=["csrc/cpu/bindings.cpp"], depends=headers,
                     include_dirs=include, language="c++",
                     extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off", "-fno-trapping-math",
                                         "-fvisibility=hidden", "-pthread"] + openmp,
                     extra_link_args=["-pthread"] + openmp)


def cpu_skip_reason(compiler) -> str | None:
    if flag("AMPHISTA_NO_CPU_EXT"):
        return "AMPHISTA_NO_CPU_EXT=1"
    if os.name != "posix":
        return "the CPU extension is built with GCC or Clang on Linux and macOS only"
    cxx = getattr(compiler, "compiler_cxx", None) or getattr(compiler, "compiler_so", None) or []
    if cxx and shutil.which(cxx[0]) is None:
        return f"no C++ compiler ({cxx[0]} not found)"
    return None


class CMakeBuild(build_ext):
    def run(self):
        skip = None
        if flag("AMPHISTA_NO_CUDA"):
            skip = "AMPHISTA_NO_CUDA=1"
        elif find_nvcc() is None:
            skip = "nvcc not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)"
        if skip:
            print(f"amphista-engine: {skip}: skipping the CUDA extension amphista_engine._C", flush=True)
            # nothing to build, copy in place, or list as an output for it
            self.extensions = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
        self._failed = []
        if self.extensions:
            super().run()

    def build_extensions(self):
        super().build_extensions()
        # Drop the ones that failed under AMPHISTA_CUDA_OPTIONAL=1 / AMPHISTA_CPU_OPTIONAL=1 (or were skipped),
        # so that neither the editable
        # copy-in-place nor the wheel looks for their missing .so.
        self.extensions = [e for e in self.extensions if e not in self._failed]

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return self._build_cpu(ext)
        try:
            self._cmake_build(ext)
        except (subprocess.CalledProcessError, OSError) as err:
            if not flag("AMPHISTA_CUDA_OPTIONAL"):
                raise RuntimeError(
                    f"amphista-engine: CUDA extension build failed ({err}); fix the toolkit or set "
                    "AMPHISTA_NO_CUDA=1 (skip) or AMPHISTA_CUDA_OPTIONAL=1 (skip on failure)") from err
            print(f"amphista-engine: WARNING: CUDA extension build failed ({err}); installing without it",
                  flush=True)
            self._failed.append(ext)

    def _build_cpu(self, ext):
        skip = cpu_skip_reason(self.compiler)
        if skip:
            print(f"amphista-engine: {skip}: skipping the CPU extension amphista_engine._cpu", flush=True)
            self._failed.append(ext)
            return
        if not ext.include_dirs:
            return self._cpu_failed(ext, "pybind11 is not importable here: pip install pybind11, or build with "
                                         "build isolation (no --no-build-isolation)")
        try:
            super().build_extension(ext)
        except (CompileError, LinkError, OSError) as err:
            if "-fopenmp" in ext.extra_compile_args:     # e.g. clang without libomp: the kernels then run on one thread
                print(f"amphista-engine: WARNING: the CPU extension did not build with OpenMP ({err}); building it "
                      "without (single-threaded kernels)", flush=True)
                ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
                ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
                return self._build_cpu(ext)
            self._cpu_failed(ext, err)

    def _cpu_failed(self, ext, err):
        if not flag("AMPHISTA_CPU_OPTIONAL"):
            raise RuntimeError(
                f"amphista-engine: CPU extension build failed ({err}); fix that or set "
                "AMPHISTA_NO_CPU_EXT=1 (skip) or AMPHISTA_CPU_OPTIONAL=1 (skip on failure)")
        print(f"amphista-engine: WARNING: CPU extension build failed ({err}); installing without it", flush=True)
        self._failed.append(ext)

    def _cmake_build(self, ext):
        # get_ext_fullpath is the build dir for wheels and, for editable installs, the file that
        # setuptools copies into amphista_engine/, where `import amphista_engine._C` finds it.
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
            f"-DAMPHISTA_CUDA_ARCH={cuda_archs()}",
            f"-DPython_EXECUTABLE={sys.executable}",  # the pybind11/headers of *this* interpreter
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            config += ["-G", "Ninja"]
        subprocess.run(config, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("amphista_engine._C"), cpu_extension()], cmdclass={"build_ext": CMakeBuild})

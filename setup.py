"""Builds the optional CUDA extension amphista_engine._C through CMake (metadata: pyproject.toml).

Environment:
  AMPHISTA_NO_CUDA=1          skip the extension (pure-Python install).
  AMPHISTA_CUDA_ARCH="80;90"  target architectures, CMake style ("8.0 9.0" and "80,90" work too).
  AMPHISTA_CUDA_OPTIONAL=1    a failed CUDA build warns and installs without it.
  CUDA_HOME / CUDA_PATH       toolkit to use; else nvcc on PATH; else /usr/local/cuda.

Policy: no nvcc at all means the user has no CUDA toolchain, so we skip with one line and the
package falls back to its pure-Python paths. A build that *fails* with nvcc present is a real bug
(wrong arch, broken toolkit) that would otherwise surface much later as a silent slowdown, so it
fails the install unless AMPHISTA_CUDA_OPTIONAL=1 says a fallback is acceptable.
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

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH = "80;90"


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


def cuda_archs():
    """AMPHISTA_CUDA_ARCH normalised to CMake's list form: "8.0, 9.0a" -> "80;90a"."""
    raw = os.environ.get("AMPHISTA_CUDA_ARCH", "").strip() or DEFAULT_ARCH
    archs = [a.replace(".", "") for a in re.split(r"[;,\s]+", raw) if a]
    bad = [a for a in archs if not re.fullmatch(r"\d{2,3}[af]?(-real|-virtual)?", a)]
    if bad or not archs:
        sys.exit(f"amphista-engine: AMPHISTA_CUDA_ARCH={raw!r} is not a list like '80;90' (bad: {bad})")
    return ";".join(archs)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])  # CMake owns the sources


class CMakeBuild(build_ext):
    def run(self):
        skip = None
        if os.environ.get("AMPHISTA_NO_CUDA") == "1":
            skip = "AMPHISTA_NO_CUDA=1"
        elif find_nvcc() is None:
            skip = "nvcc not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)"
        if skip:
            print(f"amphista-engine: {skip}: skipping the CUDA extension amphista_engine._C", flush=True)
            self.extensions = []  # nothing to build, copy in place, or list as an output
            return
        self._failed = []
        super().run()

    def build_extensions(self):
        super().build_extensions()
        # Drop the ones that failed under AMPHISTA_CUDA_OPTIONAL=1, so that neither the editable
        # copy-in-place nor the wheel looks for their missing .so.
        self.extensions = [e for e in self.extensions if e not in self._failed]

    def build_extension(self, ext):
        try:
            self._cmake_build(ext)
        except (subprocess.CalledProcessError, OSError) as err:
            if os.environ.get("AMPHISTA_CUDA_OPTIONAL") != "1":
                raise RuntimeError(
                    f"amphista-engine: CUDA extension build failed ({err}); fix the toolkit or set "
                    "AMPHISTA_NO_CUDA=1 (skip) or AMPHISTA_CUDA_OPTIONAL=1 (skip on failure)") from err
            print(f"amphista-engine: WARNING: CUDA extension build failed ({err}); installing without it",
                  flush=True)
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


setup(ext_modules=[CMakeExtension("amphista_engine._C")], cmdclass={"build_ext": CMakeBuild})

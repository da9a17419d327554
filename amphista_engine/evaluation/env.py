"""Honest clocks (synchronised, warmed up, median of repeats) and where a measurement came from."""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import torch


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Within the block, os.environ[name] = value (None: left as it is); restored after. For side-by-side rows
    of a mode an environment switch selects."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def sync(device):
    """Wait for queued device work, so a host clock reads the time the work really took."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device) -> float:
    sync(device)
    return time.perf_counter()


def median_ms(fn, device, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def hardware(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def commit() -> str:
    """The checkout's short HEAD; "unknown" for an installed package, even one in a venv inside another
    project's git tree (git would answer with that project's HEAD)."""
    checkout = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=checkout, timeout=10)
        top, _, head = out.stdout.strip().partition("\n")
        return head.strip() if top and Path(top).resolve() == checkout and head.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device) -> dict:
    from ..kernels import get_backend
    return {"date": str(date.today()), "commit": commit(), "torch": torch.__version__,
            "device": str(device), "hardware": hardware(device), "kernels": get_backend(device)}

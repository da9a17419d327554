"""Does speculative decoding pay on this machine? A measured answer for `--speculative auto`.

A speculative step verifies a whole tree, so it costs more than a plain step; it pays only when the heads
emit more tokens per step (tau) than that cost ratio. On a GPU the ratio is ~1.2-1.3 for 64 nodes
(benchmarks/results/gpu), far below any useful tau. On a CPU it depends on the machine: with AMX a 16-node bf16
verification costs about one plain step, while on an AVX2-only AMD EPYC a 16-node step measured ~5 plain steps
in bf16 (no bf16 units), ~2.4-2.6 in fp32 through MKL and ~1.6-2.0 with oneDNN-packed fp32 weights (2026-12-03,
benchmarks/results/cpu_fp32_pack_ab.md), against the shipped heads' tau of ~2.1. So on the CPU we time both steps
on the loaded model and compare the ratio with the tau the heads were measured to reach on this tree
(`tree-search` stores it in their config), discounted for the gap between held-out data and real prompts.
The two step times persist between processes (`costs_file`), so each machine pays the ~3 s once per setup.
Output is the same either way (greedy: identical tokens; sampling: the same distribution), only speed differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from .errors import InputError
from .evaluation.env import hardware

# The two step times are kept between processes (the verdict is not: it is weighed afresh against the heads'
# tau), keyed by everything that sets them: CPU, threads, torch, dtype, packing, model and heads shapes, tree.
# AMPHISTA_CACHE_DIR=DIR keeps them in DIR, =off measures in every process.
CACHE_ENV = "AMPHISTA_CACHE_DIR"
COSTS_FILE = "step_costs.json"

# MT-Bench tau / held-out decoding tau of the shipped heads (benchmarks/results/TRAINING.md, 25th session):
# 2.506 / 2.704 on mix-64. A verdict on held-out numbers alone would favour speculation ~8% too often.
HELD_OUT_DISCOUNT = 0.9


@dataclass
class SpeculationCheck:
    pays: bool
    tree: str
    reason: str
    plain_ms: float | None = None
    step_ms: float | None = None
    expected_tau: float | None = None
    measured_on: str | None = None      # the date the step times were measured, when they came from the cache

    @property
    def step_ratio(self) -> float | None:
        return None if self.plain_ms is None else self.step_ms / self.plain_ms


def expected_tau(heads_config, tree: str) -> float | None:
    """The decoding tau `tree-search` replayed for `tree` on the heads' held-out split, if it was recorded."""
    extra = getattr(heads_config, "extra", None) or {}
    for key in ("tree_search_mix", "tree_search"):
        tau = (extra.get(key) or {}).get("decoding_tau", {}).get(tree)
        if tau:
            return float(tau)
    return None


def check_speculation(engine, tree=None, prompt_tokens: int = 128, repeats: int = 9,
                      warmup: int = 2) -> SpeculationCheck:
    """Whether the loaded heads, on `tree` (None: the engine's default for the device), decode faster than
    plain steps here. Times `repeats` steps of each after `warmup` on a random prompt (a few seconds on a CPU,
    once per machine and setup: the times persist in `costs_file()`)."""
    if engine.heads is None:
        raise InputError("speculation_check needs drafting heads: Engine.load_heads(DIR)")
    spec = engine._tree_spec(tree)
    if engine.device.type != "cpu":
        return SpeculationCheck(True, spec.name, "on a GPU a tree step costs ~1.2-1.3 plain steps (measured on "
                                "an H200): speculation pays whenever the heads accept anything")
    tau = expected_tau(engine.heads.config, spec.name)
    if tau is None:
        return SpeculationCheck(True, spec.name, f"the heads record no measured tau for tree {spec.name!r}, "
                                "so there is nothing to weigh the step cost against: speculating as asked")
    # The timed steps must fit the cache after the prompt: each adds up to depth + 1 tokens, plus the tree's slots.
    room = (warmup + repeats + 1) * (spec.max_depth + 1) + spec.num_nodes
    prompt_tokens = min(prompt_tokens, engine.max_seq_len - room)
    if prompt_tokens < 16:
        return SpeculationCheck(True, spec.name, f"the cache (max_seq_len={engine.max_seq_len}) is too small to "
                                "time a tree step: speculating as asked")
    file, key = costs_file(), cost_key(engine, spec, prompt_tokens)
    cached = _read_costs(file).get(key) if file else None
    if not (isinstance(cached, dict) and all(isinstance(cached.get(k), (int, float)) and cached[k] > 0
                                             for k in ("plain_ms", "step_ms"))):
        cached = None                    # absent, or an entry edited into nonsense: measure again
    if cached:
        plain_ms, step_ms, measured_on = cached["plain_ms"], cached["step_ms"], str(cached.get("date", "earlier"))
    else:
        plain_ms, step_ms = _time_steps(engine, spec, prompt_tokens, prompt_tokens + room, repeats, warmup)
        measured_on = None
        if file:
            _write_cost(file, key, {"plain_ms": plain_ms, "step_ms": step_ms, "date": str(date.today())})
    ratio, tau_here = step_ms / plain_ms, tau * HELD_OUT_DISCOUNT
    pays = tau_here > ratio
    reason = (f"a {spec.name} step costs {ratio:.2f} plain steps here ({step_ms:.0f} vs {plain_ms:.0f} ms"
              + (f", measured {measured_on}, kept in {file}" if cached else "") + ") and "
              f"these heads emit ~{tau_here:.2f} tokens per step on it ({tau:.2f} on held-out data, "
              f"x{HELD_OUT_DISCOUNT}): " + ("speculation is faster" if pays else "plain decoding is faster"))
    return SpeculationCheck(pays, spec.name, reason, plain_ms, step_ms, tau, measured_on)


def _time_steps(engine, spec, prompt_tokens: int, cache_len: int, repeats: int,
                warmup: int) -> tuple[float, float]:
    """Median ms of a plain step and of a speculative step on `spec` after a random prompt, the two timed in
    turn (each on its own cache of cache_len slots), so a slow spell of the machine hits both alike."""
    from .evaluation.env import sync
    from .generation import PlainDecoder
    from .kv_cache import KVCache
    from .sampling import SamplingParams
    from .speculative import SpeculativeDecoder

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.config.vocab_size, (prompt_tokens,), generator=g).tolist()
    def cache():
        return KVCache.for_model(engine.config, 1, cache_len, engine.dtype, engine.device)

    greedy = SamplingParams()
    times = {}
    with torch.inference_mode():
        decoders = {"plain": PlainDecoder(engine.model, cache(), greedy),
                    "tree": SpeculativeDecoder(engine.model, cache(), engine.heads, spec, greedy)}
        for dec in decoders.values():
            dec.prefill([prompt])
        for i in range(warmup + repeats):
            for name, dec in decoders.items():
                sync(engine.device)
                t = time.perf_counter()
                out, count = dec.step()
                count.tolist()
                out.tolist()
                if i >= warmup:
                    times.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
    return statistics.median(times["plain"]), statistics.median(times["tree"])


def costs_file() -> Path | None:
    """Where step times persist: $AMPHISTA_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, /amphista-engine;
    None when AMPHISTA_CACHE_DIR=off."""
    where = os.environ.get(CACHE_ENV, "").strip()
    if where.lower() in ("off", "0", "none"):
        return None
    base = Path(where) if where else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "amphista-engine"
    return base.expanduser() / COSTS_FILE


def cost_key(engine, spec, prompt_tokens: int) -> str:
    """Everything a plain and a tree step's time depend on (not the heads' weights or tau: they set neither)."""
    from . import __version__
    heads = {k: v for k, v in engine.heads.config.to_dict().items() if k != "extra"}
    tree = [spec.name, spec.num_nodes, spec.max_depth, None if spec.static is None else spec.static.parent.tolist()]
    parts = {"cpu": hardware("cpu"), "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
             "engine": __version__, "dtype": str(engine.dtype), "packed": bool(getattr(engine, "cpu_packed", False)),
             "model": engine.config.to_dict(), "heads": heads, "tree": tree, "prompt": prompt_tokens}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_costs(file: Path) -> dict:
    try:
        costs = json.loads(file.read_text())
    except (OSError, ValueError):       # none yet, unreadable or corrupt: measure (and rewrite it)
        return {}
    return costs if isinstance(costs, dict) else {}


def _write_cost(file: Path, key: str, entry: dict):
    """Best effort: a read-only or full disk costs the next process a measurement, nothing more."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        costs = _read_costs(file)
        costs[key] = entry
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(costs, indent=1))
        os.replace(tmp, file)            # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass

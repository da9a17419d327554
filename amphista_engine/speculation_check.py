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

Which tree, when none is named: on a CPU, verification grows with the node count, so the best tree is
machine-dependent (AVX2 fp32, end to end: 8 nodes 1.29x over plain decoding, 4 nodes 1.23x, 16 nodes 1.14x, 32
nodes 0.98x, benchmarks/results/cpu_tree_size_ab.md; AMX bf16: 16 nodes cost ~1 plain step, so bigger trees pay).
The trees the heads record a held-out tau for (`tree-search`: fitted static trees such as mix-4/8/16/32/64,
and dynamic-N trees replayed from the heads' scores) are climbed by size: the smallest few are timed, and while
the largest timed one wins, the next size up is timed too. The tree with the highest discounted tau per unit of
step cost is used.
A batch is weighed at its own size: B rows verify B trees, and on a CPU the costs do not scale alike. A plain
step's B rows ride on the same weight reads (4-bit: the kernel pays per block of 4 rows), a tree step's B x N
rows are compute: on the AMX Xeon a 4-bit batch of 4 on the default tree (mix-4) ran 0.66x plain batch decoding
end to end, MT-Bench (benchmarks/results/cpu_batch_drop_ab.md), where one row runs faster speculatively. So a
batch's verdict times both steps at its size (B <= MAX_TIMED_BATCH; larger batches are weighed at that size: the
tree step's rows only grow dearer relative to plain steps), on one K/V buffer for all the timed steps.
Output is the same either way (greedy: identical tokens; sampling: the same distribution), only speed differs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import numbers
import statistics
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch

from . import timing_cache
from .async_api import stop_point
from .errors import AmphistaError, InputError
from .evaluation.env import hardware
from .values import is_real

# The two step times are kept between processes (the verdict is not: it is weighed afresh against the heads'
# tau), keyed by everything that sets them: CPU, threads, torch, dtype, packing, quant, the decode attention path,
# model and heads shapes, tree.
# AMPHISTA_CACHE_DIR=DIR keeps them in DIR, =off measures in every process (timing_cache.py).
CACHE_ENV = timing_cache.CACHE_ENV
COSTS_FILE = "step_costs.json"
# Part of every cost key: bump it when a change moves plain or tree step times, so timings kept from older code
# are not reused (2: the CPU's ordered attention reads the cache in place, 2026-12-03; 3: the cpu kernel
# backend's attention, 2026-12-04, on top of the backend's name in the key; 4: the cpu backend's 4-bit products
# and decoder stack, 2026-12-04; 5: AVX2 products and attention, the heads' AEB stack call and int8 ResBlocks,
# 2026-12-04; 6: the AVX2 products' prefetch and thread threshold, attention's row runs, 2026-12-04; 7: the heads
# score only the tree's depth from the accepted rows, 2026-12-06; 8: steps timed in settled blocks, 2026-12-07).
COSTS_REVISION = 8

# MT-Bench tau / held-out decoding tau of the shipped heads (benchmarks/results/TRAINING.md, 25th session):
# 2.506 / 2.704 on mix-64. A verdict on held-out numbers alone would favour speculation ~8% too often.
HELD_OUT_DISCOUNT = 0.9
# A sampled answer keeps only part of greedy's extra tokens per step: lossless rejection sampling accepts a draft
# with the target's probability of it, not with certainty. (temperature, share kept at top_p 1, at top_p 0.9) of
# (tau - 1): the mean over the shipped Amphista heads' dynamic-4/8/16 trees on held-out training prompts
# (benchmarks/results/sampled_tau; the trees spread by +-0.04). At 0.3 sampling kept 1.06-1.12: counted as 1.
# Between rows: linear; past the last: its slope, down to nothing kept.
SAMPLED_KEPT = ((0.0, 1.0, 1.0), (0.3, 1.0, 1.0), (0.7, 0.86, 0.95), (1.0, 0.57, 0.77))
# A penalty moves the target off the tokens the heads learnt to guess: the share of greedy's (tau - 1) kept at each
# penalty, measured alone (benchmarks/results/cpu_penalties_ab.md: the shipped Amphista heads, 4-bit SmolLM2,
# mix-4, 16 MT-Bench first turns, greedy; tau 1.664 without a penalty). (value, share kept) rows per penalty, off
# first; between rows linear, past the last its slope down to nothing kept. Penalties that favour repeats (a
# repetition_penalty below 1, negative presence/frequency) count as off: a conservative guess.
PENALTY_KEPT = {"repetition_penalty": ((1.0, 1.0), (1.1, 0.80), (1.3, 0.46)),
                "presence_penalty": ((0.0, 1.0), (0.8, 0.87)),
                "frequency_penalty": ((0.0, 1.0), (0.5, 0.83))}
# The gain a verdict needs before it speculates: a thinner one is within the check's noise. On the 2-core AMX Xeon
# (2026-12-07) the settled blocks (SETTLE_MS) priced 4-bit dynamic-4 / dynamic-8 steps at 2.29-2.37 / 2.97-3.33
# plain steps against 2.13-2.30 / 2.85-3.10 in two sets of runs, bf16's at 1.21 / 1.26-1.27 against 1.18 / 1.22;
# the heads' discounted tau came out 2-7% under the runs'. (Timed one step in turn, it priced 4-bit dynamic-4 at
# 1.76, speculated on a predicted 1.02x and ran 0.88x: benchmarks/results/cpu_q4_ab_amx/.)
MIN_GAIN = 1.05
# How many of the heads' recorded trees (smallest first) are timed before climbing to bigger ones.
FIRST_TIMED = 3
# A step's time depends on what ran just before it: a 4-bit SmolLM2 plain step on the 2-core AMX Xeon took 5.8 ms
# right after tree steps, falling over ~12 plain steps (~60 ms) to the 4.5 ms it keeps in a run; timing one step of
# each decoder in turn, the check priced a dynamic-4 step at 1.76-1.86 plain steps where runs paid 2.06-2.17
# (2026-12-07). Other work did the same (a 64 MB fp32 product: 9.5 ms, then ~5 steps to settle), and so did 50 ms
# idle (7.0 ms): as if the 98 MB of 4-bit weights, which this CPU's L3 holds, had to come back into it. bf16 steps
# showed no such drift. So each decoder runs a block of consecutive steps, the first ones untimed until SETTLE_MS
# have passed (at most SETTLE_STEPS, fewer where the cache has no room), in ROUNDS rounds.
SETTLE_MS = 60.0
SETTLE_STEPS = 16
ROUNDS = 3
# Times taken while other processes kept this process' CPUs busy are used for the run at hand but not kept: kept,
# they priced every later run on a machine that was busy once (2026-12-07: with test jobs beside it on the 2-core
# Xeon the check timed a 4-bit plain step at 20.1 ms, 4.5 ms alone, and the file kept that). The share of the CPUs
# this process may run on that other processes (and a VM's steal) used while the steps were timed, from /proc/stat.
BUSY_SHARE = 0.25
# s: an engine keeps a verdict timed on busy CPUs this long, then times again (a server's first check, taken while
# another process ran, otherwise priced every request of its life)
BUSY_KEEP_S = 600.0
# Batches past this are timed at this size (module doc): bounds the timing's cost and the number of cached keys.
MAX_TIMED_BATCH = 8


@dataclass
class SpeculationCheck:
    pays: bool
    tree: str
    reason: str
    plain_ms: float | None = None
    step_ms: float | None = None
    expected_tau: float | None = None
    measured_on: str | None = None      # the date the step times were measured, when they came from the cache
    compared: dict | None = None        # tree -> {"nodes", "step_ratio", "expected_tau", "speedup"}: the trees weighed
    busy_since: float | None = None     # time.monotonic() of a verdict timed on busy CPUs (kept BUSY_KEEP_S)

    def to_dict(self) -> dict:
        return {"pays": self.pays, "tree": self.tree, "reason": self.reason, "plain_ms": self.plain_ms,
                "step_ms": self.step_ms, "measured_on": self.measured_on, "compared": self.compared}

    @property
    def step_ratio(self) -> float | None:
        return None if self.plain_ms is None else self.step_ms / self.plain_ms


def sampled_share(temperature: float = 0.0, top_p: float = 1.0, min_p: float = 0.0) -> float:
    """The share of greedy decoding's extra tokens per step (tau - 1) that sampling at these settings keeps
    (SAMPLED_KEPT); 1.0 for greedy decoding. top_p below 0.9 counts as 0.9 (a narrower nucleus keeps more: a
    conservative guess), top_k is not weighed (no narrower than the full distribution: also conservative). A min_p
    of 0.05 or more counts as top_p 0.9, below it in proportion: on dynamic-8 it kept more than top_p 0.9 does
    (T 1.0: 0.79 at min_p 0.05, 0.87 at 0.1; T 0.7: 0.95 at 0.1; benchmarks/results/sampled_tau_min_p)."""
    if temperature <= 0:
        return 1.0
    # 0 at top_p 1 and min_p 0, 1 at top_p 0.9 and below or min_p 0.05 and above
    nucleus = min(max((1.0 - top_p) / 0.1, min_p / 0.05, 0.0), 1.0)
    return _along([(t, at_1 + (at_09 - at_1) * nucleus) for t, at_1, at_09 in SAMPLED_KEPT], temperature)


def penalty_share(repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0) -> float:
    """The share of greedy decoding's extra tokens per step (tau - 1) that decoding under these penalties keeps
    (PENALTY_KEPT): each penalty's share, multiplied (measured one at a time; together they were not). 1.0 without
    penalties."""
    share = 1.0
    for name, value in (("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty)):
        rows = PENALTY_KEPT[name]
        if value > rows[0][0]:          # off, or favouring repeats: nothing taken
            share *= _along(rows, value)
    return share


def _along(points, x: float) -> float:
    """The measured (x, share) points read at x: linear between them, past the last its slope, down to nothing."""
    for lo, hi in zip(points, points[1:]):
        if x <= hi[0]:
            return lo[1] + (hi[1] - lo[1]) * ((x - lo[0]) / (hi[0] - lo[0]))
    lo, hi = points[-2], points[-1]
    return max(0.0, hi[1] + (hi[1] - lo[1]) / (hi[0] - lo[0]) * (x - hi[0]))


def _recorded_taus(heads_config, key: str) -> dict:
    """The heads' `key` record's {tree: decoding tau}; {} where there is none, or it is no mapping (a config edited
    by hand: "auto" then weighs the other record, or none, rather than failing every run with an AttributeError)."""
    extra = getattr(heads_config, "extra", None)
    record = extra.get(key) if isinstance(extra, dict) else None
    taus = record.get("decoding_tau") if isinstance(record, dict) else None
    return taus if isinstance(taus, dict) else {}


def expected_tau(heads_config, tree: str) -> float | None:
    """The decoding tau `tree-search` replayed for `tree` on the heads' held-out split, if it was recorded."""
    for key in ("tree_search_mix", "tree_search"):
        tau = _recorded_taus(heads_config, key).get(tree)
        # a positive finite number only: "abc" or [2] raised from every "auto" run, NaN made the pick hang on the
        # trees' order, inf (or a negative tau) decided the verdict by itself; such a tree counts as unrecorded
        if is_real(tau) and tau > 0:
            return float(tau)
    return None


def candidate_trees(engine) -> list:
    """The trees to choose from on a CPU when none is named, as TreeSpecs sorted by node count: every tree the
    heads record a decoding tau for (their preferred tree-search record, see expected_tau) that the heads can
    draft, less those another tree beats on both counts (as many nodes or fewer, as high a tau or higher).
    A dynamic tree may beat a static one: on the CPU its per-step build is native and its step measured no
    dearer (dynamic-8 6% faster than mix-8 end to end, benchmarks/results/cpu_dynamic_tree_native)."""
    config = engine.heads.config
    record = next((taus for k in ("tree_search_mix", "tree_search") if (taus := _recorded_taus(config, k))), {})
    from .kernels import cpu_exact, cpu_packed
    specs = []
    for name in record:
        try:
            spec = engine._tree_spec(name)
        except AmphistaError:      # a recorded name this engine cannot build (deeper than the heads): skip it
            continue
        # and only trees the CPU's position-ordered verification takes (bf16 refuses bigger ones)
        if spec.max_depth <= cpu_exact.MAX_DEPTH and spec.num_nodes <= cpu_packed.CHUNKED_UP_TO:
            specs.append(spec)
    tau = {s.name: expected_tau(engine.heads.config, s.name) for s in specs}
    specs = [s for s in specs if tau[s.name]]
    def beats(o, s):     # as few nodes or fewer, as high a tau or higher, and not the same on both
        return (o.num_nodes <= s.num_nodes and tau[o.name] >= tau[s.name]
                and (o.num_nodes, tau[o.name]) != (s.num_nodes, tau[s.name]))
    keep = [s for s in specs if not any(beats(o, s) for o in specs)]
    return sorted(keep, key=lambda s: (s.num_nodes, s.name))


def timed_batch(batch: int) -> int:
    """The batch size a batch of `batch` rows is weighed at (module doc). A batch is a whole number of rows, at
    least one: int() took 0 or -3 as one row, 2.5 as two and "3" as three, and None failed as a TypeError."""
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise InputError(f"batch must be the number of rows decoded at once (an integer >= 1), got "
                         f"{type(batch).__name__} {batch!r}")
    return min(int(batch), MAX_TIMED_BATCH)


def check_speculation(engine, tree=None, prompt_tokens: int = 128, repeats: int = 9, warmup: int = 2,
                      temperature: float = 0.0, top_p: float = 1.0, batch: int = 1,
                      min_p: float = 0.0, penalties: tuple = (1.0, 0.0, 0.0)) -> SpeculationCheck:
    """Whether the loaded heads, on `tree`, decode faster than plain steps here. tree=None on a CPU: the heads'
    fitted tree that decodes fastest here (`candidate_trees`, climbed by size), or the engine's default tree
    where the heads record none. Times `repeats` steps of each on a random prompt, in blocks of consecutive steps
    whose first `warmup` or more are untimed (_time_steps; a few seconds on a CPU, once per machine and setup: the
    times persist in `costs_file()`). temperature / top_p / min_p: the sampling the runs will use; the heads'
    greedy tau is weighed down by what sampling keeps of it (sampled_share). penalties: the runs'
    (repetition_penalty, presence_penalty, frequency_penalty), which weigh it down too (penalty_share). batch: the
    rows the runs decode at once (timed_batch of them are timed)."""
    if engine.heads is None:
        raise InputError('speculation_check needs drafting heads: engine.load_heads("default") for the shipped ones, '
                         'or engine.load_heads(DIR)')
    tree = None if tree == "auto" else tree
    timed_batch(batch)                   # refuses a bad batch on any device
    spec = engine._tree_spec(tree, batch)
    if engine.device.type != "cpu":
        from .speculative import GPU_ROWS
        # past GPU_ROWS // 4 rows even the smallest tree's rows exceed the bound: it said they were kept within it
        within = (f"keeping its {batch} x {spec.num_nodes} verified rows within ~{GPU_ROWS}, where"
                  if batch * spec.num_nodes <= GPU_ROWS else
                  f"the smallest batch tree: its {batch} x {spec.num_nodes} verified rows are past the ~{GPU_ROWS} up "
                  "to which")
        rows = (f"; a batch of {batch} rows gets {spec.name}, {within} the products stay bound by reading the "
                "weights (a roofline bound, not yet measured)" if tree is None and batch * 64 > GPU_ROWS else "")
        return SpeculationCheck(True, spec.name, "on a GPU a tree step costs ~1.2-1.3 plain steps (measured on "
                                "an H200 for one row): speculation pays whenever the heads accept anything" + rows)
    candidates = (candidate_trees(engine) if tree is None else []) or [spec]
    taus = {c.name: expected_tau(engine.heads.config, c.name) for c in candidates}
    if taus[candidates[0].name] is None:
        return SpeculationCheck(True, spec.name, f"the heads record no measured tau for tree {spec.name!r}, "
                                "so there is nothing to weigh the step cost against: using the heads untimed")
    candidates, settle, prompt_tokens = _timing_plan(engine.max_seq_len, candidates, prompt_tokens, repeats, warmup)
    if not candidates:
        return SpeculationCheck(True, spec.name, f"the cache (max_seq_len={engine.max_seq_len}) is too small to "
                                "time a tree step: using the heads untimed")
    room = _room_for(candidates, settle, repeats, warmup)
    batch = timed_batch(batch)
    file = costs_file()
    costs = timing_cache.read(file) if file else {}
    times = {}                       # tree -> (plain_ms, step_ms, date measured or None)
    busy = []                        # other processes' share of the CPUs while steps were timed, where > BUSY_SHARE

    def measure(specs):
        keys = {c.name: cost_key(engine, c, prompt_tokens, batch) for c in specs}
        for c in specs:
            e = costs.get(keys[c.name])
            if isinstance(e, dict) and all(is_real(e.get(k)) and e[k] > 0     # not inf, NaN or a bool
                                           for k in ("plain_ms", "step_ms")):
                times[c.name] = (e["plain_ms"], e["step_ms"], str(e.get("date", "earlier")))
        todo = [c for c in specs if c.name not in times]     # absent, or an entry edited into nonsense
        if todo:
            before = cpu_ticks()
            plain_ms, step_ms = _time_steps(engine, todo, prompt_tokens, prompt_tokens + room, repeats, warmup,
                                            batch, settle)
            share = others_share(before, cpu_ticks())
            if share is not None and share > BUSY_SHARE:
                busy.append(share)
            for c in todo:
                times[c.name] = (plain_ms, step_ms[c.name], None)
                if file and not busy:
                    entry = {"plain_ms": plain_ms, "step_ms": step_ms[c.name], "date": str(date.today())}
                    timing_cache.write(file, {keys[c.name]: entry})

    sampled_kept = sampled_share(temperature, top_p, min_p)
    penalised = penalty_share(*penalties)
    share = sampled_kept * penalised

    def tau_here(c):
        return 1 + (taus[c.name] * HELD_OUT_DISCOUNT - 1) * share

    def speedup(c):
        plain_ms, step_ms, _ = times[c.name]
        return tau_here(c) * plain_ms / step_ms

    n = min(FIRST_TIMED, len(candidates))       # heads that record two trees time both
    measure(candidates[:n])
    best = max(candidates[:n], key=speedup)
    while best is candidates[n - 1] and n < len(candidates):     # the biggest timed tree wins: try the next size
        measure(candidates[n:n + 1])
        n += 1
        best = max(candidates[:n], key=speedup)
    plain_ms, step_ms, measured_on = times[best.name]
    tau = taus[best.name]
    ratio = step_ms / plain_ms
    gain = tau_here(best) / ratio
    pays = gain >= MIN_GAIN
    # what weighs the tau down, each named only where it does: "presence 0, frequency 0" beside a repetition penalty
    # read as if they counted, and a temperature 0.3 (which keeps it all) as if it shared the cut
    in_force = [f"{name} {value:g}" for name, value, off in zip(("repetition", "presence", "frequency"), penalties,
                                                                  (1.0, 0.0, 0.0)) if value > off]
    weighed = ([f"sampling at temperature {temperature:g}" + (f", top_p {top_p:g}" if top_p < 1 else "")
                + (f", min_p {min_p:g}" if min_p > 0 else "")] if sampled_kept != 1.0 else []) \
        + ([f"penalties ({', '.join(in_force)})"] if penalised != 1.0 else [])
    verb = "keeps" if penalised == 1.0 else "keep"        # "sampling ... keeps", "penalties ... keep"
    sampled = f", {' and '.join(weighed)} {verb} {share:.0%} of the tokens past the first" if share != 1.0 else ""
    # a batch past MAX_TIMED_BATCH shares this verdict: a batch of 20 was told only "for a batch of 8 rows"
    rows = (f" for a batch of {batch} rows" + (" (larger batches are weighed at this size)"
                                                if batch == MAX_TIMED_BATCH else "")) if batch > 1 else ""
    reason = ((f"of the heads' trees ({', '.join(c.name for c in candidates[:n])} timed), {best.name} comes "
               "out best here: " if n > 1 else "")
              + f"a {best.name} step costs {ratio:.2f} plain steps here{rows} ({step_ms:.1f} vs {plain_ms:.1f} ms"
              + (f", measured {measured_on}, kept in {file}" if measured_on else "")
              + (f"; other processes kept {max(busy):.0%} of this process' CPUs busy meanwhile, so these times are "
                 "not kept" if busy and not measured_on else "") + ") and "
              f"these heads emit ~{tau_here(best):.2f} tokens per step on it ({tau:.2f} greedy on held-out data, "
              f"x{HELD_OUT_DISCOUNT}{sampled}): " + ("speculation is faster" if pays else
                                                      "plain decoding is faster" if gain <= 1 else
                                                      f"speculation would gain {gain:.2f}x, under the {MIN_GAIN}x the "
                                                      "timed steps must show (a thinner gain is within their noise): "
                                                      "plain decoding"))
    compared = {c.name: {"nodes": c.num_nodes, "step_ratio": round(times[c.name][1] / times[c.name][0], 3),
                         "expected_tau": taus[c.name], "speedup": round(speedup(c), 3)} for c in candidates[:n]}
    return SpeculationCheck(pays, best.name, reason, plain_ms, step_ms, tau, measured_on, compared,
                            time.monotonic() if busy else None)


def _room_for(specs, settle: int, repeats: int, warmup: int) -> int:
    """Cache slots the timed steps of the biggest of `specs` take after the prompt: each step adds up to depth + 1
    tokens, plus the tree's slots."""
    rounds, per_round = _blocks(repeats)
    return max((rounds * (max(warmup, settle) + per_round) + 1) * (c.max_depth + 1) + c.num_nodes for c in specs)


def _timing_plan(max_seq_len: int, specs: list, prompt_tokens: int, repeats: int, warmup: int):
    """(the trees of `specs` that can be timed in a cache of max_seq_len, untimed steps each block may take, prompt
    length): trees too big to time are left out (rather than timing none and speculating untimed); the rest keep
    at least 16 prompt tokens and as many settling steps as fit (up to SETTLE_STEPS)."""
    specs = [c for c in specs if max_seq_len - _room_for([c], 0, repeats, warmup) >= 16]
    settle = SETTLE_STEPS
    while specs and settle > warmup and max_seq_len - _room_for(specs, settle, repeats, warmup) < 16:
        settle -= 1
    prompt = min(prompt_tokens, max_seq_len - _room_for(specs, settle, repeats, warmup)) if specs else 0
    return specs, settle, prompt


def _blocks(repeats: int) -> tuple[int, int]:
    """(rounds, timed steps per round) for `repeats` timed steps of each decoder: up to ROUNDS rounds."""
    per_round = -(-max(1, repeats) // ROUNDS)
    return -(-max(1, repeats) // per_round), per_round


def _time_steps(engine, specs: list, prompt_tokens: int, cache_len: int, repeats: int,
                warmup: int, batch: int = 1, settle_steps: int = None) -> tuple[float, dict]:
    """Median ms of a plain step and of a speculative step on each tree of `specs` after a random prompt.
    Each decoder runs in turn a block of consecutive steps, as a run's steps follow their own kind (ROUNDS rounds of
    such blocks): its first steps, at least `warmup` and then up to `settle_steps` (SETTLE_STEPS) until SETTLE_MS
    have passed, are not timed, then `repeats` / rounds steps are (see SETTLE_MS for why).
    Returns (plain_ms, {tree name: step_ms}), a tree's step_ms being plain_ms times the median of its per-round
    ratios to the plain step: a slow spell of the machine hits both steps of a round alike (on the noisy 2-core VM
    pairing the rounds halved the run-to-run spread of the 8-node ratio). batch: rows per step (the same prompt in
    each: a row's cost does not depend on its tokens)."""
    from .evaluation.env import sync
    from .generation import PlainDecoder
    from .kv_cache import KVCache
    from .sampling import SamplingParams
    from .speculative import SpeculativeDecoder

    settle_steps = SETTLE_STEPS if settle_steps is None else settle_steps
    rounds, per_round = _blocks(repeats)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.config.vocab_size, (prompt_tokens,), generator=g).tolist()
    # One K/V buffer for all the timed decoders, each with its own lengths: a CPU cache carries ~1k scratch slots
    # (cpu_exact.scratch_slots), so a cache each for the plain step and three trees at 8 rows took 2.3 GB on
    # SmolLM2-135M (twice its own batch-8 cache at max_seq_len 2048; ~26 GB for Llama-2-7B in bf16), unchecked.
    # Every decoder prefills the same prompt and runs in turn on this thread, so a slot another one rewrote holds
    # the finite K/V of some token: a step's cost does not depend on which (only the tokens accepted differ).
    shared = KVCache.for_model(engine.config, batch, cache_len, engine.dtype, engine.device)

    def cache():
        own = copy.copy(shared)
        own.length = torch.zeros_like(shared.length)
        return own

    def step_ms(dec) -> float:
        stop_point()        # an async call cancelled during the timing stops here, not after the whole timing
        sal = getattr(getattr(dec, "heads", None), "sal_cache", None)
        if sal is not None:
            # The timed trees share the heads and their SAL cache: each would add its accepted tokens to the one
            # length, past the cache's end where they accept much (an IndexError mid-check). Each step starts from
            # its own decoder's length instead; the entries it reads cost the same whichever.
            sal.length[:batch] = dec.cache.length[:batch]
        sync(engine.device)
        t = time.perf_counter()
        out, count = dec.step()
        count.tolist()
        out.tolist()
        return (time.perf_counter() - t) * 1e3

    greedy = SamplingParams()
    times = {}
    with torch.inference_mode():
        decoders = {None: PlainDecoder(engine.model, cache(), greedy)}
        decoders.update({s.name: SpeculativeDecoder(engine.model, cache(), engine.heads, s, greedy) for s in specs})
        for dec in decoders.values():
            dec.prefill([prompt] * batch)
        for _ in range(rounds):
            for name, dec in decoders.items():
                began, untimed = time.perf_counter(), 0
                while untimed < warmup or (untimed < settle_steps
                                           and time.perf_counter() - began < SETTLE_MS / 1e3):
                    step_ms(dec)
                    untimed += 1
                times.setdefault(name, []).append(statistics.median(step_ms(dec) for _ in range(per_round)))
        del decoders
    plain = times.pop(None)
    plain_ms = statistics.median(plain)
    return plain_ms, {name: plain_ms * statistics.median(a / b for a, b in zip(t, plain)) for name, t in times.items()}


def cpu_ticks() -> tuple[float, int, int, int] | None:
    """(now in clock ticks, busy ticks of the CPUs this process may run on, this process' own ticks, how many CPUs
    those are), from /proc (Linux); None elsewhere."""
    import os
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name in cpus:
                    ticks = [int(x) for x in fields[:8]]        # user nice system idle iowait irq softirq steal
                    busy += sum(ticks) - ticks[3] - ticks[4]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()     # the name in () may hold spaces
        # utime + stime: every thread of the process
        return time.monotonic() * os.sysconf("SC_CLK_TCK"), busy, int(own[11]) + int(own[12]), len(cpus)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def others_share(before, after) -> float | None:
    """The share of this process' CPUs that other processes (and a VM's steal) used between two cpu_ticks()
    readings; None where unknown or too short to tell (under 20 ticks of those CPUs)."""
    if before is None or after is None or after[3] != before[3]:
        return None
    span = (after[0] - before[0]) * after[3]
    if span < 20:
        return None
    return min(1.0, max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / span)


def costs_file() -> Path | None:
    """Where step times persist (timing_cache.py); None when AMPHISTA_CACHE_DIR=off."""
    return timing_cache.path(COSTS_FILE)


def cost_key(engine, spec, prompt_tokens: int, batch: int = 1) -> str:
    """Everything a plain and a tree step's time depend on (not the heads' weights or tau: they set neither)."""
    from . import __version__
    from .kernels import get_backend
    heads = {k: v for k, v in engine.heads.config.to_dict().items() if k != "extra"}
    tree = [spec.name, spec.num_nodes, spec.max_depth, None if spec.static is None else spec.static.parent.tolist()]
    # Position-ordered decode attention (bf16, 4-bit, AMPHISTA_EXACT_GREEDY=1 in fp32; off with
    # model.ordered_attention = False) takes another path through every step: ~8% of a step in fp32.
    ordered = engine.model.orders_decode(
        SimpleNamespace(k=torch.empty(0, dtype=engine.dtype, device=engine.device)))
    parts = {"cpu": hardware("cpu"), "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
             "engine": __version__, "revision": COSTS_REVISION, "dtype": str(engine.dtype),
             "packed": bool(getattr(engine, "cpu_packed", False)),
             "quant": getattr(engine, "quant", "none"), "kernels": get_backend("cpu"),
             "model": engine.config.to_dict(), "heads": heads,
             "tree": tree, "prompt": prompt_tokens, "ordered": ordered}
    if batch > 1:            # absent for one row: the times kept before batches were weighed stay valid
        parts["batch"] = batch
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

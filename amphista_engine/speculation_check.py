"""Does speculative decoding pay on this machine? A measured answer for `--speculative auto`.

A speculative step verifies a whole tree, so it costs more than a plain step; it pays only when the heads
emit more tokens per step (tau) than that cost ratio. On a GPU the ratio is ~1.2-1.3 for 64 nodes
(benchmarks/results/gpu), far below any useful tau. On a CPU it depends on the machine: with AMX a 16-node bf16
verification costs about one plain step, while on an AVX2-only AMD EPYC a 16-node step measured ~5 plain steps
in bf16 (no bf16 units), ~2.4 in fp32 through MKL and ~1.5-1.8 with oneDNN-packed fp32 weights (2026-12-03,
benchmarks/results/cpu_fp32_pack_ab.md), against the shipped heads' tau of ~2.1. So on the CPU we time both steps
on the loaded model and compare the ratio with the tau the heads were measured to reach on this tree
(`tree-search` stores it in their config), discounted for the gap between held-out data and real prompts.
Output is the same either way (greedy: identical tokens; sampling: the same distribution), only speed differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .evaluation.env import median_ms

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


def check_speculation(engine, tree=None, prompt_tokens: int = 128, repeats: int = 5,
                      warmup: int = 2) -> SpeculationCheck:
    """Whether the loaded heads, on `tree` (None: the engine's default for the device), decode faster than
    plain steps here. Times `repeats` steps of each after `warmup` on a random prompt (a few seconds on a CPU)."""
    from .generation import PlainDecoder
    from .sampling import SamplingParams
    from .speculative import SpeculativeDecoder

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
    cache = engine._cache_for(1)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, engine.config.vocab_size, (prompt_tokens,), generator=g).tolist()
    greedy = SamplingParams()

    def timed(dec) -> float:
        dec.prefill([prompt])

        def step():
            out, count = dec.step()
            count.tolist()
            out.tolist()
        return median_ms(step, engine.device, repeats, warmup)

    with torch.inference_mode():
        plain_ms = timed(PlainDecoder(engine.model, cache, greedy))
        step_ms = timed(SpeculativeDecoder(engine.model, cache, engine.heads, spec, greedy))
    ratio, tau_here = step_ms / plain_ms, tau * HELD_OUT_DISCOUNT
    pays = tau_here > ratio
    reason = (f"a {spec.name} step costs {ratio:.2f} plain steps here ({step_ms:.0f} vs {plain_ms:.0f} ms) and "
              f"these heads emit ~{tau_here:.2f} tokens per step on it ({tau:.2f} on held-out data, "
              f"x{HELD_OUT_DISCOUNT}): " + ("speculation is faster" if pays else "plain decoding is faster"))
    return SpeculationCheck(pays, spec.name, reason, plain_ms, step_ms, tau)

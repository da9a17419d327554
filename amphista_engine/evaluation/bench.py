"""`amphista bench`: prefill and per-step latency of plain decoding and of one speculative step per tree size.

A speculative step (draft + tree + verify + accept + commit) costs more than a plain step; the ratio is the
break-even tau: the tree pays off only when the heads emit more tokens per step than that. Given a measured
tau (`--tau`, or an `amphista eval` summary.json), the step time turns into the tokens/s it would give.

Random heads are enough for timing on a GPU: a step costs the same whatever is accepted (up to the commit copy
of the few accepted K/V entries). Not on a CPU, where the heads run on as many of the D + 1 path rows as some row
accepted (speculative.py): on a random prompt steps accept about nothing, so the step timed here is the cheapest
one and break-even tau comes out low; the log says so. Timing is honest: warm-up calls first, device-synchronised host clocks around
every timed call, the median of repeats, and each timed step includes the host read of its tokens, which the
real decoding loop does every step.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch

from ..errors import CacheFullError, ConfigError, InputError
from ..text_files import read_utf8
from ..values import is_real
from .env import environment, median_ms

DEFAULT_TREES = ("chain-4", "dynamic-8", "tree-16", "dynamic-16", "tree-32", "dynamic-32", "mc_sim_7b_63",
                 "dynamic-64")


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def parse_tau(tau) -> dict[str, float] | None:
    """None | 2.5 | "2.5" (both methods) | "medusa=2.1,amphista=2.6" | path to an eval summary.json."""
    return parse_tau_source(tau)[0]


def parse_tau_source(tau) -> tuple[dict[str, float] | None, dict | None]:
    """parse_tau's taus and, for a summary.json, where they come from: {"file", "tree": {method: tree}, "model"
    (where the summary names it)}. A tau holds for the tree it was measured on; the tree is None where the summary
    does not say (older runs on the default tree)."""
    source = None
    if tau is None or tau == "":
        return None, None
    if is_real(tau):
        value = float(tau)
        out = {"medusa": value, "amphista": value}
    elif Path(str(tau)).suffix == ".json" or Path(str(tau)).is_file():
        path = Path(str(tau))
        if not path.is_file():
            raise InputError(f"--tau: summary file not found: {path}")
        not_summary = f"--tau: {path} is not an `amphista eval` summary.json"
        try:
            summary = json.loads(read_utf8(path))
            overall = summary["overall"]
            overall.items()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise InputError(f"{not_summary} (no 'overall' section)") from None
        if "kind" in summary:        # eval-tau's result: one method, tau at the top of 'overall'
            raise InputError(f"{not_summary} but an `amphista eval-tau` result; pass its tau as "
                             f"--tau {summary['kind']}={overall.get('tau')}")
        out = {}
        for m, s in overall.items():
            if m not in ("medusa", "amphista"):
                continue
            tau_m = s.get("tau") if isinstance(s, dict) else None
            # eval's tau where no answer took a decoding step (every one ended at once): null, 0.0 in older summaries
            no_step = is_real(tau_m) and float(tau_m) == 0.0 or tau_m is None and isinstance(s, dict) \
                and s.get("decoding_steps") == 0
            if no_step:
                shown = "null" if tau_m is None else tau_m
                raise InputError(f"--tau: {path} measured no tau for {m} (overall.{m}.tau is {shown}: none of its "
                                 f"answers took a decoding step); rerun eval with a larger --max-new-tokens")
            if not is_real(tau_m):
                raise InputError(f"{not_summary} (overall.{m}.tau is {tau_m!r}, not a number)")
            out[m] = float(tau_m)
        if not out:
            raise InputError(f"--tau: {path} has no medusa or amphista results")
        meta = summary.get("meta") if isinstance(summary.get("meta"), dict) else {}
        used = meta.get("tree_used") if isinstance(meta.get("tree_used"), dict) else {}
        source = {"file": str(path), "tree": {m: used.get(m) or meta.get("tree") for m in out}}
        if isinstance(meta.get("model"), str):      # heads reach a tau on their own target only
            source["model"] = meta["model"]
    else:
        out = {}
        # X alone holds for both methods; nan and inf are no tau
        parts = [f"medusa={tau}", f"amphista={tau}"] if "=" not in str(tau) else str(tau).split(",")
        for part in parts:
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in ("medusa", "amphista") or not value.strip():
                raise InputError(f"--tau: expected X, medusa=X,amphista=Y or a summary.json, got {tau!r}")
            if name in out:
                raise InputError(f"--tau: {name} is given twice in {tau!r}")
            try:
                out[name] = float(value)
            except ValueError:
                out[name] = math.nan
            if not math.isfinite(out[name]):
                raise InputError(f"--tau: {value.strip()!r} is not a number (in {tau!r})")
    bad = {m: v for m, v in out.items() if v < 1.0}
    if bad:
        raise InputError(f"--tau must be >= 1 (plain decoding emits 1 token per forward), got {bad}")
    return out, source


def _check_prompt_tokens(prompt_tokens: int, cfg, name: str):
    """A prompt past the positions the model was trained on times nothing it would serve, and its one-forward
    prefill (a T x T mask and scores) grows quadratically: --prompt-tokens 100000 on the tiny shape was killed by
    the kernel's OOM killer, with no message, instead of refused."""
    trained = cfg.max_position_embeddings
    if prompt_tokens > trained and not cfg.rope_scaling:
        raise InputError(f"--prompt-tokens {prompt_tokens} is past the {trained} positions {name} was trained on; "
                         f"use at most {trained}")


def bench_heads(heads, methods, model, no_checkpoint: bool) -> dict:
    """{method: (directory, HeadsConfig)} of the real heads to time, read (not loaded) before the model: their
    head count and fitted trees size the cache and name the trees. Methods not given time random heads."""
    from ..heads.checkpoint import read_heads_config
    from ..shipped_heads import heads_dir
    real = {}
    for m, given in (heads or {}).items():
        if given is None or (given == "none" and not Path(given).exists()):     # none: random heads, as unset
            continue
        if m not in methods:
            raise InputError(f"--heads-{m} is given, but bench times only {', '.join(methods) or 'no method'}")
        if no_checkpoint:
            raise InputError(f"--heads-{m} needs a --model checkpoint: heads are trained for one target, and "
                             "--random-weights has none (bench times random heads there)")
        # a directory, `default` or a shipped heads name, as generate's --heads and eval's --heads-X take them
        path = heads_dir(given, model, f"--heads-{m}", method=m)
        directory, hc = read_heads_config(path)
        if hc.kind != m:
            raise InputError(f"--heads-{m} {given} holds {hc.kind} heads, not {m} heads")
        real[m] = (directory, hc)
    return real


def load_target(model=None, random_weights: bool = False, shape: str | None = None, device="cpu",
                dtype=torch.float32, max_seq_len: int = 2048, allow_large: bool = False, quant: str = "none"):
    """(Transformer, display name): a checkpoint, or random weights of a named shape (no tokenizer needed); a
    checkpoint loads with `quant` as Engine.from_pretrained loads it (loading.load_model)."""
    if random_weights:
        from ..kv_cache import KVCache
        from .shapes import random_model, shape_config
        if not shape:
            raise InputError("--random-weights needs --shape (one of the shapes listed in --help)")
        # The RoPE table (built with the model) and the cache scale with max_seq_len: refuse before either.
        KVCache.check_fits(shape_config(shape), 1, max_seq_len, dtype, device)
        return random_model(shape, device, dtype, max_seq_len, allow_large=allow_large), f"random {shape}"
    if shape:
        raise InputError("--shape only applies with --random-weights")
    from ..loading import load_model
    return load_model(model, dtype=dtype, device=device, max_seq_len=max_seq_len, quant=quant).model, str(model)


def run_bench(model: str | None = "smollm2-135m", random_weights: bool = False, shape: str | None = None,
              device=None, dtype=None, trees=DEFAULT_TREES, prompt_tokens: int = 256, repeats: int = 10,
              warmup: int = 2, tau=None, num_heads: int = 4, methods=("medusa", "amphista"), plot: bool = False,
              out="bench_results", allow_large: bool = False, target=None, log=_log, draft_vocab=(0,),
              cuda_graphs: bool = True, quant: str = "auto", heads: dict | None = None) -> dict:
    """heads: {method: heads directory or "default" (the heads shipped for `model`)} to time those heads (their
    head count, draft vocabulary and fitted trees, e.g. mix-4) instead of random heads of `num_heads`."""
    from ..cuda_graphs import DecodeGraphs
    from ..generation import PlainDecoder
    from ..kernels.linear_setup import LinearSetup
    from ..kv_cache import KVCache
    from ..loading import parse_device, parse_dtype
    from ..sampling import SamplingParams
    from ..speculative import SpeculativeDecoder, TreeSpec
    from .shapes import random_heads      # built on the device: 7B-shaped Amphista heads are ~0.7 B parameters

    device = parse_device(device)
    dtype = parse_dtype(dtype, device)
    trees = [t.strip() for t in (trees.split(",") if isinstance(trees, str) else trees) if t.strip()]
    if not trees:
        raise InputError("--trees is empty")
    for name, value in (("prompt-tokens", prompt_tokens), ("repeats", repeats), ("num-heads", num_heads)):
        if value < 1:
            raise InputError(f"--{name} must be a positive integer, got {value}")
    if warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {warmup}")
    methods = list(methods)
    unknown = [m for m in methods if m not in ("medusa", "amphista")]
    if unknown:
        raise InputError(f"unknown method(s) {unknown}; bench times medusa and amphista steps")
    from ..cli import _ascii        # int() reads any script's digits ("٣" as 3): ASCII ones only, as cli._int
    from ..training.trainer import check_draft_vocab     # train's rule, checked before any load
    try:
        draft_vocabs = [int(_ascii(v) if isinstance(v, str) else v)
                        for v in (draft_vocab.split(",") if isinstance(draft_vocab, str) else draft_vocab)]
    except ValueError:
        raise InputError(f"--draft-vocab must be a comma list of integers, got {draft_vocab!r}") from None
    if not draft_vocabs:
        raise InputError(f"--draft-vocab sizes must be >= 0 (0 = full vocabulary), got {draft_vocab!r}")
    for v in draft_vocabs:
        check_draft_vocab(v)
    if out is not None:
        if Path(out).exists() and not Path(out).is_dir():     # mkdir's own error says only "File exists"
            raise InputError(f"--out {out} is a file; give a folder for the bench's .json and .md")
        Path(out).mkdir(parents=True, exist_ok=True)    # a bad --out fails now, not after the timing
    if plot and out is None:
        raise InputError("--plot needs --out DIR")
    if plot:
        from .plots import check_plotting
        check_plotting()
    taus, tau_source = parse_tau_source(tau)
    if random_weights and not shape:      # load_target says so too, but after a "loading random None" line
        raise InputError("--random-weights needs --shape (one of the shapes listed in --help)")
    real = bench_heads(heads, methods, model, random_weights)
    def head_count(m):
        return real[m][1].num_heads if m in real else num_heads

    def fitted(m):          # trees `tree-search --save` fitted to real heads (mix-4, tuned-63, ...)
        return real[m][1].extra.get("trees") if m in real else None

    # unknown or too-deep trees fail before loading. A tree fitted to one method's real heads (mix-4) is timed
    # for that method only: the other method's heads (random, or real without it) have no such tree.
    specs, method_trees = [], {m: [] for m in methods}
    for m in methods:
        for t in trees:
            try:
                specs.append(TreeSpec(t, head_count(m), "cpu", fitted(m)))
            except ConfigError:
                if not any(t in (fitted(o) or {}) for o in methods if o != m):
                    raise
                log(f"{m}: no tree {t!r} (fitted to the other method's heads only): not timed for {m}")
                continue
            method_trees[m].append(t)
    # The cache must hold the prompt, every timed step's tokens and the largest tree's scratch slots.
    steps = 2 * (max(warmup, 3) + repeats) + 2    # graphed pass, then the eager phase split, each warmed up
    max_seq_len = (prompt_tokens + steps * (max(map(head_count, methods), default=num_heads) + 1)
                   + max((s.num_nodes for s in specs), default=1) + 256)

    try:
        if target is None:
            log(f"loading {'random ' + str(shape) if random_weights else model} on {device} ({dtype}) ...")
            # quant as the Engine loads with it: a Q4_K_M-like file's wider layers are int8 rows only when the
            # loader makes them so; floats then quantize_linears timed a float model where the Engine runs codes
            target, name = load_target(model, random_weights, shape, device, dtype, max_seq_len, allow_large,
                                       quant=quant)
        else:
            name = str(model or "model")
            KVCache.check_fits(target.config, 1, max_seq_len, dtype, device)
            target.setup_rope(max(max_seq_len, target.rope_len))
    except CacheFullError as e:     # max_seq_len is derived here: name the flag that sets it
        raise CacheFullError(f"--prompt-tokens {prompt_tokens}: {str(e).removesuffix('; lower max_seq_len')} "
                             "(the cache holds the prompt, every timed step and the largest tree); "
                             "lower --prompt-tokens") from None
    _check_prompt_tokens(prompt_tokens, target.config, name)    # after the cache's check, before the prefill
    # The linears run as the Engine runs them on this device (packed for oneDNN on a CPU, ...).
    # The target is this run's alone: as Engine.from_pretrained's, each float weight is held once (packed).
    linears = LinearSetup.for_device(device, dtype, quant, free_floats=True)
    linears = linears.resolved(linears.apply(target))
    cfg = target.config
    if max(draft_vocabs) > cfg.vocab_size:
        raise InputError(f"--draft-vocab {max(draft_vocabs)} exceeds the vocabulary ({cfg.vocab_size})")
    prompt = torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    cache = KVCache.for_model(cfg, 1, max_seq_len, dtype, device)
    greedy = SamplingParams()

    def read(out, count):       # the host loop reads both every step; count it in every timing
        count.tolist()
        out.tolist()

    # Steps timed as the Engine runs them: replayed from CUDA graphs on a GPU (off on the CPU). The first
    # steps of each configuration warm up eagerly and capture, so they stay out of the timings.
    graphs = DecodeGraphs(enabled=cuda_graphs)
    if graphs.enabled and device.type == "cuda":
        warmup = max(warmup, 3)

    with torch.inference_mode():
        plain = graphs.attach(PlainDecoder(target, cache, greedy))
        prefill_ms = median_ms(lambda: plain.prefill([prompt]).tolist(), device, repeats, warmup)
        plain.prefill([prompt])
        plain_ms = median_ms(lambda: read(*plain.step()), device, repeats, warmup)
        log(f"prefill {prompt_tokens} tok: {prefill_ms:.2f} ms | plain step: {plain_ms:.3f} ms")
        if device.type == "cpu":
            log("note: on a CPU the heads run on the accepted rows only; these steps (a random prompt) accept about "
                "none, so a speculative step here is its cheapest and the break-even tau a lower bound")
        rows = [{"method": "plain", "tree": "-", "nodes": 1, "depth": 0, "step_ms": round(plain_ms, 4),
                 "break_even_tau": 1.0, "tokens_per_s": round(1e3 / plain_ms, 2)}]
        from ..heads.checkpoint import load_heads
        runs = [(m, dv) for m in methods for dv in ([real[m][1].draft_vocab_size] if m in real else draft_vocabs)]
        for method, dv in runs:
            if method in real:
                heads = linears.apply(load_heads(real[method][0], target, device=device, dtype=dtype))
            else:       # dv: random ids
                heads = linears.apply(random_heads(method, target, num_heads=num_heads, draft_vocab=dv))
            for tree in method_trees[method]:
                spec = TreeSpec(tree, heads.num_heads, device, fitted(method))
                dec = graphs.attach(SpeculativeDecoder(target, cache, heads, spec, greedy))
                dec.prefill([prompt])
                ms = median_ms(lambda: read(*dec.step()), device, repeats, warmup)
                # A second pass, eager, with a sync between phases gives the split (the sync itself costs a
                # little, so the headline step time comes from the pass above).
                DecodeGraphs.detach(dec)
                dec.profile = True
                for _ in range(warmup):  # eager steps warm up too: the first tree's split once included a JIT
                    read(*dec.step())    # warm-up (H200: verify 37.6 ms for 16 nodes vs 16.1 ms for 64)
                dec.times = dict.fromkeys(dec.times, 0.0)
                for _ in range(repeats):
                    read(*dec.step())
                row = {"method": method, "heads": str(real[method][0]) if method in real else "random",
                       "num_heads": heads.num_heads, "draft_vocab": dv or cfg.vocab_size, "tree": tree,
                       "nodes": spec.num_nodes,
                       "depth": spec.max_depth,
                       "step_ms": round(ms, 4), "break_even_tau": round(ms / plain_ms, 4),
                       **{f"{k}_ms": round(v / repeats, 4) for k, v in dec.times.items()}}
                if taus and method in taus:
                    row["tau"] = taus[method]
                    row["tokens_per_s_at_tau"] = round(taus[method] * 1e3 / ms, 2)
                    row["speedup_at_tau"] = round(taus[method] * plain_ms / ms, 3)
                    if tau_source:
                        row["tau_tree"] = tau_source["tree"].get(method)
                rows.append(row)
                log(f"{method:8s} V'={dv or cfg.vocab_size:<6d} {tree:13s} {spec.num_nodes:4d} nodes: {ms:.3f} ms/step, "
                    f"break-even tau {ms / plain_ms:.2f}")
            del heads

    result = {"meta": {**environment(device), "model": name, "dtype": str(dtype).removeprefix("torch."),
                       "cuda_graphs": bool(graphs.enabled and device.type == "cuda"), "linears": linears.describe(),
                       "prompt_tokens": prompt_tokens, "repeats": repeats, "warmup": warmup, "num_heads": num_heads,
                       "note": "step times are medians with device sync and the host read of the step's tokens; "
                               "break_even_tau = spec step / plain step; tokens_per_s_at_tau = tau / spec step; "
                               "the phase split (*_ms columns) comes from eager steps"},
              "prefill_ms": round(prefill_ms, 4), "plain_step_ms": round(plain_ms, 4),
              "plain_tokens_per_s": round(1e3 / plain_ms, 2), "tau": taus, "rows": rows}
    if tau_source:
        result["tau_source"] = tau_source
        for line in tau_notes(result):
            log(line)
    if out is not None:
        out = Path(out)                                   # made at the start
        stem = f"bench_{re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(name).name)}_{device.type}_{result['meta']['dtype']}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{stem}.md").write_text(bench_markdown(result) + "\n")
        result["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
        if plot:
            from .plots import plot_bench
            result["files"] += [str(p) for p in plot_bench(result, out)]
    return result


def bench_markdown(result: dict) -> str:
    m = result["meta"]
    head = (f"model {m['model']} | {m['dtype']} | {m['hardware']} | kernels {m.get('kernels', '?')} | "
            f"linears {m.get('linears', '?')} | prompt {m['prompt_tokens']} tok | "
            f"prefill {result['prefill_ms']:.2f} ms | plain step {result['plain_step_ms']:.3f} ms "
            f"({result['plain_tokens_per_s']:.1f} tok/s)\n")
    cols = ["method", "draft_vocab", "tree", "nodes", "step_ms", "break_even_tau", "draft_ms", "verify_ms", "accept_ms", "commit_ms"]
    if any(r.get("heads", "random") != "random" for r in result["rows"]):
        cols.insert(1, "heads")
    if result.get("tau"):
        cols += ["tau", "tokens_per_s_at_tau", "speedup_at_tau"]
    if result.get("tau_source"):
        cols.append("tau_tree")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        cells = {**r, "tau_tree": _tau_tree_cell(r)} if "tau_tree" in r else dict(r)
        if "heads" in r:
            cells["heads"] = Path(r["heads"]).name
        lines.append("| " + " | ".join(str(cells.get(c, "-")) for c in cols) + " |")
    notes = tau_notes(result)
    return head + "\n" + "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def _tau_tree_cell(row: dict) -> str:
    if row["tau_tree"] is None:
        return "not recorded"
    return row["tau_tree"] if row["tau_tree"] == row["tree"] else f"{row['tau_tree']} (not this tree)"


def tau_notes(result: dict) -> list[str]:
    """Where a summary's tau was measured on another tree than a row's: its *_at_tau columns then assume the
    same tau on that tree, which nothing measured."""
    src = result.get("tau_source")
    if not src:
        return []
    notes = []
    # by file name: eval records the model as it was named (an alias, a relative or an absolute path)
    model = result["meta"]["model"]
    if src.get("model") and Path(src["model"]).name != Path(model).name:
        notes.append(f"note: the tau in {src['file']} was measured on model {src['model']}, not on {model}; "
                     "the *_at_tau columns assume heads reach it on this model too")
    for method, tree in src["tree"].items():
        other = list(dict.fromkeys(r["tree"] for r in result["rows"]
                                   if r["method"] == method and "tau_tree" in r and r["tree"] != tree))
        if not other:
            continue
        measured = f"on tree {tree}" if tree else "on a tree the summary does not record"
        notes.append(f"note: {method} tau {result['tau'][method]} from {src['file']} was measured {measured}; "
                     f"the rows for {', '.join(other)} assume it holds there too "
                     "(their *_at_tau columns are not measured)")
    return notes

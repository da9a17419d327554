"""`amphista eval`: a Spec-Bench-format question file through plain decoding and each speculative method.

Reports, per category and overall, tau (tokens per target forward), tokens/s and the speedup over plain
decoding measured in the same run, plus a check that every greedy speculative answer is token-for-token
the plain answer. Multi-turn questions carry the conversation forward as Spec-Bench does: each method sees
its own earlier answers. Answers are appended to `answers.jsonl` one (question, method) at a time, so an
interrupted run resumes where it stopped (only with the same configuration and the same question texts). The
summary's answers also go to spec_bench/METHOD.jsonl, one Spec-Bench answer file per method for its speed.py.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

from ..errors import AmphistaError, InputError
from ..text_files import read_utf8, user_path
from ..values import is_int, is_real
from .env import environment, now
from .questions import question_digest, read_questions

METHODS = ("ar", "medusa", "amphista", "lookup", "amphista+lookup", "medusa+lookup")
SPECULATIVE = METHODS[1:]
HEADS_KINDS = ("medusa", "amphista")
_ALIASES = {"plain": "ar", "none": "ar"}
WARMUP_TOKENS = 64          # enough to warm kernels and allocators without a full answer per warm-up
ANSWERS, SUMMARY, SUMMARY_MD, RUN_CONFIG = "answers.jsonl", "summary.json", "summary.md", "run_config.json"
SPEC_BENCH_DIR = "spec_bench"   # one Spec-Bench answer file per method: speed.py reads a file as one method
PLOTS = ("tau_per_category.png", "speedup_per_category.png")


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def parse_methods(methods, log=_log) -> list[str]:
    """'ar,medusa,amphista' -> ['ar', 'medusa', 'amphista']; plain decoding always runs first, because the
    speedup and the equality check are measured against it."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    out = []
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        name = _ALIASES.get(name, name)
        if name not in METHODS:
            raise InputError(f"unknown method {name!r}; known methods: ar (plain decoding), medusa, amphista, "
                             "lookup (prompt lookup, no heads), amphista+lookup, medusa+lookup (the heads' tree "
                             "and a lookup chain)")
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("no methods given; use e.g. --methods ar,medusa,amphista")
    if "ar" not in out:
        log("note: adding plain decoding (ar): speedups and the equality check are measured against it")
    return ["ar"] + [m for m in out if m != "ar"]


def heads_kind(method: str) -> str | None:
    """The heads a method drafts with: "amphista" for amphista and amphista+lookup; None for ar and lookup."""
    kind = method.removesuffix("+lookup")
    return kind if kind in HEADS_KINDS else None


def resolve_heads_paths(methods, model, heads: dict | None) -> dict[str, str]:
    """The heads directory of each heads kind the methods draft with ({"medusa": DIR, "amphista": DIR}, X+lookup
    taking X's), absolute: given explicitly (a directory, "default" or a shipped heads name, as generate's --heads
    takes them), else the heads shipped for `model`. ar and lookup need none."""
    from ..shipped_heads import heads_dir
    heads = heads or {}
    paths = {}
    for kind in dict.fromkeys(k for k in map(heads_kind, methods) if k):
        given = heads.get(kind)
        users = [m for m in methods if heads_kind(m) == kind]
        which = ", ".join(users)
        paths[kind] = str(heads_dir("default" if given is None else given, model, f"--heads-{kind}", method=kind,
                                    none=f"eval runs {which} with drafting heads; leave {which} out of --methods "
                                         f"to skip {'them' if len(users) > 1 else 'it'}"))
    return paths


def method_trees(methods, tree) -> dict:
    """The `tree` each method's generate() gets, from eval's one --tree (checked before the model loads).

    --tree is the heads' tree (medusa, amphista); "TREE+chain-K" adds the prompt lookup's chain: the heads methods
    run TREE, X+lookup TREE+chain-K, lookup chain-K. Without a chain part X+lookup runs the heads' tree and the
    device's default chain, and lookup, which verifies a chain only, runs --tree where it is one (chain-K), else
    its default chain (run_eval says so). None: every method's default.
    """
    if tree is None or tree == "auto":
        return {m: None for m in methods}
    from ..prompt_lookup import MAX_DEPTH, chain_depth, split_chain
    lookups = [m for m in methods if m.endswith("lookup")]
    heads_tree, chain = split_chain(tree)
    suffixed = chain is not None
    if suffixed:
        if not lookups:
            raise InputError(f"--tree {tree}: its +{chain} is the prompt lookup's chain, but --methods runs no "
                             f"lookup method (lookup, amphista+lookup, medusa+lookup); give the heads' tree alone: "
                             f"--tree {heads_tree or 'mix-4'}")
        if not heads_tree.strip() and any(map(heads_kind, methods)):
            raise InputError(f"--tree {tree}: name the heads' tree before +{chain} (e.g. mix-4+{chain})")
        if heads_tree == "auto":
            raise InputError("eval compares the methods on one tree: name it (--tree mix-8, ...); --tree auto is "
                             "for generate")
    elif isinstance(tree, str) and tree.startswith("chain-"):
        chain = tree
    # a chain after "+" is the lookup's, whichever lookup method runs it; a bare chain-K also a heads' tree
    if suffixed or chain is not None and "lookup" in methods:
        try:
            chain_depth(chain, "cpu")
        except AmphistaError:
            raise InputError(f"--tree {tree}: the prompt lookup's chain must be chain-K with K in 1..{MAX_DEPTH}, "
                             f"got {chain}") from None
    out = {}
    for m in methods:
        if m == "ar":
            out[m] = None
        elif m == "lookup":
            out[m] = chain
        elif m.endswith("+lookup"):
            out[m] = tree
        else:
            out[m] = heads_tree
    return out


# ---- answers file ------------------------------------------------------------------------------------------

def load_answers(path: Path, log=_log) -> dict[tuple, dict]:
    """(question_id, method) -> record. A torn last line (a run killed mid-write) is dropped, not fatal."""
    if not path.is_file():
        return {}
    # read_utf8: answers are written ASCII-only, so a bad byte is a damaged file, named, not a decode trace
    text = read_utf8(path, line_in_name=True)
    lines = text.splitlines()
    done = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = (rec["question_id"], rec["method"])
            _check_record(rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if n == len(lines):
                log(f"note: {path}:{n} is incomplete (interrupted run?); that answer will be recomputed")
                path.write_text("".join(f"{x}\n" for x in lines[:n - 1]), encoding="utf-8")
                break
            why = f"no field {e}" if isinstance(e, KeyError) else str(e)
            raise InputError(f"{path}:{n}: not a valid answer record ({why}); fix or delete the file") from None
        done[key] = rec
    else:
        # A last record without its newline (an editor, a `cat` of files) would take this run's first answer onto
        # its line, and the next run would drop both as one torn line.
        if text and not text.endswith(("\n", "\r")):
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
    return done


_CHOICE_LISTS = ("turns", "token_ids", "new_tokens", "wall_time", "decode_ms", "decoding_steps", "step_tokens",
                 "accept_hist")


def _check_record(rec: dict):
    """The fields the summary reads, so a foreign or hand-edited line is refused by line, not a KeyError later."""
    ch = rec["choices"][0]
    if not isinstance(rec["category"], str):
        raise TypeError(f"category {rec['category']!r} is not a string")
    lengths = {len(ch[k]) for k in _CHOICE_LISTS}     # one entry per turn each
    if len(lengths) != 1:
        raise ValueError(f"its per-turn lists ({', '.join(_CHOICE_LISTS)}) differ in length")


def _check_run_config(out: Path, config: dict) -> dict:
    """Answers from another configuration must not mix into this summary (e.g. another max_new_tokens, or heads
    retrained in place). Returns the config to record: this run's, plus the heads of methods only earlier runs ran."""
    f = out / RUN_CONFIG
    answers = out / ANSWERS
    # A run that failed before its first answer leaves a config that describes nothing; it must not block a
    # corrected rerun into the same folder.
    if not answers.is_file() or answers.stat().st_size == 0:
        return config
    if not f.is_file():     # answers of no known configuration (max_new_tokens, tree, heads): never mixed in
        raise InputError(f"{out} holds answers ({answers}) but no {RUN_CONFIG} saying which configuration wrote "
                         "them; use another --out or delete the folder")
    try:
        old = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{f} is not a valid run config ({e}); it describes the answers in {answers}: "
                         "use another --out or delete the folder") from None
    if not isinstance(old, dict):
        raise InputError(f"{f} is not a valid run config (a JSON {type(old).__name__}, not an object); "
                         "use another --out or delete the folder")
    old.setdefault("quant", "none")          # runs from before 4-bit weights
    keys = ("model", "questions", "max_new_tokens", "tree", "temperature", "seed", "dtype", "device", "quant")
    # --tree as typed is compared only where the folder records no resolved trees: unset there and mix-4 now is
    # the same run when unset resolved to mix-4 (tree_used, compared below, is what the answers were decoded with)
    if isinstance(old.get("tree_used"), dict):
        keys = tuple(k for k in keys if k != "tree")
    # the model as a file, not as typed: `smollm2-135m` and its GGUF's path, or ./m and m, are one model
    diff = [f"{k}: {old.get(k)!r} there, {config[k]!r} now" for k in keys
            if old.get(k) != config[k] and not (k == "model" and _same_model(old.get(k), config[k]))]
    # Recorded since: the cache length caps each turn's budget (a conversation near it), and tree=None resolves per
    # device and version. Compared where the folder's config has them (older ones do not).
    if "max_seq_len" in old and old["max_seq_len"] != config["max_seq_len"]:
        diff.append(f"max_seq_len: {old['max_seq_len']!r} there, {config['max_seq_len']!r} now")
    used = config["tree_used"]
    diff += [f"{m} tree: {t!r} there, {used[m]!r} now" for m, t in (old.get("tree_used") or {}).items()
             if m in used and used[m] != t]
    # the directories, not their spellings: `default`, the shipped name and its path (or ./h and h) are one
    diff += [f"{m} heads: {p!r} there, {config['heads'][m]!r} now"
             for m, p in (old.get("heads") or {}).items()
             if m in config["heads"] and not _same_dir(config["heads"][m], p)]
    # Configs from before digests were recorded have none to compare: their heads are taken on the path alone.
    diff += [f"{m} heads' weights: digest {d!r} there, {config['heads_digest'][m]!r} now (retrained in place?)"
             for m, d in (old.get("heads_digest") or {}).items()
             if m in config["heads_digest"] and config["heads_digest"][m] != d]
    if diff:
        raise InputError(f"{out} holds answers from a different configuration ({'; '.join(diff)}); "
                         "use another --out or delete it")
    return {**config, "heads": {**(old.get("heads") or {}), **config["heads"]},
            "heads_digest": {**(old.get("heads_digest") or {}), **config["heads_digest"]},
            "tree_used": {**(old.get("tree_used") or {}), **config["tree_used"]}}


def _same_dir(a, b) -> bool:
    """Whether two recorded heads paths name one directory (older runs recorded them as typed, relative)."""
    if not isinstance(a, str) or not isinstance(b, str):
        return a == b
    try:
        return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def _same_model(a, b) -> bool:
    from ..shipped_heads import _alias_of
    if not isinstance(a, str) or not isinstance(b, str):
        return a == b
    return _alias_of(a) == _alias_of(b) or (Path(a).expanduser().exists() and _same_dir(a, b))


def _write_run_config(out: Path, config: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(json.dumps(config, indent=1) + "\n")


# ---- running -----------------------------------------------------------------------------------------------

def _generate(engine, prompt, method: str, kwargs: dict):
    """One method's answer: "ar" decodes plainly (no tree), the others speculate (kwargs' tree: the method's own,
    method_trees)."""
    if method == "ar":
        return engine.generate(prompt, **{**kwargs, "tree": None}, speculative=None)
    return engine.generate(prompt, **kwargs, speculative=method)


def _answer(engine, question: dict, method: str, gen_kwargs: dict, room: int, run: str = "") -> dict:
    """All turns of one question with one method; the conversation carries this method's own answers."""
    messages, ch = [], defaultdict(list)
    for k, turn in enumerate(question["turns"]):
        messages.append({"role": "user", "content": turn})
        n_prompt = len(engine.encode_prompt(messages))
        # Keep prompt + answer + tree room inside the cache. `room` is the largest over all methods, so
        # every method gets the same budget and greedy answers stay comparable.
        budget = min(gen_kwargs["max_new_tokens"], engine.max_seq_len - n_prompt - room)
        if budget < 1:
            raise InputError(f"question {question['question_id']} turn {k + 1}: the conversation is {n_prompt} "
                             f"tokens, no room left in the cache (max_seq_len={engine.max_seq_len}); "
                             "raise --max-seq-len")
        t0 = now(engine.device)
        res = _generate(engine, list(messages), method, {**gen_kwargs, "max_new_tokens": budget})
        wall = now(engine.device) - t0
        messages.append({"role": "assistant", "content": res.text})
        s = res.stats
        # Spec-Bench's accept_lengths: the tokens of each decoding step (speed.py averages them: tau). The stats
        # keep a histogram, so this turn's steps come in ascending order.
        ch["accept_lengths"].extend(n for n, c in enumerate(s.accept_hist) for _ in range(c))
        for key, value in (("turns", res.text), ("token_ids", list(res.token_ids)),
                           ("new_tokens", s.new_tokens), ("wall_time", round(wall, 6)),
                           ("prompt_tokens", s.prompt_tokens), ("prefill_ms", round(s.prefill_ms, 3)),
                           ("decode_ms", round(s.decode_ms, 3)), ("decoding_steps", s.decode_steps),
                           ("step_tokens", s.step_tokens), ("accept_hist", list(s.accept_hist)),
                           ("finish_reason", res.finish_reason), ("max_new_tokens", budget)):
            ch[key].append(value)
    # answer_id, model_id, choices[0] (turns, new_tokens, wall_time, decoding_steps, accept_lengths), tstamp: the
    # fields Spec-Bench's answer files carry and its speed.py reads
    return {"question_id": question["question_id"], "category": question["category"], "method": method,
            "answer_id": uuid.uuid4().hex, "model_id": str(engine.loaded_name), "choices": [{"index": 0, **ch}],
            "tstamp": time.time(), "run": run, "question_digest": question_digest(question)}


def _method_tree(engine, method: str, tree):
    """The TreeSpec `method` runs with `tree` (its heads loaded): an unknown tree, one deeper than the heads or a
    chain a lookup cannot run is refused here, before any answer, not mid-run."""
    if method == "lookup":
        return engine._lookup(tree)[1]
    if method.endswith("+lookup"):
        return engine._heads_with_lookup(tree, 1)[1]
    return engine._tree_spec(tree)


def _warmup(engine, question: dict, methods, gen_kwargs: dict, runs: int):
    """Untimed runs per method first: lazy allocations, kernel selection and caches settle outside the clock.
    gen_kwargs: each method's generate() options."""
    prompt = [{"role": "user", "content": question["turns"][0]}]
    for method, heads in methods.items():
        kwargs = {**gen_kwargs[method], "max_new_tokens": min(gen_kwargs[method]["max_new_tokens"], WARMUP_TOKENS)}
        if heads is not None:
            engine.load_heads(heads)
        for _ in range(runs):
            _generate(engine, prompt, method, kwargs)


def run_eval(questions, methods="ar,medusa,amphista", model: str = "smollm2-135m", heads: dict | None = None,
             tree=None, max_new_tokens: int = 1024, categories=None, limit: int | None = None,
             per_category: int | None = None, warmup: int = 1,
             out="eval_results", plot: bool = False, device=None, dtype=None, max_seq_len: int = 4096,
             temperature: float = 0.0, seed: int = 0, engine=None, progress: bool = True, log=_log,
             quant: str = "auto") -> dict:
    """Runs (or resumes) the evaluation and writes answers.jsonl, summary.json, summary.md (and plots).

    heads: {"medusa": DIR, "amphista": DIR}; a method without one uses the heads shipped for `model` (X+lookup: X's
    heads; lookup: none). tree: the heads' tree, "TREE+chain-K" to size the lookup's chain (method_trees).
    engine: an already loaded Engine (tests, notebooks); `model`, `device`, `dtype`, `max_seq_len` are then
    ignored except `model` naming the shipped heads.
    """
    from tqdm import tqdm

    from ..heads import weights_digest

    # Everything that can be wrong with the input is checked before the (slow) model load.
    methods = parse_methods(methods, log)
    questions, out = user_path(questions), user_path(out)
    qs = read_questions(questions, categories, limit, per_category)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {warmup}")
    if not is_real(temperature) or temperature < 0:
        raise InputError(f"--temperature must be a finite number >= 0, got {temperature}")
    if tree == "auto":      # each method would time its own pick: the comparison needs one tree for all
        raise InputError("eval compares the methods on one tree: name it (--tree mix-8, ...); --tree auto is for "
                         "generate")
    trees = method_trees(methods, tree)
    heads_paths = resolve_heads_paths(methods, model, heads)
    out = Path(out)
    if out.exists() and not out.is_dir():       # mkdir's own error says only "File exists", after the load
        raise InputError(f"--out {out} is a file; give a folder for answers.jsonl and the summary")
    if plot:
        from .plots import check_plotting
        check_plotting()
    try:            # an --out that cannot be made fails now, by name, not after the (slow) model load
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{e.strerror or e}: {e.filename or out} (the --out folder cannot be made)") from None
    if not os.access(out, os.W_OK | os.X_OK):      # one that is there, read-only: failed after the load
        raise InputError(f"Permission denied: {out} (--out: the folder {out} is not writable)")

    if engine is None:
        from ..engine import Engine
        log(f"loading {model} ...")
        engine = Engine.from_pretrained(model, device=device, dtype=dtype, max_seq_len=max_seq_len, quant=quant)
    greedy = temperature == 0
    # Load every kind of heads once; switching methods then just swaps the module on the engine.
    loaded: dict[str, object] = {m: None for m in methods}
    room, trees_used, digests = 0, {}, {}
    for kind, path in heads_paths.items():
        h = engine.load_heads(path)
        if h.config.kind != kind:
            raise InputError(f"--heads-{kind} {path} holds {h.config.kind} heads, not {kind} heads")
        digests[kind] = weights_digest(h)        # the weights, not the path: heads retrained in place differ
        for m in (m for m in methods if heads_kind(m) == kind):
            loaded[m] = h
            spec = _method_tree(engine, m, trees[m])
            room = max(room, spec.num_nodes + spec.max_depth)
            trees_used[m] = spec.name            # what tree=None resolved to for these heads ("mix-4+chain-4")
    if "lookup" in methods:
        spec = _method_tree(engine, "lookup", trees["lookup"])
        room = max(room, spec.num_nodes + spec.max_depth)
        trees_used["lookup"] = spec.name
        if tree is not None and trees["lookup"] is None:
            # one --tree for all, but a lookup drafts one token per depth: a tree with siblings is no tree for it
            log(f"note: --tree {tree} is the heads' tree; lookup verifies a chain, its default {spec.name} here "
                f"(--tree {tree}+chain-K to choose it)")

    config = {"model": str(engine.loaded_name), "questions": Path(questions).name, "max_new_tokens": max_new_tokens,
              "tree": tree, "temperature": temperature, "seed": None if greedy else seed,
              "dtype": str(engine.dtype).removeprefix("torch."), "device": str(engine.device),
              "quant": getattr(engine, "quant", "none"), "heads": heads_paths, "heads_digest": digests,
              "max_seq_len": engine.max_seq_len, "tree_used": trees_used}
    # Written only once the heads and the tree passed: a failed run must not pin a configuration on --out.
    config = _check_run_config(out, config)
    _write_run_config(out, config)

    answers_file = out / ANSWERS
    done = load_answers(answers_file, log)
    _check_questions_unchanged(qs, done, answers_file)
    todo = [(q, m) for q in qs for m in methods if (q["question_id"], m) not in done]
    gen_kwargs = {m: {"max_new_tokens": max_new_tokens, "temperature": temperature, "tree": trees[m],
                      "seed": None if greedy else seed} for m in methods}
    if not todo:
        # a rerun into the same --out recomputed nothing and said nothing, as if it had measured the table afresh
        log(f"all {len(qs) * len(methods)} answers are already in {answers_file} (an earlier run's): nothing to "
            f"compute, the summary is rewritten from them; use another --out (or delete it) to measure afresh")
    if todo:
        if done:
            log(f"resuming: {len(done)} answers in {answers_file}, {len(todo)} to go")
        # The summary of an earlier run would otherwise sit beside answers it does not count until this run ends
        # (or for good, if it is stopped): the outputs of a run are written once it has all of its answers.
        for name in (SUMMARY, SUMMARY_MD, *PLOTS):
            (out / name).unlink(missing_ok=True)
        _remove_spec_bench_files(out)
        try:
            if warmup:
                _warmup(engine, todo[0][0], {m: loaded[m] for m in methods}, gen_kwargs, warmup)
            # Question-major order (every method answers a question before the next one starts): load from other
            # jobs on the machine then spreads over all methods instead of skewing whichever ran during it.
            run = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"   # who timed each answer
            with open(answers_file, "a", encoding="utf-8") as f, \
                    tqdm(total=len(todo), desc="eval", unit="answer", file=sys.stderr, disable=not progress) as bar:
                for q, m in todo:
                    bar.set_postfix_str(f"q {q['question_id']} {m}")
                    if loaded[m] is not None:
                        engine.load_heads(loaded[m])
                    rec = _answer(engine, q, m, gen_kwargs[m], room, run)
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    done[(q["question_id"], m)] = rec
                    bar.update(1)
        except KeyboardInterrupt:
            # each answer is flushed as it completes: the hours spent so far are not lost, which 130 alone hides
            have = sum((q["question_id"], m) in done for q in qs for m in methods)
            log(f"eval: interrupted with {have} of {len(qs) * len(methods)} answers saved in {answers_file}; "
                f"rerun the same command to resume from them")
            raise

    records = [done[(q["question_id"], m)] for q in qs for m in methods]
    summary = summarize(records, methods, check_equality=greedy)
    summary["meta"] = {**environment(engine.device), **config, "questions_path": str(questions),
                       "n_questions": len(qs), "categories_filter": categories, "limit": limit,
                       "per_category": per_category, "warmup": warmup, "tree_used": trees_used,
                       "max_seq_len": engine.max_seq_len, "methods": methods,
                       "note": "tokens_per_s = new tokens / wall time of the whole generate call (prefill "
                               "included), as Spec-Bench; speedup = tokens_per_s / ar tokens_per_s"}
    summary["spec_bench_answers"] = _write_spec_bench_files(out, records, methods)
    for name in PLOTS:      # an earlier run's plots (other questions or methods) must not pass for this summary's
        (out / name).unlink(missing_ok=True)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    (out / SUMMARY_MD).write_text(summary_markdown(summary) + "\n")
    if plot:
        from .plots import plot_eval
        summary["plots"] = [str(p) for p in plot_eval(summary, out, log)]
        (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _check_questions_unchanged(qs: list[dict], done: dict, answers_file: Path):
    """Answers in --out are reused by question_id: refuse those written for another text of a question (the file
    edited, or another file with the same ids), which would otherwise be summarized as this file's answers."""
    kept = defaultdict(set)     # question_id -> digests its answers were written for
    for (qid, _), rec in done.items():
        if rec.get("question_digest") is not None:      # records from before digests were recorded have none
            kept[qid].add(rec["question_digest"])
    changed = [str(q["question_id"]) for q in qs if kept[q["question_id"]] - {question_digest(q)}]
    if changed:
        many = len(changed) > 1
        raise InputError(f"{answers_file} holds answers to another version of question{'s' if many else ''} "
                         f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} (category or turns differ "
                         "from the questions file's); use another --out or delete it")


def spec_bench_record(rec: dict) -> dict:
    """The record as a Spec-Bench answer line; fills answer_id and accept_lengths into records written before they
    were recorded (from the per-turn histograms)."""
    rec = dict(rec)
    ch = dict(rec["choices"][0])
    if "accept_lengths" not in ch:
        ch["accept_lengths"] = [n for h in ch.get("accept_hist", []) for n, c in enumerate(h) for _ in range(c)]
    rec["choices"] = [ch] + rec["choices"][1:]
    rec.setdefault("answer_id", uuid.uuid5(uuid.NAMESPACE_OID, f"{rec.get('run')}/{rec['question_id']}/"
                                           f"{rec['method']}").hex)
    return rec


def _remove_spec_bench_files(out: Path):
    folder = out / SPEC_BENCH_DIR
    if folder.is_dir():
        for f in folder.glob("*.jsonl"):
            f.unlink()


def _write_spec_bench_files(out: Path, records: list[dict], methods: list[str]) -> dict[str, str]:
    """spec_bench/METHOD.jsonl: this summary's answers of one method each, in Spec-Bench's answer format, so its
    evaluation/speed.py reads them as they are (--file-path spec_bench/amphista.jsonl --base-path
    spec_bench/ar.jsonl). answers.jsonl holds every method (and every run's answers) in one file."""
    folder = out / SPEC_BENCH_DIR
    folder.mkdir(exist_ok=True)
    _remove_spec_bench_files(out)          # a method this summary no longer has must not leave its file
    paths = {}
    for m in methods:
        path = folder / f"{m}.jsonl"
        path.write_text("".join(json.dumps(spec_bench_record(r)) + "\n" for r in records if r["method"] == m),
                        encoding="utf-8")
        paths[m] = str(path)
    return paths


# ---- summary -----------------------------------------------------------------------------------------------

def _aggregate(recs: list[dict]) -> dict:
    c = [r["choices"][0] for r in recs]
    new = sum(sum(x["new_tokens"]) for x in c)
    wall = sum(sum(x["wall_time"]) for x in c)
    decode_s = sum(sum(x["decode_ms"]) for x in c) / 1e3
    steps = sum(sum(x["decoding_steps"]) for x in c)
    used = sum(sum(x["step_tokens"]) for x in c)
    hist: list[int] = []
    for x in c:
        for h in x["accept_hist"]:
            hist.extend([0] * (len(h) - len(hist)))
            for i, v in enumerate(h):
                hist[i] += v
    # decode tokens exclude each turn's first token, which prefill produces
    decode_tokens = sum(sum(max(n - 1, 0) for n in x["new_tokens"]) for x in c)
    # No decoding step (--max-new-tokens 1, or every answer ended at its first token): nothing measured the decode
    # rate or tau, so both are null (JSON), not 0.0, which no decoder can reach (tau >= 1).
    return {"questions": len(recs), "turns": sum(len(x["new_tokens"]) for x in c), "new_tokens": new,
            "wall_s": round(wall, 4), "tokens_per_s": round(new / wall, 3) if wall else 0.0,
            "decode_tokens_per_s": round(decode_tokens / decode_s, 3) if steps and decode_s else None,
            "decoding_steps": steps, "tau": round(used / steps, 4) if steps else None, "accept_hist": hist}


def _first_difference(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    """(turn, token position) where two answers first differ, 1-based turn; None when identical."""
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            pos = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return t + 1, pos
    return None if len(a) == len(b) else (min(len(a), len(b)) + 1, 0)


def _turn_text(record: dict, turn: int, chars: int = 200) -> str:
    texts = record["choices"][0]["turns"]
    return texts[turn - 1][:chars] if turn <= len(texts) else ""


def summarize(records: list[dict], methods: list[str], check_equality: bool = True) -> dict:
    by = defaultdict(list)                       # (method, category) -> records; (method, None): all of them
    for r in records:
        by[(r["method"], r["category"])].append(r)
        by[(r["method"], None)].append(r)       # not "overall": a file may name a category so
    cats = sorted({r["category"] for r in records})

    def group(cat):
        g = {m: _aggregate(by[(m, cat)]) for m in methods if by[(m, cat)]}
        base = g.get("ar", {}).get("tokens_per_s")
        for m, s in g.items():
            s["speedup"] = round(s["tokens_per_s"] / base, 4) if base else None
        return g

    summary = {"methods": methods, "overall": group(None), "categories": {c: group(c) for c in cats}}
    # A resumed --out holds answers timed by several processes (other loads, clocks, thermal states): its speedups
    # are not ratios measured side by side. Records from before runs were recorded count as one unknown run.
    runs = sorted({str(r.get("run")) for r in records})
    if len(runs) > 1:
        summary["runs"] = {m: sorted({str(r.get("run")) for r in records if r["method"] == m}) for m in methods}
    if check_equality:
        plain = {r["question_id"]: r for r in records if r["method"] == "ar"}
        eq = {}
        for m in methods:
            if m == "ar":
                continue
            checked, mismatches, first = 0, 0, None
            for r in records:
                if r["method"] != m or r["question_id"] not in plain:
                    continue
                checked += 1
                p = plain[r["question_id"]]
                diff = _first_difference(p["choices"][0]["token_ids"], r["choices"][0]["token_ids"])
                if diff is not None:
                    mismatches += 1
                    if first is None:
                        turn, pos = diff
                        first = {"question_id": r["question_id"], "category": r["category"], "turn": turn,
                                 "token_position": pos, "ar": _turn_text(p, turn), m: _turn_text(r, turn)}
            eq[m] = {"checked": checked, "mismatches": mismatches, "first_mismatch": first}
        summary["equality"] = eq
    else:
        summary["equality"] = None          # sampling: answers legitimately differ
    return summary


def summary_markdown(summary: dict) -> str:
    methods = summary["methods"]
    spec = [m for m in methods if m != "ar"]
    cols = ["category", "questions", "turns"] + (["ar tok/s"] if "ar" in methods else [])
    for m in spec:
        cols += [f"{m} tau", f"{m} tok/s", f"{m} speedup"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    # a "|" in a category name would split its cell
    rows = [(c.replace("|", "\\|"), summary["categories"][c]) for c in summary["categories"]]
    rows.append(("**overall**", summary["overall"]))
    for name, g in rows:
        first = next(iter(g.values()), {"questions": 0, "turns": 0})
        cells = [name, str(first["questions"]), str(first["turns"])]
        if "ar" in methods:
            cells.append(f"{g['ar']['tokens_per_s']:.1f}" if "ar" in g else "-")
        for m in spec:
            s = g.get(m)
            # no decoding step (every answer one token, from the prefill): no tau to show
            cells += ([f"{s['tau']:.2f}" if s["decoding_steps"] else "-", f"{s['tokens_per_s']:.1f}",
                       f"{s['speedup']:.2f}x" if s.get("speedup") else "-"] if s else ["-", "-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    eq = summary.get("equality")
    lines.append("")
    if summary.get("runs"):
        n = len({run for rs in summary["runs"].values() for run in rs})
        lines.append(f"Note: these answers were timed by {n} runs (a resumed --out), so the speedups are not all "
                     "measured side by side; rerun into a fresh --out for ratios from one run.")
    if eq is None:
        lines.append("Equality with plain decoding: not checked (sampling).")
    else:
        for m, e in eq.items():
            line = f"- equality with plain decoding ({m}): {e['mismatches']} mismatches in {e['checked']} questions"
            if e["first_mismatch"]:
                f = e["first_mismatch"]
                line += (f"; first: question {f['question_id']} ({f['category']}), turn {f['turn']}, "
                         f"token {f['token_position']}")
            lines.append(line)
    return "\n".join(lines)

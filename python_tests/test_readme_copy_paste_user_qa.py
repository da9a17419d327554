"""README as a new user copies it: every command, flag, path, environment variable, Python name and quoted result
the README shows must exist and match. Mechanical checks (README parsed, argparse and signatures introspected,
results files read), plus the first Python API block run as written on SmolLM2 with its answers shortened.

Mismatches this file caught (fixed in README.md): the OpenMP-vs-pool slowdown beside one busy process quoted as
1.8x-13x where cpu_pool_ab_busy1 measured 10.4x-12.8x; four numbers rounded twice from a 3-decimal table (dynamic-8's
tau 2.06 for 2.0549, dynamic-4's 7.91 ms/token for 7.9046, bf16 mix-4's 2.07x for 2.0646, 4-bit heads' 1.10x for
1.1053); the speculation check's cost quoted as ~5-7 s with 4-bit weights (written before the native kernels; ~2 s
now; not tested here: a timing)."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import needs_smollm2

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "benchmarks" / "results"
# Where a relative path the README names may live: it names files relative to the repository, to
# benchmarks/results/ ("results/...", "gpu/..."), to the package and its kernels, and to the training runs' folder.
PATH_ROOTS = ["", "benchmarks/", "benchmarks/results/", "amphista_engine/", "amphista_engine/kernels/",
              "benchmarks/results/training_smollm2/", "csrc/cpu/"]
# Names in backticks that are not files of this repository: what a command writes (runs/, my-heads, --out's
# files), a file the user brings, another project's script, chat commands, tree-name lists.
NOT_REPO_FILES = {
    ".gz", ".jsonl.gz", "FILE.json", "config.json", "tokenizer.json", "question.txt", "answers.jsonl",
    "summary.json", "summary.md", "spec_bench/METHOD.jsonl", "spec_bench/amphista.jsonl", "spec_bench/ar.jsonl",
    "speed.py", "dynamic-4/8/16", "mix-4/8/16",
    "./bench_results/",          # `bench`'s default output folder (git-ignored): made by running it, not shipped
}
# Flags the README shows that belong to other tools: pip, Spec-Bench's speed.py, a training run's shell script.
FOREIGN_FLAGS = {"--no-deps", "--file-path", "--base-path", "--with-medusa", "--dist"}      # pip, peers, pytest-xdist


def _prose(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _flat(text: str) -> str:
    """README text with whitespace collapsed and bold marks dropped: a quoted number may wrap or be bold."""
    return re.sub(r"\s+", " ", text.replace("**", ""))


FLAT = _flat(README)


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from amphista_engine.cli import build_parser
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("amphista has no subcommands")


def _options(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in sub._actions for o in a.option_strings}


def _claim(expected: str, source: str):
    assert expected in FLAT, f"README should quote {source} as {expected!r}"


def _shell_commands() -> list[list[str]]:
    """Every command line of the README's bash blocks, continuation lines joined, comments dropped, split at && and
    pipes (shlex keeps quoted text whole)."""
    cmds = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            cmd: list[str] = []
            for w in words + ["&&"]:
                if w in ("&&", "|"):
                    if cmd:
                        cmds.append(cmd)
                    cmd = []
                else:
                    cmd.append(w)
    return cmds


# ---------------------------------------------------------------------------------------------- paths, env, CI


def _ignored(path) -> bool:
    """Whether git ignores `path` (an output of a local run); False where git or the repository is absent."""
    import subprocess
    try:
        return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_every_path_the_readme_names_exists():
    tokens = set()
    for m in re.finditer(r"`([^`\n]+)`", _prose(README)):
        for w in m.group(1).split():
            w = w.strip("(),;:\"'")
            if re.fullmatch(r"[\w.\-/*]+", w) and ("/" in w or re.search(r"\.(py|md|sh|json|jsonl|h|txt|png)$", w)):
                tokens.add(w)
    for m in re.finditer(r"((?:\.\./shared|benchmarks|scripts|amphista_engine|python_tests|csrc|results|gpu|"
                         r"training_smollm2|session\d+)/[\w./*-]*)", README):
        tokens.add(m.group(1).rstrip(".,;:)"))
    shared = ROOT.parent / "shared"
    missing = []
    for tok in sorted(tokens):
        if tok in NOT_REPO_FILES or tok.startswith("/"):
            continue
        if tok.startswith("../shared/"):
            if shared.is_dir() and not (ROOT / tok).exists():
                missing.append(tok)
            continue
        # what a fresh clone holds: a git-ignored output a local run left (bench_results/) does not count
        found = any(not _ignored(p) for r in PATH_ROOTS
                    for p in list(ROOT.glob(r + tok)) + [ROOT / (r + tok)] if p.exists())
        # "Run record in `RUN.md`" and the like: a file of the results folder the sentence links
        found = found or (("/" not in tok) and any(RESULTS.rglob(tok)))
        if not found:
            missing.append(tok)
    assert not missing, f"README names paths that are not in the repository: {missing}"


def _package_env_vars() -> set[str]:
    names = set()
    files = list((ROOT / "amphista_engine").rglob("*.py")) + [ROOT / "setup.py"]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"AMPHISTA_[A-Z0-9_]+", node.value):
                names.add(node.value)
    return names


def test_environment_variables_readme_and_package_agree():
    """Each AMPHISTA_* variable the README tells users to set is read by the package (or setup.py), and each one
    the package reads is documented: a renamed variable would otherwise be set by users to no effect."""
    in_readme = set(re.findall(r"AMPHISTA_[A-Z0-9_]+", README)) - {"AMPHISTA_DESIGN"}   # ../shared/AMPHISTA_DESIGN.md
    in_code = _package_env_vars()
    assert in_readme - in_code == set(), f"README names variables nothing reads: {sorted(in_readme - in_code)}"
    assert in_code - in_readme == set(), f"variables the package reads that README never names: " \
                                         f"{sorted(in_code - in_readme)}"
    # the cache directory's fallbacks the README names
    src = (ROOT / "amphista_engine" / "timing_cache.py").read_text()
    assert "XDG_CACHE_HOME" in src and '".cache"' in src and '"amphista-engine"' in src


def test_readme_test_command_is_what_ci_runs():
    m = re.search(r"Set up and run the tests \(what `\.ci/run` runs\):\s*```bash\n(.*?)\n```", README, re.S)
    assert m, "README lost its test command"
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert m.group(1).strip() == ci[-1].strip()


# ------------------------------------------------------------------------------------------------------- CLI


def test_every_flag_the_readme_names_exists():
    subs = _subparsers()
    known = {o for s in subs.values() for o in _options(s)} | {"--version"}
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", README)) - FOREIGN_FLAGS
    assert named - known == set(), f"README names flags no subcommand has: {sorted(named - known)}"


def test_every_amphista_command_in_the_readme_parses():
    """The quick start, training, eval and bench lines, as pasted (synopses with [...] are checked below)."""
    subs = _subparsers()
    from amphista_engine.cli import build_parser
    cmds = [c for c in _shell_commands() if c[0] == "amphista" and not any(w.startswith("[") for w in c)]
    seen = {c[1] for c in cmds}
    assert {"generate", "distill", "train", "tree-search", "eval-tau", "eval", "bench"} <= seen, seen
    for cmd in cmds:
        try:
            args = build_parser().parse_args(cmd[1:])
        except SystemExit as e:
            pytest.fail(f"README command does not parse (exit {e.code}): {shlex.join(cmd)}")
        assert args.command == cmd[1] and cmd[1] in subs


def test_the_readme_scripts_exist_with_the_flags_shown():
    cmds = [c for c in _shell_commands() if c[0] == "bash"]
    assert cmds, "README lost its gpu_suite.sh line"
    for cmd in cmds:
        script = ROOT / cmd[1]
        assert script.is_file(), cmd
        text = script.read_text()
        for flag in (w for w in cmd[2:] if w.startswith("--")):
            assert re.search(rf"^\s*{re.escape(flag)}[)|]", text, re.M), f"{cmd[1]} has no {flag} case"


def _synopsis(name: str) -> str:
    m = re.search(rf"```bash\n(amphista {name} .*?)```", README, re.S)
    assert m, f"README lost the `amphista {name}` synopsis"
    return re.sub(r"\s+", " ", m.group(1))


def test_generate_synopsis_matches_the_parser_both_ways():
    """Each [--flag VALUE] of the synopsis: the flag exists, its listed choices are the parser's choices, a number
    shown is the default; and every option of `amphista generate` appears in the synopsis."""
    gen = _subparsers()["generate"]
    opts = _options(gen)
    text = _synopsis("generate")
    shown = re.findall(r"\[(--[a-z-]+)(?:/(--[a-z-]+))?(?: ([^\]]+))?\]", text)
    assert shown, text
    covered = set()
    for flag, alt, value in shown:
        for f in filter(None, (flag, alt)):
            assert f in opts, f"synopsis shows {f}, which `amphista generate` lacks"
        action = opts[flag]
        covered.add(id(action))
        if not value:
            continue
        alts = value.split("|")
        if action.choices:
            assert set(alts) == set(action.choices), (flag, alts, action.choices)
        if re.fullmatch(r"[\d.]+", value):
            # the sampling flags are unset (None) until the model's generation_config.json or the built-in greedy
            # values fill them (sampling_defaults): the synopsis shows the built-in ones
            from amphista_engine.serving.commands import BUILTIN_SAMPLING
            default = BUILTIN_SAMPLING[action.dest] if action.default is None else action.default
            assert float(value) == float(default), f"synopsis shows {flag} {value}, default {default}"
        elif isinstance(action.default, str) and not alts[0].isupper():
            assert alts[0] == action.default, f"synopsis lists {alts[0]} first for {flag}; default {action.default}"
    unshown = sorted({a.option_strings[0] for a in gen._actions
                      if a.option_strings and id(a) not in covered and a.dest != "help"})
    assert not unshown, f"`amphista generate` options missing from the README synopsis: {unshown}"


def test_chat_synopsis_matches_the_parser():
    subs = _subparsers()
    chat, gen = _options(subs["chat"]), _options(subs["generate"])
    text = _synopsis("chat")
    m = re.search(r"--max-new-tokens (\d+)", text)
    assert m and int(m.group(1)) == chat["--max-new-tokens"].default
    # "[the model, decoding and sampling options of generate]": chat adds only its own two
    extra = set(chat) - set(gen) - {"--reuse-prefix", "--no-reuse-prefix"}
    assert extra == set(), f"chat has options the README does not describe: {sorted(extra)}"
    assert "--no-reuse-prefix" in README and "--system" in text


# ------------------------------------------------------------------------------------------------ Python API


def test_generate_signature_in_the_readme_matches_the_engine():
    from amphista_engine import Engine
    m = re.search(r"- `generate\((\w+), max_new_tokens=(\d+), \*, (.*?)\)`", FLAT)
    assert m, "README lost the generate(...) signature line"
    shown = [p.split("=")[0].strip() for p in re.split(r", (?=\w+(?:=|,|$))", m.group(3))]
    for method in (Engine.generate, Engine.stream, Engine.generate_batch):
        params = inspect.signature(method).parameters
        kw_only = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
        assert shown == kw_only, f"{method.__name__}: README {shown} vs {kw_only}"
        assert params["max_new_tokens"].default == int(m.group(2))
    params = inspect.signature(Engine.generate).parameters
    spec = re.search(r'speculative=None\|"amphista"\|"medusa"\|"auto"', m.group(3))
    assert spec and params["speculative"].default is None
    acc = re.search(r'acceptance=("\w+"(?:\|"\w+")*)', m.group(3)).group(1).replace('"', "").split("|")
    assert params["acceptance"].default == acc[0]
    from amphista_engine.speculative import ACCEPTANCE
    assert tuple(acc) == ACCEPTANCE
    assert params["reuse_prefix"].default is False and "reuse_prefix=False" in m.group(3)


def test_python_names_the_readme_uses_exist(tiny_hf_dir):
    import amphista_engine
    from amphista_engine import Engine, GenerationStats, errors
    from amphista_engine.kernels import cpu_ops, cpu_quant, ops
    from amphista_engine.model import Block
    for name in ("from_pretrained", "generate", "stream", "generate_batch", "stream_batch", "load_heads",
                 "speculation_check"):
        assert callable(getattr(Engine, name, None)), name
    fp = inspect.signature(Engine.from_pretrained).parameters
    assert {"device", "dtype", "max_seq_len", "quant", "cuda_graphs", "max_batch_size"} <= set(fp)
    assert fp["quant"].default == "auto" and fp["max_seq_len"].default is None     # the block's "# quant="auto""
    from amphista_engine.engine import DEFAULT_MAX_SEQ_LEN
    assert DEFAULT_MAX_SEQ_LEN == 2048          # "defaults to 2048, or to the model's sliding window"
    assert "tree" in inspect.signature(Engine.speculation_check).parameters
    assert "cuda_graphs" in inspect.signature(Engine.__init__).parameters
    for err in ("AmphistaError", "CacheFullError", "InputError", "ConfigError", "NonFiniteError"):
        assert getattr(amphista_engine, err) is getattr(errors, err)
    assert issubclass(errors.CacheFullError, errors.InputError)     # "(`CacheFullError`, an `InputError`)"
    fields = {f.name for f in dataclasses.fields(GenerationStats)}
    assert {"accept_hist", "extra", "prompt_tokens", "prefill_ms"} <= fields
    assert all(hasattr(GenerationStats, a) for a in ("tau", "summary", "decode_tokens_per_s"))
    assert callable(amphista_engine.kernels.use_backend)
    assert callable(cpu_quant.quantize_heads) and callable(ops.quant_linear) and callable(cpu_ops.decoder_layers)
    assert callable(Block.forward_fused)
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=64)
    assert engine.last_result is None and engine.last_results == []
    assert engine.model.ordered_attention is True and engine.model.fuse_decode_layers is False


@needs_smollm2
def test_first_python_api_block_runs_as_written(one_thread, capsys):
    """The README's Python block, executed as pasted except that every generate/stream call decodes 4 tokens."""
    src = _blocks("python")[0]
    tree = ast.parse(src)
    calls = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("generate",
                                                                                                       "stream"):
            node.keywords = [k for k in node.keywords if k.arg != "max_new_tokens"]
            node.keywords.append(ast.keyword("max_new_tokens", ast.Constant(4)))
            calls += 1
    assert calls == 5, "the README's Python block changed: review this test"
    ns: dict = {}
    exec(compile(ast.fix_missing_locations(tree), "README.md", "exec"), ns)
    out = capsys.readouterr().out
    result, res, engine = ns["result"], ns["res"], ns["engine"]
    assert result.finish_reason in ("eos", "length", "stop") and result.text and result.text in out
    assert result.stats.summary() in out
    assert engine.last_result is not None and engine.last_result.token_ids   # the stream finished
    assert res.stats.extra["tree"] == "mc_sim_7b_63" and res.stats.tau >= 1
    assert set(res.stats.extra["time_ms"]) == {"draft", "verify", "accept", "commit"}   # "draft/verify/accept/commit"
    assert ns["fix"].stats.extra["method"] == "lookup" and ns["edit"].stats.extra["method"] == "amphista+lookup"


# ------------------------------------------------------------------------------------------ quoted results


def _json(rel: str):
    return json.loads((RESULTS / rel).read_text())


def _md_table_rows(rel: str) -> list[str]:
    return [ln for ln in (RESULTS / rel).read_text().splitlines() if ln.startswith("|")]


def test_mt_bench_table_is_the_committed_summary():
    rows = _md_table_rows("mt_bench_cpu/summary.md")
    for row in rows[2:]:
        assert _flat(row) in FLAT, f"README's MT-Bench table differs from mt_bench_cpu/summary.md: {row}"
    for line in (RESULTS / "mt_bench_cpu" / "summary.md").read_text().splitlines():
        if line.startswith("- equality"):
            assert line in README


def _overall(rel):
    o = _json(rel)["overall"]
    return o["ar"], o["medusa"], o["amphista"]


def test_quoted_mt_bench_runs_match_their_summaries():
    ar, med, amp = _overall("mt_bench_cpu_avx2_fp32/summary.json")
    cats = _json("mt_bench_cpu_avx2_fp32/summary.json")["categories"]
    _claim(f"plain decoding {ar['tokens_per_s']:.1f} tok/s, Medusa tau {med['tau']:.2f} and {med['speedup']:.2f}x, "
           f"Amphista tau {amp['tau']:.2f} and {amp['speedup']:.2f}x (coding "
           f"{cats['coding']['amphista']['speedup']:.2f}x, "
           f"extraction {cats['extraction']['amphista']['speedup']:.2f}x)", "mt_bench_cpu_avx2_fp32")
    ar, med, amp = _overall("mt_bench_cpu_q4/summary.json")
    _claim(f"plain {ar['tokens_per_s']:.1f} tok/s, Medusa tau {med['tau']:.2f} and {med['speedup']:.2f}x, Amphista "
           f"tau {amp['tau']:.2f} and {amp['speedup']:.2f}x ({amp['tokens_per_s'] / med['tokens_per_s']:.2f}x over "
           f"Medusa)", "mt_bench_cpu_q4")
    ar, med, amp = _overall("mt_bench_cpu_q4_native/summary.json")
    cats = _json("mt_bench_cpu_q4_native/summary.json")["categories"]
    _claim(f"plain {ar['tokens_per_s']:.1f} tok/s, Medusa tau {med['tau']:.2f} and {med['speedup']:.2f}x, Amphista "
           f"tau {amp['tau']:.2f} and {amp['speedup']:.2f}x ({amp['tokens_per_s'] / med['tokens_per_s']:.2f}x over "
           f"Medusa; {cats['coding']['amphista']['speedup']:.2f}x over plain on coding, "
           f"{cats['roleplay']['amphista']['speedup']:.2f}x on roleplay)", "mt_bench_cpu_q4_native")


def test_quoted_cpu_tables_match_their_json():
    rows = _json("cpu_q4_ab.json")["rows"]
    for weights, label in (("fp32", "fp32, dequantized"), ("bf16", "bf16, dequantized"), ("q4", "4-bit (`auto`)")):
        mine = [r for r in rows if r["weights"].startswith(weights)]
        plain = next(r for r in mine if r["decoding"] == "plain")
        best = max((r for r in mine if r["decoding"].startswith("amphista")), key=lambda r: r["tok/s"])
        tree = best["decoding"].split()[1]
        _claim(f"| {label} | {plain['tok/s']:.1f} | Amphista `{tree}`, tau {best['tau']:.2f}", "cpu_q4_ab")
        _claim(f"| {best['tok/s']:.1f} | {best['vs fp32 plain']:.2f}x |", "cpu_q4_ab")
    rows = {(r["decoding"], r["backend"]): r for r in _json("cpu_quant_stack_ab_2.json")["rows"]}
    for dec, label in (("plain", "plain"), ("amphista mix-4", "Amphista `mix-4`"),
                       ("amphista mix-8", "Amphista `mix-8`"), ("amphista mix-16", "Amphista `mix-16`")):
        before, after = rows[(dec, "cpu-torchmm")], rows[(dec, "cpu")]
        tau = "1" if dec == "plain" else f"{before['tau']:.2f} / {after['tau']:.2f}"
        _claim(f"| {label} | {tau} | {before['tok/s']:.1f} | {after['tok/s']:.1f} | "
               f"{after['vs cpu-torchmm']:.2f}x |", "cpu_quant_stack_ab_2")
    rows = {(r["heads"], r["decoding"]): r for r in _json("cpu_heads_4bit_ab.json")["rows"]}
    q4, pk = (lambda t: rows[("4-bit", t)]), (lambda t: rows[("packed", t)])
    _claim(f"the same tau (`mix-4` {q4('amphista mix-4')['tau']:.2f} vs {pk('amphista mix-4')['tau']:.2f}, `mix-8` "
           f"{q4('amphista mix-8')['tau']:.2f} vs {pk('amphista mix-8')['tau']:.2f} on 16 MT-Bench first turns), "
           f"`mix-4` {q4('amphista mix-4')['vs packed heads']:.2f}x and `mix-8` "
           f"{q4('amphista mix-8')['vs packed heads']:.2f}x per token", "cpu_heads_4bit_ab")
    peer = {r["engine"]: r for r in _json("peer_transformers_smollm2-135m_cpu_bf16.json")["rows"]}
    tf, ours, med, amp = (peer[k] for k in ("transformers generate", "amphista-engine plain",
                                            "amphista-engine medusa", "amphista-engine amphista"))
    _claim(f"transformers {tf['tokens_per_s']:.1f} tok/s, our plain decoding {ours['tokens_per_s']:.1f} "
           f"({ours['speedup_vs_transformers']:.2f}x), Medusa {med['tokens_per_s']:.1f} "
           f"({med['speedup_vs_transformers']:.2f}x), Amphista {amp['tokens_per_s']:.1f} tok/s "
           f"({amp['speedup_vs_transformers']:.2f}x)", "peer_transformers")


def test_quoted_dynamic_tree_and_pool_numbers_match_their_json():
    rows = {r["decoding"]: r for r in _json("cpu_dynamic_tree_native/cpu_tree_size_ab.json")["rows"]}
    d4, d8 = rows["amphista dynamic-4"], rows["amphista dynamic-8"]
    m4, m8 = rows["amphista mix-4 (auto's pick)"], rows["amphista mix-8"]
    _claim(f"tau {d4['tau']:.2f} vs {m4['tau']:.2f} at 4 nodes, {d8['tau']:.2f} vs {m8['tau']:.2f} at 8",
           "cpu_dynamic_tree_native")
    _claim(f"{rows['amphista dynamic-4@torch']['ms/token']:.2f} -> {d4['ms/token']:.2f} ms/token at 4 nodes, "
           f"{rows['amphista dynamic-8@torch']['ms/token']:.2f} -> {d8['ms/token']:.2f} at 8",
           "cpu_dynamic_tree_native")
    _claim(f"plain 4-bit decoding ({rows['plain']['ms/token']:.2f} ms/token)", "cpu_dynamic_tree_native")
    busy = [r["omp / own"] for r in _json("cpu_pool_ab_busy1.json")["rows"]]
    _claim(f"beside one busy process on 2 cores a 4-bit step took {min(busy):.0f}x-{max(busy):.0f}x as long as on "
           f"the pool", "cpu_pool_ab_busy1")
    quiet = [r["omp / own"] for r in _json("cpu_pool_ab.json")["rows"]]
    assert "on a quiet machine the pool's step is within ~2% of OpenMP's" in FLAT
    assert all(abs(q - 1) <= 0.025 for q in quiet), quiet


def test_quoted_held_out_and_sampled_tau_match_the_heads_and_the_check():
    from amphista_engine import speculation_check
    cfg = json.loads((ROOT / "amphista_engine/data/heads/smollm2-135m-amphista/config.json").read_text())
    tau = cfg["extra"]["tree_search_mix"]["decoding_tau"]
    dyn = " / ".join(f"{tau[f'dynamic-{n}']:.2f}" for n in (4, 8, 16))
    mix = " / ".join(f"{tau[f'mix-{n}']:.2f}" for n in (4, 8, 16))
    _claim(f"walk {dyn} tokens per step on `dynamic-4/8/16` against {mix} on `mix-4/8/16`", "the shipped heads")
    assert speculation_check.HELD_OUT_DISCOUNT == 0.9 and "(x0.9)" in FLAT
    kept = {t: (k, p) for t, k, p in speculation_check.SAMPLED_KEPT}
    _claim(f"all of them up to temperature 0.3, {kept[0.7][0]:.0%} at 0.7, {kept[1.0][0]:.0%} at 1.0; "
           f"{kept[0.7][1]:.0%} and {kept[1.0][1]:.0%} with top_p 0.9", "speculation_check.SAMPLED_KEPT")
    assert kept[0.3] == (1.0, 1.0)
    rows = _json("sampled_tau/sampled_tau.json")["rows"]

    def mean_kept(setting):
        vals = [r["kept"] for r in rows if r["setting"] == setting]
        return round(sum(vals) / len(vals), 2)
    assert (mean_kept("T 0.7"), mean_kept("T 0.7, top_p 0.9")) == kept[0.7]
    assert (mean_kept("T 1.0"), mean_kept("T 1.0, top_p 0.9")) == kept[1.0]


def test_quoted_gpu_suite_run_matches_its_files():
    suite = RESULTS / "gpu" / "h200_2026-12-04b_suite"
    summary = (suite / "summary.md").read_text()
    commit = re.search(r"- commit: (\w+)", summary).group(1)
    _claim(f"latest run 2026-12-04 at commit {commit}", "gpu/h200_2026-12-04b_suite")
    root = ET.parse(suite / "tests.xml").getroot()
    suite_el = root if root.tag == "testsuite" else root.find("testsuite")
    n, skipped = int(suite_el.get("tests")), int(suite_el.get("skipped"))
    failed = int(suite_el.get("failures")) + int(suite_el.get("errors"))
    _claim(f"{n - skipped - failed} GPU tests passed ({skipped} skips", "gpu tests.xml")
    build = next(ln for ln in summary.splitlines() if ln.startswith("| build-pip |"))
    _claim(f"builds for sm_90 in {build.split('|')[3].strip()} s", "gpu stages")


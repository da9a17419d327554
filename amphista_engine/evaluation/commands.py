"""`amphista eval | bench | perplexity`: argparse subcommands; amphista_engine/cli.py adds them with `register(sub)`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def cmd_eval(args) -> int:
    from ..text_files import user_path
    from .runner import run_eval, summary_markdown
    args.questions, args.out = user_path(args.questions), user_path(args.out)
    from ..text_files import check_out_path
    check_out_path("--out", args.out, folder=True)      # e.g. not inside the shipped heads, as the others' --out
    heads = {"amphista": args.heads_amphista, "medusa": args.heads_medusa}
    summary = run_eval(args.questions, methods=args.methods, model=args.model, heads=heads, tree=args.tree,
                       max_new_tokens=args.max_new_tokens, categories=args.categories, limit=args.limit, per_category=args.per_category,
                       warmup=args.warmup, out=args.out, plot=args.plot, device=args.device, dtype=args.dtype,
                       max_seq_len=args.max_seq_len, temperature=args.temperature, seed=args.seed,
                       progress=not args.no_progress, quant=args.quant)
    print(summary_markdown(summary))
    print(f"answers and summary in {args.out}", file=sys.stderr)
    eq = summary.get("equality") or {}
    # A lossless decoder that disagrees with plain decoding is a bug: make scripts notice.
    return 1 if any(e["mismatches"] for e in eq.values()) else 0


def cmd_bench(args) -> int:
    from ..text_files import check_out_path, user_path
    from .bench import bench_markdown, run_bench
    args.out = user_path(args.out)
    before = set()
    if args.out is not None:
        check_out_path("--out", args.out, folder=True)      # not after the timing
        if Path(args.out).is_dir():
            before = {f.name for f in Path(args.out).iterdir()}
    if isinstance(args.tau, str) and args.tau.startswith("~"):     # a summary.json path
        args.tau = user_path(args.tau)
    result = run_bench(model=args.model, random_weights=args.random_weights, shape=args.shape, device=args.device,
                       dtype=args.dtype, trees=args.trees, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                       warmup=args.warmup, tau=args.tau, num_heads=args.num_heads, plot=args.plot, out=args.out,
                       allow_large=args.allow_large, draft_vocab=args.draft_vocab, cuda_graphs=args.cuda_graphs,
                       quant=args.quant, heads={"amphista": args.heads_amphista, "medusa": args.heads_medusa})
    if args.json:
        print(json.dumps(result))
    else:
        print(bench_markdown(result))
    files = result.get("files") or []
    if files:
        # the file names come from the model, device and dtype: a rerun replaces the earlier run's files
        replaced = [f for f in files if Path(f).name in before]
        print(f"bench results in {', '.join(files)}" + (f" (replacing the earlier run's {len(replaced)} file(s) of "
                                                        f"that name)" if replaced else ""), file=sys.stderr)
    return 0


def cmd_perplexity(args) -> int:
    from ..engine import Engine
    from ..errors import InputError
    from ..text_files import read_utf8
    from .perplexity import check_ctx, perplexity
    if args.max_seq_len < 4:
        raise InputError(f"--max-seq-len must be at least 4, got {args.max_seq_len}")
    ctx = check_ctx(args.ctx if args.ctx is not None else min(512, args.max_seq_len), args.max_seq_len)
    if args.chunks is not None and args.chunks < 1:   # before the load, and in the flag's name (not max_chunks)
        raise InputError(f"--chunks must be a positive integer, got {args.chunks}")
    from ..text_files import user_path
    path = Path(user_path(args.file))
    if path.is_dir():
        raise InputError(f"--file {args.file} is a directory; give a UTF-8 text file")
    if not path.is_file():                           # before the load: a bad path is named in a moment
        raise InputError(f"--file {args.file}: no such file")
    text = read_utf8(path).removeprefix("\ufeff")
    if not text.strip():                             # before the load, as the other --file checks
        raise InputError(f"--file {args.file} holds no text; perplexity needs a non-empty text")
    print(f"loading {args.model} ...", file=sys.stderr)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                                    quant=args.quant)

    def progress(chunk, chunks, ppl):
        print(f"[{chunk}/{chunks}] running PPL {ppl:.4f}", file=sys.stderr)
    result = perplexity(engine, text, ctx=ctx, max_chunks=args.chunks, progress=None if args.quiet else progress)
    weights = engine.linears.describe() if engine.quant == "q4" else str(engine.dtype).removeprefix("torch.")
    if args.json:
        print(json.dumps({**result.to_dict(), "model": args.model, "weights": weights}))
    else:
        print(f"{result.summary()}, {args.model}, {weights}")
    return 0


def _device_args(p):
    from ..cli import _add_quant_arg
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="weights and cache dtype (default: fp32 on cpu, bf16 on cuda)")
    _add_quant_arg(p)


def register(sub) -> None:
    """Adds the eval and bench subcommands to an argparse subparsers object."""
    from ..cli import _float, _int      # ASCII digits only; a number far too long is named by its length
    from .bench import DEFAULT_TREES
    from .shapes import SHAPES

    e = sub.add_parser("eval", help="tau, tokens/s and speedup per category on a Spec-Bench-format question file",
                       description="Runs every question with plain decoding (ar) and each speculative method; "
                                   "writes answers.jsonl (every method), spec_bench/METHOD.jsonl (one Spec-Bench "
                                   "answer file per method, for its speed.py), summary.json and summary.md to --out. "
                                   "A rerun into the same --out resumes: the answers there are kept and only missing "
                                   "ones are computed; answers from another configuration or to an edited question "
                                   "are refused, not mixed in.")
    e.add_argument("--questions", required=True, help="Spec-Bench-format JSONL: question_id, category, turns")
    e.add_argument("--methods", default="ar,medusa,amphista", help="comma list of ar, medusa, amphista, lookup "
                   "(prompt lookup: drafts copied from the text, no heads), amphista+lookup, medusa+lookup (the "
                   "heads' tree and a lookup chain in one forward; X's heads)")
    e.add_argument("--model", default="smollm2-135m", help="checkpoint directory, .gguf file or alias")
    e.add_argument("--heads-amphista", default=None, help="Amphista heads: a directory, `default` (the heads "
                   "shipped for --model, also when unset) or a shipped heads name (smollm2-135m-amphista)")
    e.add_argument("--heads-medusa", default=None, help="the same for Medusa heads (smollm2-135m-medusa)")
    e.add_argument("--tree", default=None, help="the heads' tree, for every heads method (default: the engine's per "
                   "device: the heads' mix-64 (else mc_sim_7b_63) on GPUs, tree-16 on CPUs, mix-4 (or chain-3) with "
                   "4-bit CPU weights); TREE+chain-K also sizes the lookup's chain (lookup runs chain-K, X+lookup "
                   "TREE+chain-K; default chain: 4 on CPUs, 7 on GPUs); lookup runs a --tree chain-K as it is, "
                   "any other tree with its default chain")
    e.add_argument("--max-new-tokens", type=_int, default=1024, help="per turn (Spec-Bench: 1024; less on CPU)")
    e.add_argument("--categories", default=None, help="comma list of categories to run (default: all)")
    e.add_argument("--limit", type=_int, default=None, help="first N questions (after --categories)")
    e.add_argument("--per-category", type=_int, default=None,
                   help="first N questions of each category (a balanced subset)")
    e.add_argument("--warmup", type=_int, default=1, help="untimed warm-up generations per method")
    e.add_argument("--temperature", type=_float, default=0.0, help="0 = greedy (default; equality is checked)")
    e.add_argument("--seed", type=_int, default=0, help="sampling seed (temperature > 0)")
    e.add_argument("--out", default="eval_results", help="output folder (answers.jsonl, summary.json, plots)")
    e.add_argument("--plot", action="store_true", help="write tau and speedup per category PNGs")
    e.add_argument("--max-seq-len", type=_int, default=4096, help="KV cache length (whole conversation)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    _device_args(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="prefill, plain step and speculative step latency per tree; break-even tau",
                       description="Times one plain decoding step and one speculative step (random heads) per "
                                   "tree size; reports the break-even tau and the tokens/s a measured tau gives.")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--model", default="smollm2-135m", help="checkpoint directory, .gguf file or alias")
    src.add_argument("--random-weights", action="store_true", help="random weights of --shape (no download)")
    b.add_argument("--shape", default=None, choices=list(SHAPES), help="model shape for --random-weights")
    b.add_argument("--allow-large", action="store_true", help="allow >4 GiB of random weights on the CPU")
    _device_args(b)
    b.add_argument("--trees", default=",".join(DEFAULT_TREES), help="comma list of trees (static names, dynamic-N)")
    b.add_argument("--heads-amphista", default=None, help="time these Amphista heads (a directory, `default`: "
                   "the heads shipped for --model, or a shipped heads name such as smollm2-135m-amphista) with "
                   "their own head count, draft vocabulary and fitted trees (--trees mix-4,...); default (or "
                   "`none`): random heads")
    b.add_argument("--heads-medusa", default=None, help="the same for Medusa heads")
    b.add_argument("--num-heads", type=_int, default=4, help="drafting heads of the random heads")
    b.add_argument("--draft-vocab", default="0", help="comma list of draft-vocabulary sizes to time side by side "
                   "(0 = the full vocabulary), e.g. 0,8192")
    b.add_argument("--prompt-tokens", type=_int, default=256)
    b.add_argument("--repeats", type=_int, default=10, help="timed repeats (median reported)")
    b.add_argument("--warmup", type=_int, default=2, help="untimed calls before each measurement")
    b.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="time steps replayed from CUDA graphs, as the Engine runs them on a GPU (default on)")
    b.add_argument("--tau", default=None,
                   help="measured tau: X, medusa=X,amphista=Y, or an `amphista eval` summary.json")
    b.add_argument("--plot", action="store_true", help="write step_cost.png")
    b.add_argument("--out", default="bench_results", help="output folder for the .json/.md (and the plot)")
    b.add_argument("--json", action="store_true", help="print the result as one JSON object")
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("perplexity", help="perplexity of a text file under the model (a port's or a quantization's "
                       "check)", description="Cuts the file's tokens into chunks of --ctx, runs each chunk in one "
                       "forward pass (its first token the BOS where the tokenizer adds one) and scores the second "
                       "half of each, as llama.cpp's llama-perplexity does; prints PPL +/- its standard error.")
    p.add_argument("--file", required=True, help="a UTF-8 text file")
    p.add_argument("--model", default="smollm2-135m", help="checkpoint directory, .gguf file or alias")
    p.add_argument("--ctx", type=_int, default=None, help="tokens per chunk (default: min(512, --max-seq-len))")
    p.add_argument("--chunks", type=_int, default=None, help="score the first N chunks only (default: all)")
    p.add_argument("--max-seq-len", type=_int, default=2048, help="the engine's cache length (>= --ctx)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no running PPL per chunk on stderr")
    _device_args(p)
    p.set_defaults(func=cmd_perplexity)

"""`amphista distill | train | tree-search | eval-tau`: argparse subcommands; amphista_engine/cli.py adds them
with `register(sub)`."""
from __future__ import annotations

import json
import sys

from ..errors import InputError
from ..text_files import check_out_path, user_path


def _expand(args, *names):
    """The path flags `names` with `~` expanded (`--out=~/x` and quoted paths reach us as typed)."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [user_path(v) for v in value])
        elif isinstance(value, str):
            setattr(args, name, user_path(value))


def _check_log_file(flag: str, path):
    """An existing --log must be a training log (JSON lines with a "step"): lines are appended to it, so a model
    file or the training shard given by a slip took log lines at its end."""
    from pathlib import Path
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    first = head.split(b"\n", 1)[0]
    try:
        rec = json.loads(first)
        ok = b"\0" not in head and isinstance(rec, dict) and "step" in rec
    except ValueError:
        ok = b"\n" not in head and head.lstrip().startswith(b"{")     # a first line torn by a killed run
    if not ok:
        raise InputError(f"{flag} {path} exists and is not a training log: log lines would be appended to it; give "
                         f"a new file or a log an earlier run wrote")


def _earlier_result(path) -> bool:
    from pathlib import Path
    return path is not None and Path(path).is_file() and Path(path).stat().st_size > 0


def cmd_distill(args) -> int:
    from .distill import distill
    distill(args.prompts, args.out, model=args.model, limit=args.limit, offset=args.offset,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, balance_by_source=args.balance_by_source, seed=args.seed,
            device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len, sources=args.sources,
            samples=args.samples, temperature=args.temperature, top_p=args.top_p)
    return 0


def cmd_train(args) -> int:
    from pathlib import Path

    from ..shipped_heads import heads_dir
    from .trainer import TrainConfig, train_heads
    if args.init_from == "none" and not Path("none").exists():      # as --heads none: no heads to start from
        args.init_from = None
    _expand(args, "data", "out", "cache_hidden", "log")
    # before the load and the training: a folder that cannot take the heads failed at the save, after all of it
    check_out_path("--out", args.out, folder=True)
    if getattr(args, "log", None):
        check_out_path("--log", args.log, folder=False)
        _check_log_file("--log", args.log)
    if getattr(args, "cache_hidden", None):
        check_out_path("--cache-hidden", args.cache_hidden, folder=True)
        from .hidden_cache import check_cache_dir
        check_cache_dir(args.cache_hidden, out=args.out)
    if args.init_from is not None:
        # "default" (the --kind heads shipped for --model) or a shipped name, as generate and eval take them; a
        # typo is named now, not after the data is read and the target loads
        args.init_from = str(heads_dir(args.init_from, args.model, "--init-from", method=args.kind))
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if hasattr(args, k)})
    result = train_heads(cfg)
    if not cfg.fill_cache and not result.get("final_eval"):
        print(f"train: no held-out evaluation ({_no_eval_reason(cfg, result)})", file=sys.stderr)
    print(json.dumps(result if cfg.fill_cache else result.get("final_eval", {})))
    return 0


def _no_eval_reason(cfg, result: dict) -> str:
    if not result.get("heldout_total"):
        return result.get("heldout_none") or f"--eval-frac {cfg.eval_frac} held out no sequence"
    if not result.get("heldout_sequences"):
        return f"--eval-max-seqs 0: the {result['heldout_total']} held-out sequence(s) are kept out of training only"
    step, total = result["steps"], result["total_steps"]
    if step == result.get("start_step") and step >= total:
        return f"{cfg.out} had already finished its {total} steps and holds no evaluation of step {step}"
    if step < total:
        return f"stopped at step {step} of {total} (--stop-after); it runs at the last step"
    return "no held-out position carries a loss"


def cmd_eval_tau(args) -> int:
    from ..errors import AmphistaError
    from ..shipped_heads import heads_dir
    from .evaltau import eval_tau
    # the directory, not the words: a resumed --out compares it, and `default` or a shipped name there is the same
    # heads as their path. A missing directory or name is passed as typed: eval_tau names the input it checks first
    # (--out, the questions), then refuses it after the load with the same message. `none`, and `default` where
    # nothing is shipped for --model (or --model is not found), are refused now.
    method = "amphista" if args.speculative == "auto" else args.speculative
    _expand(args, "questions", "out")
    if args.out is not None:
        check_out_path("--out", args.out, folder=False)
    earlier = _earlier_result(args.out)
    heads = args.heads
    try:
        heads = str(heads_dir(heads, args.model, "--heads", method=method,
                              none="eval-tau measures drafting heads; pass a heads directory, default or a shipped "
                                   "heads name"))
    except AmphistaError:
        if heads in ("default", "none"):
            raise
    eval_tau(args.questions, heads, model=args.model, tree=args.tree, max_new_tokens=args.max_new_tokens,
             limit=args.limit, out=args.out, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
             speculative=args.speculative, per_category=args.per_category)
    if earlier:
        print(f"eval-tau: {args.out} held an earlier run with these settings: the questions it had answered "
              f"were reused, not rerun, and the result rewritten (another --out for a fresh run)", file=sys.stderr)
    elif args.out is not None:
        print(f"eval-tau: result in {args.out}", file=sys.stderr)
    return 0


def cmd_tree_search(args) -> int:
    from pathlib import Path

    from ..shipped_heads import DATA as SHIPPED_HEADS, heads_dir
    from .tree_search import tree_search

    def sizes(flag, text):
        try:
            got = [int(n) for n in str(text).split(",") if n.strip()]
        except ValueError:
            got = None
        if got is None or any(n < 2 for n in got):
            raise InputError(f"{flag} {text!r}: expected a comma list of node counts of at least 2 (the root and "
                             f"one draft), e.g. 16,32,63")
        return got
    _expand(args, "data", "out", "cache_hidden")
    if args.out is not None:
        check_out_path("--out", args.out, folder=False)
    earlier = _earlier_result(args.out)
    if args.cache_hidden:       # a model's or the heads' folder: refused before the load, not after it
        from .hidden_cache import check_cache_dir
        check_cache_dir(args.cache_hidden)
    # a missing directory is named by tree_search, after the input it checks first
    args.heads = str(heads_dir(args.heads, args.model, "--heads", missing_ok=True,
                               none="tree-search fits trees to drafting heads; pass a heads directory or default"))
    # "default", a shipped directory's name (smollm2-135m-medusa) or its path: all are the package's own files
    if args.save and Path(args.heads).resolve().is_relative_to(SHIPPED_HEADS.resolve()):
        raise InputError("--save would write into the shipped heads: copy them to a directory and pass that")
    nodes = sizes("--nodes", args.nodes)
    if not nodes:       # `--nodes ''` fitted no tree and reported success
        raise InputError(f"--nodes {args.nodes!r} names no tree size; give a comma list of node counts of at least 2, "
                         f"e.g. 16,32,63")
    dynamic = [n for n in nodes if n <= 64] if args.dynamic is None else sizes("--dynamic", args.dynamic)
    tree_search(args.data, args.heads, model=args.model, nodes=nodes, out=args.out, save=args.save,
                eval_frac=args.eval_frac, cache_hidden=args.cache_hidden, device=args.device, dtype=args.dtype,
                max_seq_len=args.max_seq_len, source_weights=args.source_weights, prefix=args.prefix,
                dynamic=dynamic)
    if args.out is not None:
        print(f"tree-search: trees in {args.out}" + (" (replacing the earlier tree-search result there)"
                                                      if earlier else ""), file=sys.stderr)
    return 0


def _model_args(p):
    p.add_argument("--model", default="smollm2-135m", help="target: checkpoint directory, .gguf file or alias")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="target weights dtype (default: fp32 on cpu, bf16 on cuda)")


def register(sub) -> None:
    """Adds the distill, train, tree-search and eval-tau subcommands to an argparse subparsers object."""
    from ..cli import _float, _int      # ASCII digits only; a number far too long is named by its length
    d = sub.add_parser("distill", help="generate self-distillation data (the target answers training prompts)")
    d.add_argument("--prompts", required=True, help="train_prompts.jsonl-style JSONL or ShareGPT JSON")
    d.add_argument("--out", required=True, help="JSONL shard to append to (resumable)")
    _model_args(d)
    d.add_argument("--limit", type=_int, default=None, help="use the first N prompts (after balancing)")
    d.add_argument("--offset", type=_int, default=0, help="skip the first N of those (a parallel worker writing "
                   "its own --out shard)")
    d.add_argument("--batch-size", type=_int, default=8)
    d.add_argument("--max-new-tokens", type=_int, default=256)
    d.add_argument("--max-seq-len", type=_int, default=1024, help="KV cache length; longer prompts are skipped")
    d.add_argument("--balance-by-source", action="store_true", help="round-robin over sources (seeded shuffle)")
    d.add_argument("--seed", type=_int, default=0)
    d.add_argument("--sources", default=None, help="comma list: only prompts of these sources (after balancing)")
    d.add_argument("--samples", type=_int, default=1,
                   help="answers per prompt (> 1 needs --temperature; record ids ID#s0, ID#s1, ...)")
    d.add_argument("--temperature", type=_float, default=0.0, help="0 = greedy answers (the default)")
    d.add_argument("--top-p", type=_float, default=1.0)
    d.set_defaults(func=cmd_distill)

    t = sub.add_parser("train", help="train Amphista or Medusa heads on distilled data (target frozen)")
    # extend: `--data a --data b` kept only b (argparse's store), and trained on part of the data without a word
    t.add_argument("--data", required=True, nargs="+", action="extend", help="JSONL shard(s) from `amphista distill`")
    t.add_argument("--out", required=True, help="heads directory (config.json + model.safetensors)")
    _model_args(t)
    t.add_argument("--kind", default="amphista", choices=["amphista", "medusa"])
    t.add_argument("--num-heads", type=_int, default=4)
    t.add_argument("--loss", default="kl", choices=["kl", "ce"], help="KL to the target's distribution or CE "
                   "on the data token")
    t.add_argument("--lambda", dest="lam", type=_float, default=0.8, help="head k (1-based) weight lambda^(k-1)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_int, default=None)
    g.add_argument("--epochs", type=_float, default=None)
    t.add_argument("--batch-tokens", type=_int, default=4096, help="tokens per optimizer step (whole sequences)")
    t.add_argument("--loss-positions", type=_int, default=0,
                   help="score at most this many random answer positions per step (0 = all); bounds the "
                        "LM-head cost, the SAL still runs over whole sequences")
    t.add_argument("--lr", type=_float, default=1e-3)
    t.add_argument("--weight-decay", type=_float, default=0.0)
    t.add_argument("--warmup", type=_int, default=None, help="warmup steps (default: 5%% of the steps); at most "
                   "the run's steps: a longer warmup is refused, as the learning rate would never reach --lr")
    t.add_argument("--clip", type=_float, default=1.0, help="clip the gradient norm to this (0 = no clipping)")
    t.add_argument("--train-dtype", dest="train_dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 = autocast matmuls (fp32 master weights)")
    t.add_argument("--save-dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    t.add_argument("--seed", type=_int, default=0)
    t.add_argument("--cache-hidden", default=None, help="directory for cached target hidden states")
    t.add_argument("--eval-every", type=_int, default=0, help="steps between held-out evals (0 = at the end)")
    t.add_argument("--eval-frac", type=_float, default=0.05)
    t.add_argument("--eval-max-seqs", type=_int, default=64,
                   help="evaluate on at most this many held-out sequences (0 = no evaluation; the held-out "
                        "prompts are still never trained on)")
    t.add_argument("--save-every", type=_int, default=0, help="steps between checkpoints (0 = at evals/end)")
    t.add_argument("--max-seq-len", type=_int, default=1024, help="longer sequences are skipped (counted)")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/trainer_state.pt (same data, split, layout, --lr and seed; --steps, "
                        "--epochs, --stop-after, --save-every, --eval-every and --log may change, and so may "
                        "--warmup, --weight-decay, --clip, --loss-positions, --mse-* and --train-dtype, with a "
                        "warning; the schedule follows the new values from the first resumed step)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the heads (and trainer state) already in OUT instead of refusing to")
    t.add_argument("--stop-after", type=_int, default=None, help="stop (with a checkpoint) after this step")
    t.add_argument("--chunk", type=_int, default=256, help="positions per loss chunk (bounds [N, K, V] memory)")
    t.add_argument("--log", default=None, help="also append JSON lines (train/eval metrics) to this file")
    t.add_argument("--stage-of-head", default=None, help="Amphista: comma list, head k's SAL stage")
    t.add_argument("--mse-weight", type=_float, default=0.0,
                   help="add this weight x the full-vocabulary logit MSE to the teacher at every answer position "
                        "(exact and ~V/d times cheaper than KL: computed through the LM head's Gram matrix)")
    t.add_argument("--mse-positions", type=_int, default=0,
                   help="with --loss-positions L: take the logit-MSE on N >= L random rows (including the KL ones) "
                        "instead of every answer row; the per-row head layers then run on N rows (0 = every row)")
    t.add_argument("--fill-cache", action="store_true",
                   help="only compute the target hidden states of every sequence into --cache-hidden, then exit "
                        "(runs of both kinds can then train in parallel on one target forward); --dtype bf16 "
                        "fills it ~1.8x faster on a CPU with AVX-512 BF16 (states within ~2%% of fp32's); the cache "
                        "records that dtype and takes no entries computed in another")
    t.add_argument("--fill-planned", action="store_true",
                   help="with --fill-cache: only the sequences that the first --steps steps read (same --seed, "
                        "--batch-tokens and --source-weights) and the held-out ones; a stage that walks part of an "
                        "epoch then fills a fraction of the data (training computes any other sequence it meets)")
    t.add_argument("--draft-vocab", type=_int, default=0,
                   help="heads score only the N >= 2 most frequent answer tokens (0 = full vocabulary): cheaper "
                        "drafting and training; verification still uses the full vocabulary")
    t.add_argument("--source-weights", default=None,
                   help="'SOURCE=W,...': each epoch holds W copies of that source's sequences (fractions drawn per "
                        "epoch; 0 drops it; unlisted sources weigh 1), e.g. 'alpaca_en_demo=3,gsm8k_train=0.5'")
    t.add_argument("--init", default="identity", choices=["identity", "default"],
                   help="identity: heads start as the target's own next-token head (default)")
    t.add_argument("--init-from", default=None,
                   help="start from these trained heads ('default': the --kind heads shipped for --model, or a "
                        "shipped heads name such as smollm2-135m-amphista; same target and layout, or a "
                        "deeper one: added layers start as pass-throughs, so training starts from exactly the "
                        "source's drafts)")
    t.add_argument("--layers-per-stage", type=_int, default=None, help="Amphista: SAL layers per stage (default 1)")
    t.add_argument("--aeb-layers", type=_int, default=None, help="Amphista: auto-embedding layers (default 1)")
    t.add_argument("--sal-intermediate-size", type=_int, default=None,
                   help="Amphista: SAL MLP width (default: Llama's for the model width; 1536 for smollm2-135m)")
    t.add_argument("--aeb-intermediate-size", type=_int, default=None, help="Amphista: AEB MLP width (default: as SAL)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("tree-search", help="fit static trees to trained heads on the held-out split of their "
                       "training data; --save stores them in the heads as tuned-N")
    s.add_argument("--data", required=True, nargs="+", action="extend",
                   help="the JSONL shard(s) the heads were trained on")
    s.add_argument("--heads", required=True, help="heads directory, 'default' (the Amphista heads shipped for "
                   "--model) or a shipped heads name (smollm2-135m-amphista, smollm2-135m-medusa)")
    _model_args(s)
    s.add_argument("--nodes", default="16,32,63", help="comma list of tree sizes (nodes incl. the root)")
    s.add_argument("--dynamic", default=None,
                   help="comma list of dynamic-N sizes to replay on the held-out split and record (default: "
                        "--nodes up to 64; '' for none): `--speculative auto` weighs the trees the heads record")
    s.add_argument("--eval-frac", type=_float, default=None,
                   help="the held-out share to fit on (default: the one the heads' `train` run recorded, else 0.05)")
    s.add_argument("--cache-hidden", default=None, help="the hidden-state cache of `train`, if any")
    s.add_argument("--max-seq-len", type=_int, default=1024)
    s.add_argument("--out", default=None, help="JSON file with the trees and their expected tau")
    s.add_argument("--save", action="store_true", help="add the trees to HEADS/config.json as PREFIX-N")
    s.add_argument("--prefix", default="tuned", help="name the fitted trees PREFIX-N (default tuned; a simple name "
                   "that does not make built-in ones such as dynamic-N, chain-N, tree-16)")
    s.add_argument("--source-weights", default=None,
                   help="weigh each held-out position by its source, as `train` does ('src=w,...'; unlisted "
                        "sources weigh 1, 0 drops one): fits the trees to the mix they will serve")
    s.set_defaults(func=cmd_tree_search)

    e = sub.add_parser("eval-tau", help="mean tau per category on a Spec-Bench question file (first turns)")
    e.add_argument("--questions", required=True)
    e.add_argument("--heads", required=True, help="heads directory, 'default' (the heads shipped for --model: "
                   "Amphista, or those of --speculative) or a shipped heads name (smollm2-135m-amphista, ...)")
    e.add_argument("--speculative", default="auto", choices=["auto", "amphista", "medusa"])
    _model_args(e)
    e.add_argument("--tree", default=None, help="static tree name, dynamic-N, or a JSON path list")
    e.add_argument("--max-new-tokens", type=_int, default=256)
    e.add_argument("--max-seq-len", type=_int, default=2048)
    e.add_argument("--limit", type=_int, default=None, help="first N questions")
    e.add_argument("--per-category", type=_int, default=None, help="first N questions of every category")
    e.add_argument("--out", default=None, help="JSON results file")
    e.set_defaults(func=cmd_eval_tau)

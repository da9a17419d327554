"""`amphista` command line. Answers go to stdout; progress, timing and errors to stderr."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import AmphistaError


def _add_quant_arg(p: argparse.ArgumentParser):
    p.add_argument("--quant", default="auto", choices=["auto", "q4", "none"],
                   help="CPU weights: auto (default) keeps a GGUF file's 4-bit layers 4-bit (int4 kernel, int8 LM "
                        "head); q4 quantizes any model so; none multiplies dequantized weights in --dtype")


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m",
                   help="checkpoint directory, .gguf file, or alias (default: smollm2-135m, the embedded model)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="weights and cache dtype (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="static KV cache length")
    _add_quant_arg(p)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay decode steps from CUDA graphs (GPU only; on by default, --no-cuda-graphs for eager)")


def _add_decoding_args(p: argparse.ArgumentParser):
    p.add_argument("--heads", default="default",
                   help="drafting-heads directory; 'default' = the heads shipped for the model if any; 'none'")
    p.add_argument("--speculative", default="auto", choices=["auto", "amphista", "medusa", "none"],
                   help="drafting method (auto: whatever --heads holds, if a quick timing on the CPU says it is "
                        "faster than plain decoding there; none: plain decoding)")
    p.add_argument("--tree", default=None, help="static tree name (e.g. mc_sim_7b_63, mix-8), dynamic-N, a JSON path "
                   "list, or auto: the fastest of the heads' fitted trees here (the default under --speculative auto)")


def cmd_generate(args) -> int:
    from .engine import Engine
    from .shipped_heads import resolve_heads

    print(f"loading {args.model} ...", file=sys.stderr)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                                    cuda_graphs=args.cuda_graphs, quant=args.quant)
    if engine.quant == "q4":
        print(f"weights: {engine.linears.describe()} (--quant none for {str(engine.dtype).removeprefix('torch.')})",
              file=sys.stderr)
    speculative = resolve_heads(engine, args.heads, args.speculative)
    check, tree = None, args.tree
    if speculative is not None and engine.device.type == "cpu":
        # auto means "the faster of the two": on some CPUs a tree step costs more than the heads save; with no
        # --tree (or --tree auto) the check also picks the fastest of the heads' fitted trees
        kind = speculative
        speculative, tree, check = engine.resolve_speculation("auto" if args.speculative == "auto" else kind, tree)
        if check is not None:
            print(f"note: {check.reason}" + ("" if check.pays else f" (--speculative {kind} uses the heads anyway)"),
                  file=sys.stderr)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop or None,
                  seed=args.seed, chat=args.chat, speculative=speculative, tree=tree)
    if args.json:
        result = engine.generate(args.prompt, **kwargs)
        out = result.to_dict()
        out["speculative"] = speculative
        out["weights"] = {"dtype": str(engine.dtype).removeprefix("torch."), "quant": engine.quant,
                          "linears": engine.linears.describe()}
        if check is not None:
            out["speculation_check"] = check.to_dict()
        print(json.dumps(out))
    else:
        for chunk in engine.stream(args.prompt, **kwargs):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        result = engine.last_result
        method = f"{speculative} {result.stats.extra['tree']}" if speculative else "plain"
        print(f"[{method}] {result.stats.summary()} | finish: {result.finish_reason}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amphista", description="Amphista speculative decoding engine")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt (streams text to stdout)")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_decoding_args(g)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the model's chat template (default: when the model has one)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)

    from .evaluation.commands import register as register_evaluation
    from .training.commands import register as register_training
    register_training(sub)
    register_evaluation(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AmphistaError as e:
        print(f"amphista: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

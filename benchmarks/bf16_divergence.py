"""Where bf16 speculative greedy output first leaves bf16 plain greedy output, and whether it is a near-tie.

For the first N MT-Bench first turns: plain and Amphista (tree-16) greedy decoding in bf16 on the CPU; at the
first differing token, one full-prefix forward gives both tokens' logits in bf16 and in fp32. A gap within bf16's
spacing (0.125 at logits 16-32) means a rounding-level tie, not a decoding bug.

    OMP_NUM_THREADS=2 python benchmarks/bf16_divergence.py [--questions 8] [--max-new-tokens 128] [--tree tree-16]
"""
import argparse
import json
from pathlib import Path

import torch

from amphista_engine import Engine

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=8, help="the first N MT-Bench questions")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tree", default="tree-16")
    ap.add_argument("--heads", default=str(ROOT / "amphista_engine/data/heads/smollm2-135m-amphista"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/mt_bench.jsonl"))
    args = ap.parse_args()
    qs = [json.loads(line) for line in open(args.data)]
    e = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="bf16", max_seq_len=1024, heads=args.heads,
                               quant="none")
    f = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024, quant="none")
    for q in qs[:args.questions]:
        p = q["turns"][0]
        a = e.generate(p, max_new_tokens=args.max_new_tokens).token_ids
        b = e.generate(p, max_new_tokens=args.max_new_tokens, speculative="amphista", tree=args.tree).token_ids
        i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
        if i is None:
            print(q["question_id"], "same")
            continue
        ids = e.encode_prompt(p) + a[:i]
        x = torch.tensor([ids])
        pos = torch.arange(len(ids))[None]
        with torch.no_grad():
            lb = e.model(x, pos)[0, -1].float()
            lf = f.model(x, pos)[0, -1].float()
        print(q["question_id"], "first diff at", i, "plain tok", a[i], "spec tok", b[i],
              "| bf16 prefix-forward logits: plain %.3f spec %.3f" % (lb[a[i]], lb[b[i]]),
              "| fp32 logits: plain %.3f spec %.3f" % (lf[a[i]], lf[b[i]]))


if __name__ == "__main__":
    main()

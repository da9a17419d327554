"""Where bf16 speculative greedy output first leaves bf16 plain greedy output, and whether it is a near-tie.

For the first N MT-Bench first turns: plain and Amphista (tree-16) greedy decoding in bf16 on the CPU; at the
first differing token, one full-prefix forward gives both tokens' logits in bf16 and in fp32. A gap within bf16's
spacing (0.125 at logits 16-32) means a rounding-level tie, not a decoding bug.

    OMP_NUM_THREADS=2 python benchmarks/bf16_divergence.py
"""
import json, torch
from amphista_engine import Engine
H = "amphista_engine/data/heads/smollm2-135m-amphista"
qs = [json.loads(l) for l in open("../shared/data/mt_bench.jsonl")]
e = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="bf16", max_seq_len=1024, heads=H, quant="none")
f = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024, quant="none")
for q in qs[:8:1]:
    p = q["turns"][0]
    a = e.generate(p, max_new_tokens=128).token_ids
    b = e.generate(p, max_new_tokens=128, speculative="amphista", tree="tree-16").token_ids
    i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
    if i is None:
        print(q["question_id"], "same"); continue
    ids = e.encode_prompt(p) + a[:i]
    x = torch.tensor([ids]); pos = torch.arange(len(ids))[None]
    with torch.no_grad():
        lb = e.model(x, pos)[0, -1].float()
        lf = f.model(x, pos)[0, -1].float()
    top = lb.topk(2)
    print(q["question_id"], "first diff at", i, "plain tok", a[i], "spec tok", b[i],
          "| bf16 prefix-forward logits: plain %.3f spec %.3f" % (lb[a[i]], lb[b[i]]),
          "| fp32 logits: plain %.3f spec %.3f" % (lf[a[i]], lf[b[i]]))

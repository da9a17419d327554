"""A/B: target forwards over N rows on the CPU in fp32, F.linear vs oneDNN-packed fp32 weights.

Question: is the fp32 tree verification slow on the CPU because of MKL's small-M sgemm, and does packing the
weights for oneDNN once (what kernels/cpu_packed.py does for bf16) fix it? Result on the dev machine
(benchmarks/results/cpu_fp32_pack_ab.md): 0.98-1.24x, so the engine does not pack fp32 weights.

    OMP_NUM_THREADS=2 python benchmarks/cpu_fp32_pack_ab.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import time, torch, torch.nn.functional as F
from torch import nn
from amphista_engine.engine import Engine
from amphista_engine.model import AttentionSpec, causal_mask
torch.set_grad_enabled(False)
mk = torch.ops.mkldnn
class PL(nn.Linear):
    def forward(self, x):
        if x.numel() == x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        return mk._linear_pointwise(x, self._p, self.bias, "none", [], "")
def make(pack):
    e = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=1024)
    if pack:
        if e.model.output.weight is e.model.tok_embeddings.weight:
            pass
        for m in e.model.modules():
            if type(m) is nn.Linear:
                m.__class__ = PL; m._p = mk._reorder_linear_weight(m.weight.detach(), 16)
    return e
engs = {"plain-F.linear": make(False), "onednn-packed": make(True)}
L = 300
def fwd(e, N):
    cache = e._cache_for(1); cache.length[:1] = L
    toks = torch.arange(N)[None] * 37 + 5; pos = (L + torch.arange(N))[None]
    return e.model(toks, pos, cache, AttentionSpec(cache.length[:1], causal_mask(N, "cpu"), 512), return_hidden=True)
a = fwd(engs["plain-F.linear"], 8)[0]; b = fwd(engs["onednn-packed"], 8)[0]
print("max rel diff logits", ((a - b).abs().max() / a.abs().max()).item())
res = {}
for rep in range(9):
    for N in (1, 4, 8, 16, 32, 64):
        for k, e in engs.items():
            t = time.perf_counter(); fwd(e, N); res.setdefault((k, N), []).append(time.perf_counter() - t)
for N in (1, 4, 8, 16, 32, 64):
    r = sorted(res[("plain-F.linear", N)])[4] * 1e3; c = sorted(res[("onednn-packed", N)])[4] * 1e3
    print(f"N={N}: F.linear {r:.1f} ms, packed {c:.1f} ms, x{r / c:.2f}")

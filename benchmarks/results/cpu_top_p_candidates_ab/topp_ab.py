import statistics
from amphista_engine import Engine, sampling as S
e = Engine.from_pretrained("smollm2-135m", device="cpu")
e.load_heads("default")
res = {}
for rnd in range(3):
    for name, k in (("candidates", 1024), ("full sort", 10**9)):
        S.NUCLEUS_CANDIDATES = k
        for sp in (None, "amphista"):
            r = e.generate("Write a short story about a robot learning to paint.", max_new_tokens=128, temperature=0.7,
                           top_p=0.9, seed=rnd, speculative=sp, tree="mix-4" if sp else None)
            res.setdefault((name, sp), []).append(r.stats.decode_tokens_per_s)
for k, v in res.items():
    print(k, "median tok/s %.1f" % statistics.median(v), [round(x, 1) for x in v])

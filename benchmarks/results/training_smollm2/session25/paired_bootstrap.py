"""Paired question bootstrap of two eval-tau runs on the same questions: is NEW's tau gain over OLD more than
question-to-question noise?  tau is eval-tau's own aggregate (sum of step tokens / sum of decode steps).
    python paired_bootstrap.py NEW.json OLD.json [--draws 5000]"""
import argparse
import json
import random

p = argparse.ArgumentParser()
p.add_argument("new")
p.add_argument("old")
p.add_argument("--draws", type=int, default=5000)
a = p.parse_args()
new, old = ({q["question_id"]: q for q in json.load(open(f))["per_question"]} for f in (a.new, a.old))
if set(new) != set(old):
    raise SystemExit(f"the runs cover different questions ({len(new)} vs {len(old)})")
qs = sorted(new)


def tau(rows, sample):
    return sum(rows[q]["step_tokens"] for q in sample) / sum(rows[q]["decode_steps"] for q in sample)


rng = random.Random(0)
gains, taus = [], []
for _ in range(a.draws):
    s = [rng.choice(qs) for _ in qs]
    gains.append(tau(new, s) / tau(old, s) - 1)
    taus.append(tau(new, s))
gains.sort(), taus.sort()
lo, hi = int(0.025 * a.draws), int(0.975 * a.draws) - 1
print(f"new {tau(new, qs):.4f}  old {tau(old, qs):.4f}  gain {100 * (tau(new, qs) / tau(old, qs) - 1):+.2f}% "
      f"(95% CI {100 * gains[lo]:+.2f}%..{100 * gains[hi]:+.2f}%, P(gain > 0) = {sum(g > 0 for g in gains) / a.draws:.3f}); "
      f"new tau 95% CI over questions {taus[lo]:.3f}..{taus[hi]:.3f}; "
      f"{sum(new[q]['tau'] > old[q]['tau'] for q in qs)} questions up, {sum(new[q]['tau'] < old[q]['tau'] for q in qs)} down")

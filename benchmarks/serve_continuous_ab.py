"""Continuous batching in `amphista serve`, A/B: requests that arrive while a run decodes join it (on) or wait for
the next run (off). One process, one engine, two servers over it, the same arrival schedule replayed against each
in turn (rounds alternate which goes first, so a noisy VM's drift falls on both alike).

Clients send MT-Bench first turns (chat completions, greedy, max_tokens drawn from --max-tokens) at Poisson arrival
times of mean gap --gap seconds. Reported per arm: mean and p90 request latency (send to last byte), mean time to
first token (streamed), the time from the first send to the last answer, and generated tokens per second over it.
Every answer is checked equal between the arms (greedy, the same engine: a joined row decodes as alone).
Writes benchmarks/results/serve_continuous_ab/serve_continuous_ab.{json,md} (or --out DIR).

    OMP_NUM_THREADS=2 python benchmarks/serve_continuous_ab.py [--requests 24] [--gap 0.25] [--max-batch 4]
"""
import argparse
import json
import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amphista_engine.engine import Engine  # noqa: E402
from amphista_engine.evaluation.questions import read_questions  # noqa: E402
from amphista_engine.serving.server import make_server  # noqa: E402
from benchmarks.common import RESULTS, hardware, md_table, write_results  # noqa: E402

MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"


def one_request(url: str, body: dict, out: dict, t_zero: float):
    """Streams one chat completion; out gets latency, ttft, text and completion tokens."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    text, first, usage = [], None, None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for c in event.get("choices") or ():
                piece = c.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    t1 = time.perf_counter()
    out.update(latency=t1 - t0, ttft=(first or t1) - t0, text="".join(text), end=t1 - t_zero,
               tokens=(usage or {}).get("completion_tokens", 0))


def replay(url: str, schedule: list[tuple[float, dict]]) -> list[dict]:
    """Sends each body at its time (seconds from now), each from its own thread; the replies in order."""
    results = [dict() for _ in schedule]
    threads = []
    t_zero = time.perf_counter()
    for (at, body), out in zip(schedule, results):
        delay = at - (time.perf_counter() - t_zero)
        if delay > 0:
            time.sleep(delay)
        threads.append(threading.Thread(target=one_request, args=(url, body, out, t_zero)))
        threads[-1].start()
    for t in threads:
        t.join()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--gap", type=float, default=0.25, help="mean seconds between arrivals (Poisson)")
    ap.add_argument("--max-tokens", default="32,64,128", help="max_tokens drawn from these")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quant", default="auto")
    ap.add_argument("--speculative", default="none", help="the servers' method (none, auto, amphista)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    engine = Engine.from_pretrained("smollm2-135m", device="cpu", heads="default", quant=args.quant,
                                    max_seq_len=1024)
    rng = random.Random(args.seed)
    questions = read_questions(MT_BENCH, limit=args.requests)
    limits = [int(x) for x in args.max_tokens.split(",")]
    t, schedule = 0.0, []
    for q in questions:
        schedule.append((t, {"messages": [{"role": "user", "content": q["turns"][0]}], "stream": True,
                             "max_tokens": rng.choice(limits), "stream_options": {"include_usage": True}}))
        t += rng.expovariate(1 / args.gap)
    speculative = None if args.speculative == "none" else args.speculative
    servers = {}
    for arm, continuous in (("continuous", True), ("wait", False)):
        httpd = make_server(engine, "127.0.0.1", 0, quiet=True, max_batch=args.max_batch, continuous=continuous,
                            speculative=speculative)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers[arm] = httpd
    replay(servers["continuous"].url, schedule[:2])      # warm-up: first-call costs out of the timings
    got: dict[str, list[dict]] = {arm: [] for arm in servers}
    for r in range(args.rounds):
        for arm in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
            got[arm].append(replay(servers[arm].url, schedule))
            print(f"round {r + 1} {arm}: {max(x['end'] for x in got[arm][-1]):.2f} s", file=sys.stderr)
    for httpd in servers.values():
        httpd.shutdown()
        httpd.server_close()
    texts = {arm: [x["text"] for x in runs[0]] for arm, runs in got.items()}
    mismatches = sum(a != b for a, b in zip(texts["continuous"], texts["wait"]))
    rows = []
    for arm, runs in got.items():
        lat = [x["latency"] for run in runs for x in run]
        ttft = [x["ttft"] for run in runs for x in run]
        span = statistics.mean(max(x["end"] for x in run) for run in runs)
        tokens = statistics.mean(sum(x["tokens"] for x in run) for run in runs)
        rows.append({"arm": arm, "mean_latency_s": statistics.mean(lat),
                     "p90_latency_s": statistics.quantiles(lat, n=10)[-1], "mean_ttft_s": statistics.mean(ttft),
                     "makespan_s": span, "tok_per_s": tokens / span})
    base = next(r for r in rows if r["arm"] == "wait")
    for r in rows:
        r["latency_vs_wait"] = base["mean_latency_s"] / r["mean_latency_s"]
    table = md_table(rows, ["arm", "mean_latency_s", "p90_latency_s", "mean_ttft_s", "makespan_s", "tok_per_s",
                            "latency_vs_wait"])
    meta = {"hardware": hardware(engine.device), "model": "smollm2-135m", "quant": engine.quant, "speculative": args.speculative,
            "requests": args.requests, "mean_gap_s": args.gap, "max_tokens": args.max_tokens,
            "max_batch": args.max_batch, "rounds": args.rounds, "answers_differing_between_arms": mismatches}
    write_results("serve_continuous_ab", rows, meta, table, Path(args.out) if args.out else
                  RESULTS / "serve_continuous_ab")


if __name__ == "__main__":
    main()

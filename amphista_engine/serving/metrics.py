"""`GET /metrics`: the server's counters in the Prometheus text exposition format (0.0.4), standard library only.

Handler threads count requests (one update per reply), the scheduler thread counts runs (one update per run start
and per run end): never per token, so a scrape costs a decode step nothing. Every update and the rendering hold one
lock; the gauges (requests waiting and running) are read from the scheduler at scrape time.

The latency histograms (vLLM's vllm:time_to_first_token_seconds, ...) are observed once per successful reply, from
timestamps (time.perf_counter) the request's Jobs carry (batching.Job): `arrived` (the handler parsed the request,
before it waits), `scheduled` (the run that decodes it started, or it joined a running one), `first_token` (that
run's first item after the prefill that gave the job's rows their first token: the scheduler's "start", once per job
and run; the same for streamed and non-streamed requests, where a stream's headers and first chunk go out), and
`row_ends` (each choice's result handed to the handler). A request (all its prompts and n choices) is one observation
of queue time, TTFT (its earliest job) and e2e (arrival to its reply complete: a JSON body built, before it is sent, or
a stream's last event written); time per output token is one observation per choice of >= 2 tokens: (the choice's
end - its first token) / (its tokens - 1), vLLM's decode time per token (a short choice of n is not timed by the
longest). Errors and clients that left (499) are not observed; a max_tokens 0 request (echo: nothing decoded) has
no first token, so it is in the queue and e2e histograms only.
"""
from __future__ import annotations

import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# the endpoint label of a request: its route (/v1/models and /models alike), or "other" (an unknown path must not
# make a new series per path a scanner tries)
ENDPOINTS = {"/chat/completions": "/v1/chat/completions", "/completions": "/v1/completions", "/models": "/v1/models",
             "/health": "/health", "/metrics": "/metrics", "/tokenize": "/tokenize", "/detokenize": "/detokenize",
             "/responses": "/v1/responses", "/messages": "/v1/messages",
             "/messages/count_tokens": "/v1/messages/count_tokens"}


def endpoint(route: str | None) -> str:
    if route is None:
        return "other"
    if route.startswith("/models/"):
        return "/v1/models"
    return ENDPOINTS.get(route, "other")


def escape_label(value) -> str:
    """A label value as the exposition format quotes it: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


def _labels(pairs) -> str:
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs) + "}" if pairs else ""


# The latency histograms' upper bounds (seconds): vLLM's, down to 1 ms and up to minutes, as a slow CPU run takes them
LATENCY_BUCKETS = {
    "time_to_first_token": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                            10.0, 20.0, 40.0, 80.0, 160.0, 640.0),
    "request_queue_time": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                           160.0, 320.0, 640.0),
    "e2e_request_latency": (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                            50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0),
    "time_per_output_token": (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                              5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
}
LATENCY_HELP = {
    "time_to_first_token": "Seconds from a request's arrival to its first token (its run's first item after the "
                           "prefill that gave it), per successful request that decoded.",
    "request_queue_time": "Seconds a successful request waited from its arrival until the run that decoded it "
                          "started (or it joined a running one).",
    "e2e_request_latency": "Seconds from a successful request's arrival to its reply complete.",
    "time_per_output_token": "Seconds per output token after the first, per choice of 2 or more tokens (its end "
                             "less its first token, over its tokens less one).",
}


class Histogram:
    """A Prometheus histogram's state: a count per bucket (not cumulative; the last one past every bound), sum and
    count. observe(value, -1) takes an observation back (a run's rows counted again as it grew)."""

    def __init__(self, bounds, total=0):
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum, self.count = total, 0

    def observe(self, value, sign: int = 1):
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                break
        else:
            i = len(self.bounds)
        self.counts[i] += sign
        self.sum += sign * value
        self.count += sign

    def samples(self) -> list:
        """(suffix, labels, value) of its _bucket (cumulative, +Inf last), _sum and _count lines."""
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append(("_bucket", [("le", _number(float(bound)))], total))
        return out + [("_bucket", [("le", "+Inf")], self.count), ("_sum", (), self.sum), ("_count", (), self.count)]


def completion_tokens(result) -> int:
    """One answer's tokens as OpenAI's and vLLM's usage count them (vLLM's len(output.token_ids)): its token_ids and
    the token that ended it where the engine left that one out of them, an EOS (finish_reason "eos") or a
    stop_token_ids id ("stop"). Never a token that was not decoded: max_tokens and a stop string end the answer on a
    token it keeps. The engine's own counts (stats.new_tokens, tokens/s) stay len(token_ids)."""
    # stop_reason: the stop token id (an int) or the stop string (kept in token_ids) that ended a "stop"
    return len(result.token_ids) + (result.finish_reason == "eos" or isinstance(result.stop_reason, int))


def request_latency(jobs, results, done: float) -> dict:
    """A successful request's latencies (seconds) from its Jobs' timestamps (the module's docstring):
    {"request_queue_time": s, "e2e_request_latency": s, "time_to_first_token": s or None (nothing decoded),
    "time_per_output_token": [s per choice of >= 2 tokens]}. results: per job, its results (one per choice); done:
    when the reply was complete (time.perf_counter)."""
    arrived = min(job.arrived for job in jobs)
    scheduled = [job.scheduled for job in jobs if job.scheduled is not None]
    decoded = [job for job in jobs if job.options.get("max_new_tokens") != 0 and job.first_token is not None]
    tpot = []
    for job, rs in zip(jobs, results):
        if job not in decoded:
            continue
        for choice, r in enumerate(rs):
            # the ending EOS took its decode step too: counted as usage counts it (vLLM's TPOT alike)
            end, tokens = job.row_ends.get(choice), completion_tokens(r)
            if end is not None and tokens >= 2:
                tpot.append(max(0.0, end - job.first_token) / (tokens - 1))
    return {"request_queue_time": max(0.0, min(scheduled, default=done) - arrived),
            "e2e_request_latency": max(0.0, done - arrived),
            "time_to_first_token": max(0.0, min(j.first_token for j in decoded) - arrived) if decoded else None,
            "time_per_output_token": tpot}


def row_buckets(max_batch: int) -> list[int]:
    """The rows-per-run histogram's upper bounds: powers of two below max_batch, and max_batch itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class Metrics:
    """Cumulative counters since the server started. waiting/running: callables giving the gauges at scrape time;
    info: the labels of amphista_model_info (model, method)."""

    def __init__(self, max_batch: int, info: dict, waiting=None, running=None, started: float = 0.0):
        self._lock = threading.Lock()
        self.info = dict(info)
        self.waiting, self.running, self.started = waiting, running, started
        self.rows = Histogram(row_buckets(max_batch))     # rows per run
        self.latency = {name: Histogram(bounds, 0.0) for name, bounds in LATENCY_BUCKETS.items()}
        self.requests: Counter = Counter()          # endpoint -> replies
        self.errors: Counter = Counter()            # (endpoint, status) -> replies with status >= 400
        self.finished: Counter = Counter()          # engine finish reason -> choices answered
        self.runs = 0
        self.prompt_tokens = self.generation_tokens = 0
        self.decode_steps = self.accepted_tokens = 0
        self.prefill_s = self.decode_s = 0.0

    # ---- updates: one per reply, one per run ------------------------------------------------------------------
    def reply(self, route: str | None, status: int):
        ep = endpoint(route)
        with self._lock:
            self.requests[ep] += 1
            if status >= 400:
                self.errors[ep, str(status)] += 1

    def answered(self, results, reasons=None, latency: dict | None = None):
        """The choices of a request answered in full: their engine finish reasons (eos, stop, length), or where
        reasons (one per result) gives one, that ("tool_calls": a chat answer of tool calls, which the engine ended
        with eos or a stop). latency: the request's (request_latency), observed in the latency histograms."""
        given = list(reasons or ()) + [None] * (len(results) - len(reasons or ()))
        reasons = [str(g or r.finish_reason) for r, g in zip(results, given)]
        with self._lock:
            self.finished.update(reasons)
            for name, seconds in (latency or {}).items():
                for s in seconds if isinstance(seconds, list) else [] if seconds is None else [seconds]:
                    self.latency[name].observe(s)

    def run_started(self, rows: int):
        """rows: the run's, one per choice of each of its requests (OpenAI's n)."""
        with self._lock:
            self.runs += 1
            self.rows.observe(rows)

    def run_grew(self, before: int, after: int):
        """A run counted with `before` rows took requests as it decoded (continuous batching; or gave back one
        refused as it joined): it counts as a run of `after` rows. Counted at the start only, a run that began
        with one request and decoded eight as others joined read as no batching at all."""
        with self._lock:
            self.rows.observe(before, -1)
            self.rows.observe(after)

    def run_ended(self, results):
        """A run that decoded to its end: its rows' tokens and steps, and its times (a batch's rows share them, so
        the run's are its longest row's, not their sum)."""
        results = [r for r in results if r is not None]
        if not results:
            return
        stats = [r.stats for r in results]
        prompt = sum(len(r.prompt_token_ids) for r in results)
        # as usage's completion_tokens counts them (an ending EOS included): the counter is their sum
        new = sum(completion_tokens(r) for r in results)
        steps, accepted = sum(s.decode_steps for s in stats), sum(s.step_tokens for s in stats)
        prefill, decode = max(s.prefill_ms for s in stats) / 1e3, max(s.decode_ms for s in stats) / 1e3
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += new
            self.decode_steps += steps
            self.accepted_tokens += accepted
            self.prefill_s += prefill
            self.decode_s += decode

    # ---- the scrape -------------------------------------------------------------------------------------------
    def render(self) -> str:
        # the gauges first, outside the lock: they take the scheduler's own
        waiting = self.waiting() if self.waiting is not None else 0
        running = self.running() if self.running is not None else 0
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for suffix, labels, value in samples:
                out.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")

        with self._lock:
            metric("amphista_model_info", "gauge", "The served model and its default decoding method (1).",
                   [("", sorted(self.info.items()), 1)])
            metric("amphista_start_time_seconds", "gauge", "When the server started (Unix time).",
                   [("", (), float(self.started))])
            metric("amphista_requests_total", "counter", "HTTP requests answered, by endpoint.",
                   [("", [("endpoint", ep)], n) for ep, n in sorted(self.requests.items())])
            metric("amphista_request_errors_total", "counter",
                   "HTTP requests answered with an error status (499: the client left), by endpoint and status.",
                   [("", [("endpoint", ep), ("status", st)], n) for (ep, st), n in sorted(self.errors.items())])
            metric("amphista_request_success_total", "counter",
                   "Choices answered in full, by finish reason (the engine's eos, stop, length; tool_calls).",
                   [("", [("finish_reason", r)], n) for r, n in sorted(self.finished.items())])
            metric("amphista_prompt_tokens_total", "counter", "Prompt tokens of the runs decoded.",
                   [("", (), self.prompt_tokens)])
            metric("amphista_generation_tokens_total", "counter", "Tokens generated by the runs decoded.",
                   [("", (), self.generation_tokens)])
            metric("amphista_runs_total", "counter", "Engine runs started (a run decodes one or more requests).",
                   [("", (), self.runs)])
            metric("amphista_run_rows", "histogram", "Rows decoded together per run (one per choice of each request, "
                   "those that joined it as it decoded too).", self.rows.samples())
            metric("amphista_decode_steps_total", "counter",
                   "Target forward passes after prefill, summed over rows (tau = accepted tokens / steps).",
                   [("", (), self.decode_steps)])
            metric("amphista_decode_accepted_tokens_total", "counter",
                   "Tokens the decode steps emitted (drafted and accepted, plus each step's own), summed over rows.",
                   [("", (), self.accepted_tokens)])
            metric("amphista_prefill_seconds_total", "counter", "Seconds of prefill, per run.",
                   [("", (), self.prefill_s)])
            metric("amphista_decode_seconds_total", "counter", "Seconds of decoding after prefill, per run.",
                   [("", (), self.decode_s)])
            for name, hist in self.latency.items():
                metric(f"amphista_{name}_seconds", "histogram", LATENCY_HELP[name], hist.samples())
        metric("amphista_requests_waiting", "gauge", "Requests waiting for a run.", [("", (), waiting)])
        metric("amphista_requests_running", "gauge", "Requests in the run decoding now.", [("", (), running)])
        return "\n".join(out) + "\n"

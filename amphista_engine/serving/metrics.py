"""`GET /metrics`: the server's counters in the Prometheus text exposition format (0.0.4), standard library only.

Handler threads count requests (one update per reply), the scheduler thread counts runs (one update per run start
and per run end): never per token, so a scrape costs a decode step nothing. Every update and the rendering hold one
lock; the gauges (requests waiting and running) are read from the scheduler at scrape time.
"""
from __future__ import annotations

import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# the endpoint label of a request: its route (/v1/models and /models alike), or "other" (an unknown path must not
# make a new series per path a scanner tries)
ENDPOINTS = {"/chat/completions": "/v1/chat/completions", "/completions": "/v1/completions", "/models": "/v1/models",
             "/health": "/health", "/metrics": "/metrics", "/tokenize": "/tokenize", "/detokenize": "/detokenize"}


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
        self.buckets = row_buckets(max_batch)
        self.requests: Counter = Counter()          # endpoint -> replies
        self.errors: Counter = Counter()            # (endpoint, status) -> replies with status >= 400
        self.finished: Counter = Counter()          # engine finish reason -> choices answered
        self.runs = 0
        self.rows_hist = [0] * len(self.buckets)    # runs with rows <= each bound (made cumulative when rendered)
        self.rows_sum = 0
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

    def answered(self, results, reasons=None):
        """The choices of a request answered in full: their engine finish reasons (eos, stop, length), or where
        reasons (one per result) gives one, that ("tool_calls": a chat answer of tool calls, which the engine ended
        with eos or a stop)."""
        given = list(reasons or ()) + [None] * (len(results) - len(reasons or ()))
        reasons = [str(g or r.finish_reason) for r, g in zip(results, given)]
        with self._lock:
            self.finished.update(reasons)

    def run_started(self, rows: int):
        """rows: the run's, one per choice of each of its requests (OpenAI's n)."""
        with self._lock:
            self.runs += 1
            self._observe(rows, 1)

    def run_grew(self, before: int, after: int):
        """A run counted with `before` rows took requests as it decoded (continuous batching; or gave back one
        refused as it joined): it counts as a run of `after` rows. Counted at the start only, a run that began
        with one request and decoded eight as others joined read as no batching at all."""
        with self._lock:
            self._observe(before, -1)
            self._observe(after, 1)

    def _observe(self, rows: int, sign: int):
        self.rows_sum += sign * rows
        for i, bound in enumerate(self.buckets):
            if rows <= bound:
                self.rows_hist[i] += sign
                break

    def run_ended(self, results):
        """A run that decoded to its end: its rows' tokens and steps, and its times (a batch's rows share them, so
        the run's are its longest row's, not their sum)."""
        results = [r for r in results if r is not None]
        if not results:
            return
        stats = [r.stats for r in results]
        prompt = sum(len(r.prompt_token_ids) for r in results)
        new = sum(len(r.token_ids) for r in results)
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
            cumulative, total = [], 0
            for bound, n in zip(self.buckets, self.rows_hist):
                total += n
                cumulative.append(("_bucket", [("le", f"{bound}.0")], total))
            metric("amphista_run_rows", "histogram", "Rows decoded together per run (one per choice of each request, "
                   "those that joined it as it decoded too).",
                   cumulative + [("_bucket", [("le", "+Inf")], self.runs), ("_sum", (), self.rows_sum),
                                 ("_count", (), self.runs)])
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
        metric("amphista_requests_waiting", "gauge", "Requests waiting for a run.", [("", (), waiting)])
        metric("amphista_requests_running", "gauge", "Requests in the run decoding now.", [("", (), running)])
        return "\n".join(out) + "\n"

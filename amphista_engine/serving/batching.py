"""Batching of concurrent requests: one scheduler thread owns the engine and decodes the requests that wait when a run
starts, and that can share a run, as one engine.stream_batch.

HTTP handler threads hand in a Job and read what the scheduler sends back on its queue:
("start", None) once its run has begun (prefilled), ("delta", (choice, text)) as one of its rows decodes,
("end", (choice, result)) when that row ends (stream_batch's row_results: a short answer is not held until the batch's
last row ends), or ("error", exception) in place of any of them. A Job has one row per choice (OpenAI's `n`: its
prompt n times), always decoded in one run: its rows count against max_batch together, and a request that runs alone
(a seed that samples) runs its n rows as a run of their own, the same each time.

Why a run cannot simply hold every waiting request:
- stream_batch's options (temperature, stop, seed, speculative, tree, chat...) are batch-wide, so only requests whose
  options are identical once the server's defaults are filled in share a run (batch_key); max_tokens is not one of
  them: stream_batch takes a list of one max_new_tokens per prompt, and each row ends at its own;
- a request that arrives while a run decodes joins it between two steps where it could have shared it (continuous
  batching: stream_batch's admit), taking a row that ended or one the run never filled: the oldest waiting requests
  first; a request that cannot join (other options) lets max_batch joiners pass it, then the run takes no more, so
  it waits for at most that many answers more than it would have. One the engine refuses as
  it joins (too long for the cache with the run's tree, say) goes back to wait and runs by itself, where it gets
  the answer or the error it would get anyway.

/metrics' latency histograms read timestamps a Job carries (metrics.request_latency): arrived (made), scheduled (its
run started, or it joined one), first_token (its "start": the run's first item after the prefill that gave its rows
their first token) and row_ends (each choice's "end"), each taken once per job or row, never per token.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
from collections import Counter

from ..errors import AmphistaError


class Job:
    """One request on its way through the scheduler: what it decodes and where its output goes."""

    def __init__(self, prompt, options: dict, variables: dict, stream: bool, n: int = 1):
        self.prompt = prompt
        self.n = n                      # choices: rows of one run, each the prompt (OpenAI's n; <= max_batch)
        self.options = options          # engine.stream_batch's keyword arguments, max_new_tokens too (decoding())
        self.variables = variables      # the chat template's variables it renders with
        self.stream = stream            # a streamed reply is under way once started: it cannot be run again
        self.key = batch_key(options, variables)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.gone = threading.Event()   # set by the handler once nobody reads the output (client left, reply sent)
        self.started = False            # "start" was sent
        self.ended = False              # "end" was sent for each of its n rows
        self.rows_ended = 0             # its rows whose "end" was sent, in the run decoding it
        self.rows = 0                   # the rows of the run that decoded it (the log line names a batch)
        # echo with logprobs: Engine.prompt_logprobs of its prompt, set by the run that decodes it (the server's start)
        self.prompt_scores = None
        # prompt_logprobs (vLLM's): its prompt's scores with their ranks, set alike (the server's ranked_prompt_scores)
        self.prompt_ranked = None
        # the request's "cache_prompt" (None: the server's --cache-prompt), honoured where it runs alone
        self.cache_prompt = None
        # its prompt's leading tokens a reuse_prefix run took from the cache: set before its "start" (the server's
        # _telling_reuse), as a stream's first event may tell them (Anthropic's message_start)
        self.prompt_tokens_reused = 0
        self.no_join = False            # refused as it joined a run: it runs by itself
        self.overtaken = 0              # requests that joined a run past this one while it waited (_admitter)
        # /metrics' latencies (time.perf_counter): set by the run that decodes it (a run again after an error, or
        # after it was refused as it joined, sets them anew); read by the handler once it has every "end"
        self.arrived = time.perf_counter()  # made once the handler has parsed the request, before it waits
        self.scheduled = None           # its run started (_run), or it joined a running one (_admitter)
        self.first_token = None         # its "start" was sent: its rows have their first token (_announce)
        self.row_ends: dict[int, float] = {}    # choice -> when its "end" was sent

    def send(self, kind: str, value=None):
        if not self.gone.is_set():
            self.events.put((kind, value))

    def end_row(self, choice: int, result):
        self.row_ends[choice] = time.perf_counter()
        self.rows_ended += 1
        self.ended = self.rows_ended >= self.n
        self.send("end", (choice, result))


def batch_key(options: dict, variables: dict) -> str | None:
    """Requests with equal keys can share a run: their batch-wide options are identical. None: the request runs alone.

    max_tokens is left out of the key: the engine ends each row at its own limit (stream_batch's per-prompt
    max_new_tokens list), with the text, finish_reason and usage the request gets alone, and a row that ended is
    dropped from the batch. Only max_tokens 0 (echo: the prompt's logprobs, nothing decoded) is kept apart: such
    a run decodes nothing (the server's _prompts_only)."""
    key = {k: v for k, v in options.items() if k not in ("cut_to_room", "max_new_tokens")}   # per row (_start_run)
    key["decodes"] = options.get("max_new_tokens") != 0
    if key.get("seed") is not None and key.get("temperature") != 0:
        # A seeded sampled row of a larger batch draws other random numbers than the same request alone (README):
        # a seed promises the same answer each time, so such a request is never batched.
        return None
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = key.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            key[name] = float(value)        # a client's temperature 0 and the server's default 0.0 are one option
    try:
        return json.dumps([key, variables], sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return None         # a value that is no JSON (a NaN): run alone, where the engine names what is wrong with it


class _Run:
    """A run's rows as the engine numbers them: each job's n choices in turn, in the order the jobs came in (those
    that joined after the start too)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs                # the caller's list, grown in place: its error paths see every job
        self.rows: list[tuple[Job, int]] = []
        self.ended: list[bool] = []
        self.dropped: set[int] = set()  # rows of a job that went back to wait: their output is nobody's
        self.held: dict[int, object] = {}   # the last row's result, held until the run ends (or others join)
        self.counted = 0                # the rows /metrics counts it with (its own and those that joined)
        for job in list(jobs):
            self.add(job)
        for job in jobs:
            job.rows = len(self.rows)

    def add(self, job: Job):
        if job not in self.jobs:
            self.jobs.append(job)
        self.rows += [(job, choice) for choice in range(job.n)]
        self.ended += [False] * job.n
        job.rows = self.decoding()      # the rows decoding with it as it joins (the log's "batch of"), its own too

    def decoding(self) -> int:
        """Rows not known to have ended (a row's result comes a little after the engine ends it: an upper bound)."""
        return sum(not e for i, e in enumerate(self.ended) if i not in self.dropped and i not in self.held)


def _named(error: AmphistaError, run: _Run, row: int | None = None) -> AmphistaError:
    """A row's error (no token left to choose) as its request is told it: the row the engine names ("at new token 2
    of prompt 3") is the run's own numbering, which tells a client nothing (and differed with what decoded beside
    it); the request's choice where it has several. row: the error's (else its prompt_index)."""
    at, row = getattr(error, "new_token", None), getattr(error, "prompt_index", None) if row is None else row
    if at is None or not isinstance(row, int) or not 0 <= row < len(run.rows):
        return error
    from ..generation import no_token_message
    job, choice = run.rows[row]
    named = type(error)(no_token_message([(f"choice {choice} of this request" if job.n > 1 else "this request",
                                           at)]))
    named.new_token = at
    return named


class Scheduler:
    """Runs jobs on one engine from one thread, several at once where they are compatible (up to max_batch).

    start(jobs) makes a run: engine.stream_batch of the jobs' prompts with their shared options, a generator of
    (row, delta) whose return value is the rows' results; it raises AmphistaError where the engine refuses."""

    def __init__(self, start, max_batch: int, encode=None):
        """start(jobs, admit): the run (admit: stream_batch's, or None where the run takes no joiners); encode(job):
        the job's prompt as token ids (its chat template rendered with its variables), for a job that joins a run
        between steps; None: no request joins a run that started (each waits for the next)."""
        self._start = start
        self._encode = encode
        self.max_batch = max_batch
        self.lock = threading.Lock()            # held while a run decodes (/health's "busy")
        self.batch_sizes: Counter = Counter()   # rows of each run started: how much batching happened
        self._pending: list[Job] = []           # in arrival order: the oldest runs first (no request starves)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._current: list[Job] = []           # the jobs of the run decoding now (the running gauge)
        # GET /metrics: the server's Metrics (run_started, run_ended), told once per run, never per step
        self.metrics = None

    def submit(self, job: Job):
        with self._wake:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._pending.append(job)
            if self._thread is None:        # started with the first request: an app never served holds no thread
                self._thread = threading.Thread(target=self._loop, name="amphista-scheduler", daemon=True)
                self._thread.start()
            self._wake.notify()

    def waiting(self) -> int:
        """Requests waiting for a run (not those decoding)."""
        with self._wake:
            return sum(not j.gone.is_set() for j in self._pending)

    def running(self) -> int:
        """Requests of the run decoding now that have not had their answer (nor left)."""
        return sum(not (j.ended or j.gone.is_set()) for j in self._current)

    def close(self):
        """Stops the thread once its run ends; requests still waiting are answered with an error."""
        with self._wake:
            self._closed = True
            left, self._pending = self._pending, []
            self._wake.notify()
        from .server import ApiError
        for job in left:
            job.send("error", ApiError(503, "the server is shutting down", kind="server_error"))

    # ---- the scheduler's thread ----------------------------------------------------------------------------
    def _loop(self):
        while (jobs := self._take()) is not None:
            try:
                self._current = jobs            # taken: no longer waiting (also while a caller holds the lock)
                with self.lock:
                    self._run(jobs)
            except Exception as e:  # noqa: BLE001 -- a bug here must not end the thread: every request would hang
                self._fail(jobs, self._bug(e, jobs))
            finally:
                self._current = []

    def _take(self) -> list[Job] | None:
        """The next run's jobs: the oldest waiting request and the later ones that can share its run."""
        with self._wake:
            while True:
                self._pending = [j for j in self._pending if not j.gone.is_set()]    # clients that left waiting
                if self._closed:
                    return None
                if self._pending:
                    break
                self._wake.wait()       # submit and close notify
            first, group = self._pending[0], [self._pending[0]]
            rows = first.n          # a job's rows go together: n <= max_batch (the server refuses more)
            if first.key is not None and not first.no_join:
                for job in self._pending[1:]:
                    if job.key == first.key and not job.no_join and rows + job.n <= self.max_batch:
                        group.append(job)
                        rows += job.n
            self._pending = [j for j in self._pending if j not in group]
            return group

    def _run(self, jobs: list[Job]):
        now = time.perf_counter()
        for job in jobs:
            job.scheduled = now
        run = _Run(jobs)
        try:
            steps = self._start(jobs, self._admitter(run))
        except AmphistaError as e:
            if len(jobs) > 1:
                idx = getattr(e, "prompt_index", None)
                owners = [job for job in jobs for _ in range(job.n)]     # the run's rows: each job's n in turn
                if isinstance(idx, int) and 0 <= idx < len(owners):
                    # One prompt refused the batch (malformed, or too long with its max_tokens): alone it gets the
                    # error it would get anyway (not "prompt 2: ..."), and the others still share a run.
                    refused = owners[idx]
                    self._run([refused])
                    rest = [j for j in jobs if j is not refused and not j.gone.is_set()]
                    return self._run(rest) if rest else None
                # Refused for the batch as a whole (memory for its rows): alone, each request gets the answer or the
                # error it would get anyway.
                return self._one_by_one(jobs)
            return self._fail(jobs, e)
        rows = sum(job.n for job in jobs)
        self.batch_sizes[rows] += 1
        if self.metrics is not None:
            self.metrics.run_started(rows)
        run.counted = rows
        try:
            self._relay(steps, run)
        except AmphistaError as e:
            steps.close()
            if len(jobs) == 1:      # alone (its n rows too): run again, it would fail again
                return self._fail(jobs, _named(e, run))
            # An error mid-run (a row's logits overflowed): the requests with nothing sent yet (non-streamed ones,
            # and all of them before the prefill ended) run again alone, where only the faulty one fails; a stream
            # already under way ends with the error; a row that ended before it has its answer already.
            open_jobs = [j for j in jobs if not j.ended]
            again = [j for j in open_jobs if not (j.stream and j.started)]
            self._fail([j for j in open_jobs if j not in again], e)
            return self._one_by_one(again)
        finally:
            # Ends the engine's run: a stream left suspended would keep it open (the next run would be refused as
            # overlapping it), and a batch whose clients all left stops decoding for nobody.
            steps.close()

    def _relay(self, steps, run: _Run):
        """Hands each row's deltas to its job (with the row's choice), then the results; returns early where every
        client left."""
        for job in run.jobs:
            job.rows_ended = 0
        while True:
            try:
                row, delta = next(steps)
            except StopIteration as end:
                results = end.value
                if self.metrics is not None:    # before the held last answer goes out: a scrape after it sees the run
                    self.metrics.run_ended(results)
                break
            job, choice = run.rows[row]
            if isinstance(delta, AmphistaError):      # refused as it joined: it waits again, to run by itself
                if row in run.dropped:
                    continue            # another of its rows' error answered it, or sent it back
                if (job.stream and job.started) or all(j is job for j in run.jobs):
                    # A row that failed mid-run (no token left to choose) where its stream sent deltas already, or
                    # in a run of its own: it ends with the error, as alone (sent back, a run of its own failed again)
                    run.dropped.update(i for i, (j, _) in enumerate(run.rows) if j is job)
                    job.send("error", _named(delta, run, row))
                    continue
                self._requeue(run, job)
                continue
            self._announce(run.jobs)    # at the first delta: the prefill went through for every row
            if row in run.dropped:
                continue
            if isinstance(delta, str):
                job.send("delta", (choice, delta))
            elif sum(run.ended) < len(run.ended) - len(run.dropped) - 1:   # a row's result as it ended (row_results)
                run.ended[row] = True
                job.end_row(choice, delta)
            else:
                # The last row's: held until the run's end (the next item), so that once every client has its
                # answer the engine is free again (a caller may use it directly then, not only through this thread);
                # sent at once where a request joins meanwhile (_admitter)
                run.held[row] = delta
            if all(j.gone.is_set() for j in run.jobs):
                return
        self._announce(run.jobs)
        for i, ((job, choice), result) in enumerate(zip(run.rows, results)):
            if not run.ended[i] and i not in run.dropped:
                run.ended[i] = True
                job.end_row(choice, run.held.get(i, result))

    def _admitter(self, run: _Run):
        """stream_batch's admit for this run: the oldest waiting requests that can share it, while their rows fit the
        free ones; None where nothing may join (a request that runs alone, or no encode)."""
        key = run.jobs[0].key if len(run.jobs) else None
        if self._encode is None or key is None:
            return None

        def admit(free: int) -> list:
            # the engine's cache may hold more rows than this server's --max-batch (reserved by an earlier use)
            free = min(free, self.max_batch - run.decoding())
            taken, passed = [], []
            with self._wake:
                self._pending = [j for j in self._pending if not j.gone.is_set()]
                for job in self._pending:
                    if job.key != key or job.no_join:
                        # One that cannot join waits for the run to end, which each joiner may put off: it lets
                        # max_batch joiners pass it, then the run takes no more (no request starves behind others)
                        if job.overtaken >= self.max_batch:
                            break
                        passed.append(job)
                        continue
                    if job.n > free:
                        break           # in arrival order among those that can join
                    taken.append(job)
                    free -= job.n
                    for waiting in passed:
                        waiting.overtaken += 1
                self._pending = [j for j in self._pending if j not in taken]
            entries = []
            for job in taken:
                try:
                    ids = self._encode(job)
                except AmphistaError:
                    self._requeue(run, job, joined=False)
                    continue
                except Exception as e:  # noqa: BLE001 -- a bug: this request's 500; the others taken still join
                    job.send("error", self._bug(e, [job]))      # (raised, it and the rest taken went unanswered)
                    continue
                run.add(job)
                job.scheduled = time.perf_counter()
                if job not in self._current:    # run.jobs is _current itself, but in a run of _one_by_one's
                    self._current.append(job)   # (twice, the running gauge counted a joiner as two requests)
                entries += [(ids, job.options["max_new_tokens"])] * job.n
            if entries:
                self._recount(run, len(entries))
                for row, result in run.held.items():    # the run goes on: the held answer is not held longer
                    job, choice = run.rows[row]
                    run.ended[row] = True
                    job.end_row(choice, result)
                run.held.clear()
            return entries
        return admit

    def _requeue(self, run: _Run, job: Job, joined: bool = True):
        """A job refused as it joined: back to the front of the queue, to run by itself."""
        if joined and job.no_join:
            return                      # its other rows' errors: already back
        job.no_join = True
        if joined:
            self._recount(run, -job.n)
            run.dropped.update(i for i, (j, _) in enumerate(run.rows) if j is job)
            run.jobs.remove(job)
            if job in self._current:
                self._current.remove(job)
        with self._wake:
            if not self._closed:
                self._pending.insert(0, job)
                self._wake.notify()
                return
        # closed meanwhile (close() answered the waiting ones): put back, it waited for a run that never came
        from .server import ApiError
        job.send("error", ApiError(503, "the server is shutting down", kind="server_error"))

    def _recount(self, run: _Run, rows: int):
        """/metrics' rows of this run, `rows` more (joined) or fewer (a joiner refused)."""
        if self.metrics is not None and run.counted:
            self.metrics.run_grew(run.counted, run.counted + rows)
        run.counted += rows

    @staticmethod
    def _announce(jobs: list[Job]):
        for job in jobs:
            if not job.started:
                job.started = True
                job.first_token = time.perf_counter()
                job.send("start")

    def _one_by_one(self, jobs: list[Job]):
        """Each job in a run of its own (its n rows together)."""
        for job in jobs:
            if not job.gone.is_set():
                job.started = False
                self._run([job])

    @staticmethod
    def _fail(jobs: list[Job], error: BaseException):
        for job in jobs:
            job.send("error", error)

    @staticmethod
    def _bug(e: Exception, jobs: list[Job]):
        """A bug as what its requests answer (a 500, as a handler thread's bug is); its traceback on stderr, once."""
        from .server import ApiError
        print(f"amphista serve: internal error decoding a run of {len(jobs)} request(s):", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
        return ApiError(500, f"internal server error ({type(e).__name__}: {str(e)[:200]}); the server's log has the "
                        f"details", kind="server_error", code="internal_error")

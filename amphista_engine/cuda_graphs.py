"""CUDA graphs for the decode loop: capture a decoder's `step_device(kv_len)` once, replay it every step.

A plain decode step of a small model, or a whole speculative step (draft, tree, verify, accept, commit),
is hundreds of small kernel launches; from Python each costs microseconds of CPU time, which for small
models or big trees is most of the step. A captured graph replays all of them with one launch.

    graphs = DecodeGraphs()                 # one per engine: graphs are reused by every decoder it makes
    decoder = graphs.attach(decoder)        # decoder.step_device now replays graphs (eager on the CPU)

How it stays correct:
  * Decoders update their state in place (`next`, `draft`, cache lengths, KV and SAL caches) and take the
    attention window `kv_len` as their only host input, so one graph per
    (decoder kind, model, heads, batch, tree, kv bucket, sampling mode) replays any step with that key.
  * The first step of each key runs eagerly (it is the real step and the warm-up: Triton compiles, cuBLAS
    picks algorithms, lazy tensors such as the heads' stage index get built); the second is captured and
    replayed, later ones are replayed. A key whose capture fails (an op that syncs with the host) runs
    eagerly from then on, with one warning.
  * Graphs are shared by the decoders of one engine. A new decoder's state tensors (STATE_ATTRS: `next`,
    `draft`, `seen`, a logit bias...) are copied into the tensors the graph was captured with, and the decoder is
    rebound to them; attributes the step itself rebinds (`last_count`) are pointed at this graph's tensors after
    every replay.
  * Every buffer the graph reads without owning it (KV cache, SAL cache, static tree, RoPE tables, the heads'
    draft-vocabulary rows) is fingerprinted by address; if the engine reallocated one, the stale graph is dropped
    and recaptured.
  * Sampling: the default CUDA generator is graph-safe (torch registers it with every capture); a seeded
    generator is registered with the graph (CUDAGraph.register_generator_state) and its graphs are kept for
    that generator only. Without that API, seeded sampling runs eagerly.

One flag turns graphs off: `DecodeGraphs(enabled=False)` (or AMPHISTA_CUDA_GRAPHS=0 in the environment);
decoders on the CPU always run eagerly.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .env_settings import env_switch

ENV_VAR = "AMPHISTA_CUDA_GRAPHS"
# decoder tensors a step reads (or updates) in place
STATE_ATTRS = ("next", "draft", "seen", "ongoing", "counts", "bias", "produced", "ban_ids", "recent", "bad_last",
               "bad_prefix")


def _kernel_modes(device) -> tuple:
    """What picks the kernels a capture records, beside the decoder's own settings: a use_backend block,
    set_backend, or AMPHISTA_EXACT_GREEDY / AMPHISTA_TREE_MERGE / AMPHISTA_TRITON_LINEAR / AMPHISTA_PDL (and their
    benchmarks' blocks) may pick others for a later run, which must not replay the first one's."""
    from .kernels import backend, gpu_exact, routed_linear, split_merge
    return (backend.get_backend(device), gpu_exact.enabled(), split_merge.default_merge(), routed_linear.mode(),
            backend.pdl_wanted())


def graphs_enabled_by_env() -> bool:
    return bool(env_switch(ENV_VAR, True))


@dataclass
class _Captured:
    graph: Any                            # torch.cuda.CUDAGraph
    outputs: Any                          # what step_device returned during capture (static tensors)
    state: dict[str, torch.Tensor]        # STATE_ATTRS tensors the graph reads and writes
    rebound: dict[str, Any]               # decoder attributes the step assigns: re-pointed after each replay
    fingerprint: tuple
    generator: Any = None                 # the seeded generator registered with this graph, if any
    # The model and heads the graph reads: held so that their ids (part of the key) cannot be reused by new
    # objects while the graph lives. Engine.load_heads should call DecodeGraphs.clear() to release old heads.
    owners: tuple = ()


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    eager_steps: int = 0                  # warm-up steps and steps of keys that cannot be captured
    failed_captures: int = 0
    dropped: int = 0                      # graphs recaptured because a buffer they read moved
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"captures": self.captures, "replays": self.replays, "eager_steps": self.eager_steps,
                "failed_captures": self.failed_captures, "dropped": self.dropped, "errors": self.errors[-3:]}


def _trim(keys: dict, limit: int):
    """Drops the oldest entries past `limit`: a seeded sampling run's keys name its own generator, so a long-lived
    engine meets new keys with every such run, and its bookkeeping must not grow with them."""
    while len(keys) > limit:
        del keys[next(iter(keys))]


def _tensors_of(obj, names) -> list[torch.Tensor]:
    out = []
    for n in names:
        t = getattr(obj, n, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    return out


def external_buffers(decoder) -> list[torch.Tensor]:
    """Tensors a step reads or writes that the decoder does not own: their addresses key a graph's validity."""
    bufs = [decoder.cache.k, decoder.cache.v, decoder.cache.length]
    model = getattr(decoder, "model", None)
    if model is not None:
        bufs += _tensors_of(model, ("rope",))
    heads = getattr(decoder, "heads", None)
    if heads is not None:
        sal = getattr(heads, "sal_cache", None)
        if sal is not None:
            bufs += [sal.k, sal.v, sal.length]
        # _w_sub: the LM head's draft-vocabulary rows, gathered lazily and dropped by set_draft_vocab; a graph that
        # kept reading the old rows scored the new vocabulary's slots with the old tokens' rows
        bufs += _tensors_of(heads, ("_rope", "_stage_index", "_w_sub", "draft_vocab"))
        # prompt lookup's history and predictions (a run with a longer prediction reallocates them), alone or
        # beside the heads (HeadsWithLookup: its chain's tokens, its lookup's buffers)
        bufs += _tensors_of(heads, ("chain",))
        for lookup in (heads, getattr(heads, "lookup", None)):
            bufs += _tensors_of(lookup, ("hist", "length", "found", "pred", "pred_len", "pred_at"))
    tree = getattr(getattr(decoder, "tree", None), "static", None)
    if tree is not None:
        bufs += _tensors_of(tree, ("depth", "parent", "rank", "ancestor_bits", "mask", "retrieve"))
    return bufs


class DecodeGraphs:
    """Captured decode steps, keyed by everything that changes the recorded kernels (see the module doc)."""

    def __init__(self, enabled: bool = True, warmup_steps: int = 1, max_graphs: int = 64):
        self.enabled = bool(enabled) and graphs_enabled_by_env()
        self.warmup_steps = max(1, int(warmup_steps))
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.warm: dict[tuple, int] = {}
        self.uncapturable: dict[tuple, str] = {}
        self.stats = GraphStats()
        self._pool = None
        self._stream = None
        self._warned = False

    # ---- wiring ----------------------------------------------------------------------------------------
    def attach(self, decoder):
        """Route decoder.step_device through the graphs; returns the decoder. A no-op when graphs are off
        or the decoder runs on the CPU (or on a machine without CUDA)."""
        if not self.enabled or not self._supported(decoder):
            return decoder
        if getattr(decoder, "_decode_graphs", None) is self:
            return decoder
        eager = type(decoder).step_device.__get__(decoder)   # the class's method, even if already wrapped
        decoder._decode_graphs = self
        decoder._kernel_modes = _kernel_modes(decoder.device)     # once a run, not every step (key)
        decoder.step_device = lambda kv_len: self.step(decoder, eager, kv_len)
        return decoder

    @staticmethod
    def detach(decoder):
        """Back to eager steps for this decoder (its state tensors stay where they are)."""
        decoder.__dict__.pop("step_device", None)
        decoder.__dict__.pop("_decode_graphs", None)
        return decoder

    def clear(self):
        """Drop every graph (frees their memory pool once nothing else references it)."""
        self.graphs.clear()
        self.warm.clear()
        self.uncapturable.clear()
        self._pool = None

    # ---- keys ------------------------------------------------------------------------------------------
    @staticmethod
    def key(decoder, kv_len: int) -> tuple:
        p = decoder.params
        mode = ("greedy",) if p.greedy else ("sample", p.temperature, p.top_k, p.top_p, p.min_p)
        # The penalties change greedy steps too (their values are baked into the captured kernels); a bias is a
        # state tensor (its values are copied in), only whether there is one changes the kernels: logit_bias,
        # allowed_token_ids or one-token bad words make one. Bad words of several tokens are state too (the words and
        # each row's latest tokens): their shape is in the key.
        bad = getattr(decoder, "bad_prefix", None)
        mode += (p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
                 getattr(decoder, "bias", None) is not None, None if bad is None else tuple(bad.shape))
        ban = getattr(decoder, "ban_ids", None)       # min_tokens: its value and the ids it holds back
        mode += (getattr(decoder, "min_tokens", 0), None if ban is None else ban.shape[0])
        gen = getattr(decoder, "generator", None)
        tree = getattr(decoder, "tree", None)
        return (type(decoder).__name__, id(decoder.model), id(getattr(decoder, "heads", None)),
                decoder.next.shape[0], None if tree is None else (tree.name, tree.num_nodes),
                getattr(decoder, "acceptance", None), int(kv_len), mode,
                None if gen is None or p.greedy else id(gen), decoder.next.device.index,
                getattr(decoder, "logprobs", False),        # a step that also computes its tokens' log-probs
                getattr(decoder, "top_logprobs", 0),        # ... and the top N at each (N sizes its topk)
                getattr(decoder, "_kernel_modes", None) or _kernel_modes(decoder.device))

    @staticmethod
    def fingerprint(decoder) -> tuple:
        return tuple((t.data_ptr(), tuple(t.shape)) for t in external_buffers(decoder))

    # ---- the step --------------------------------------------------------------------------------------
    def step(self, decoder, eager: Callable, kv_len: int):
        if getattr(decoder, "profile", False) or self._capturing():
            return eager(kv_len)               # profiling syncs between phases; nested capture is not ours
        key = self.key(decoder, kv_len)
        g = self.graphs.get(key)
        if g is not None and g.fingerprint != self.fingerprint(decoder):
            del self.graphs[key]               # a buffer it reads was reallocated: recapture
            self.stats.dropped += 1
            g = None
        if g is not None:
            return self._replay(g, decoder)
        if key in self.uncapturable:
            self.stats.eager_steps += 1
            return eager(kv_len)
        if self.warm.get(key, 0) < self.warmup_steps:
            self.warm[key] = self.warm.get(key, 0) + 1
            _trim(self.warm, 4 * self.max_graphs)
            self.stats.eager_steps += 1
            return self._warm_step(eager, kv_len)
        if len(self.graphs) >= self.max_graphs:
            self.graphs.pop(next(iter(self.graphs)))   # oldest first; its key recaptures if it comes back
        try:
            g = self._capture(decoder, eager, kv_len)
        except Exception as err:               # an op that cannot be captured: this key stays eager
            self._capture_failed(key, err)
            return eager(kv_len)
        self.graphs[key] = g
        return self._replay(g, decoder)

    # ---- the CUDA-specific part (python_tests/graph_standin.py replaces it with a CPU double) -------------
    @staticmethod
    def _supported(decoder) -> bool:
        return decoder.device.type == "cuda" and torch.cuda.is_available()

    @staticmethod
    def _capturing() -> bool:
        return torch.cuda.is_current_stream_capturing()

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _warm_step(self, eager, kv_len):
        """The eager step on the capture stream (as torch's graph docs prescribe for warm-up), ordered with
        the current stream on both sides."""
        side, cur = self._side_stream(), torch.cuda.current_stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            out = eager(kv_len)
        cur.wait_stream(side)
        return out

    def _record(self, decoder, eager, kv_len):
        """(graph, outputs): eager(kv_len) captured into a new CUDA graph (nothing runs until replay)."""
        gen = getattr(decoder, "generator", None)
        graph = torch.cuda.CUDAGraph()
        if gen is not None and not decoder.params.greedy:
            if not hasattr(graph, "register_generator_state"):
                raise RuntimeError("seeded sampling needs CUDAGraph.register_generator_state (torch >= 2.5)")
            graph.register_generator_state(gen)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()   # one pool: graphs replay one at a time
        with torch.cuda.graph(graph, pool=self._pool, stream=self._side_stream()):
            outputs = eager(kv_len)
        return graph, outputs

    @staticmethod
    def _sync():
        try:
            torch.cuda.synchronize()
        except Exception:                      # a capture error can surface once more here; it is not sticky
            pass

    # ---- capture and replay ----------------------------------------------------------------------------
    def _capture(self, decoder, eager, kv_len) -> _Captured:
        before = dict(vars(decoder))
        state = {n: getattr(decoder, n) for n in STATE_ATTRS if isinstance(getattr(decoder, n, None), torch.Tensor)}
        graph, outputs = self._record(decoder, eager, kv_len)
        after = vars(decoder)
        rebound = {n: v for n, v in after.items()
                   if n not in ("step_device",) and (n not in before or before[n] is not v)}
        for n in STATE_ATTRS:
            if n in rebound:
                raise RuntimeError(f"step_device rebinds decoder.{n}; it must update it in place to be captured")
        self.stats.captures += 1
        return _Captured(graph, outputs, state, rebound, self.fingerprint(decoder), getattr(decoder, "generator", None),
                         (decoder.model, getattr(decoder, "heads", None)))

    def _replay(self, g: _Captured, decoder):
        for n, t in g.state.items():           # a decoder the graph was not captured with: move its state in
            cur = getattr(decoder, n, None)
            if cur is not t:
                t.copy_(cur)
                setattr(decoder, n, t)
        g.graph.replay()
        for n, v in g.rebound.items():
            setattr(decoder, n, v)
        self.stats.replays += 1
        return g.outputs

    def _capture_failed(self, key, err: Exception):
        msg = f"{type(err).__name__}: {err}"
        self.uncapturable[key] = msg
        _trim(self.uncapturable, 4 * self.max_graphs)
        self.stats.failed_captures += 1
        self.stats.errors = self.stats.errors[-15:] + [msg]
        self._sync()
        if not self._warned:
            self._warned = True
            warnings.warn(f"CUDA graph capture failed, running this step configuration eagerly: {msg}",
                          RuntimeWarning, stacklevel=3)

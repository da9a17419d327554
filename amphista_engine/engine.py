"""The public entry point: `Engine.from_pretrained(...)`, `engine.generate(...)`, `engine.stream(...)`."""
from __future__ import annotations

import contextlib
import copy
import functools
import numbers
import os
import threading
import time
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Iterator, Sequence

import torch

from . import async_api
from .errors import (AmphistaError, CacheFullError, ConfigError, InputError, int_digits, is_huge_int,
                     refuse_huge_ints)
from .generation import GenerationStats, PlainDecoder, run
from .kernels.backend import check_backend, get_backend, scoped_backend, unmet_choice, use_backend
from .kernels.cpu_threads import one_thread_if_forked
from .kv_cache import KVCache
from .prompt_lookup import PromptLookup, prediction_ids
from .loading import LoadedModel, load_model, parse_device, parse_dtype
from .sampling import SamplingParams
from .values import is_integral

DEFAULT_MODEL = "smollm2-135m"
# Trees built (and speculation checks weighed) per engine, most recently used kept: an engine serving requests that
# each name their own path list or tree file must not keep every one for its lifetime. More than any heads record.
KEPT_TREES = 64


def _on_backend(method):
    """Decorates an engine's calls that run hot ops: inside its own backend (Engine(backend=...)), where it has one.
    This covers the call's eager work; a stream's steps run later, maybe in another thread (a server's scheduler),
    so each step enters the backend of the call that made the stream again (_drive)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with use_backend(self.backend):
            return method(self, *args, **kwargs)
    return run


def _recent(cache: dict, key, make):
    """cache[key], made by make() where absent; cache keeps the KEPT_TREES most recently used (insertion order)."""
    value = cache.pop(key) if key in cache else make()
    cache[key] = value
    while len(cache) > KEPT_TREES:
        del cache[next(iter(cache))]
    return value


def _tree_key(tree):
    """A hashable key for a tree argument: a name, None (the default), or a path list."""
    if isinstance(tree, (str, type(None))):
        return tree
    try:
        if not isinstance(tree, (list, tuple)):
            raise TypeError
        key = tuple(map(tuple, tree))
        hash(key)
        if any(type(r) is not int for p in key for r in p):
            # True == 1 and 0.0 == 0 hash alike: tree=[[True]] was served the TreeSpec cached for [[1]] (taken
            # silently) where TreeSpec refuses it; ranks not ints (numpy's are by now: _plain_ranks) keyed by type
            key = ("typed",) + tuple(tuple((type(r).__name__, r) for r in p) for p in key)
    except TypeError:
        raise InputError(f"tree must be a name (e.g. 'mix-4', 'tree-16', 'dynamic-8'), a list of top-k rank paths "
                         f"(e.g. [[0], [1], [0, 0]]) or None, got {type(tree).__name__} {tree!r}") from None
    return key


def _plain_ranks(tree):
    """A path-list tree with numpy's integer ranks as Python ints, as the other options take numpy's integers (a tree
    from np.argsort's ranks was refused as "must be a non-empty tuple of integer top-k ranks"); anything else as
    given (names, None, and bad trees, which TreeSpec names)."""
    if isinstance(tree, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in tree):
        return [[int(r) if is_integral(r) else r for r in p] for p in tree]
    return tree


@dataclass
class GenerationResult:
    """One prompt's answer. text: the answer without special tokens (cut before a stop string); token_ids: every
    token decoded (the ending EOS left out); prompt_token_ids: the prompt as encoded (chat template applied);
    finish_reason: "eos", "length" (max_new_tokens reached) or "stop" (a stop string or stop_token_ids id, which
    stop_reason names); stats: counts and timings
    (GenerationStats, times in milliseconds). to_dict() gives plain JSON-serializable values.

    Results compare equal when they hold the same text, tokens, prompt and finish reason: the stats (wall-clock
    timings) are left out of ==, so two identical greedy runs compare equal. repr leaves out the prompt's ids
    (a long chat history's thousands of them; stats.prompt_tokens counts them)."""
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int] = field(repr=False)
    finish_reason: str            # "eos" | "length" | "stop"
    stats: GenerationStats = field(default_factory=GenerationStats, compare=False)
    # stream_batch(logprobs=True): the target's log-probability of each of token_ids (its own distribution, before
    # temperature, top-k/top-p or a repetition penalty); None otherwise
    token_logprobs: list[float] | None = field(default=None, repr=False)
    # stream_batch(logprobs=True, top_logprobs=N > 0): for each of token_ids, the N most likely tokens at its position
    # as (token_id, logprob) pairs, best first (the same distribution as token_logprobs); None otherwise
    top_logprobs: list[list[tuple[int, float]]] | None = field(default=None, repr=False)
    # stream_batch(logprobs=True), finish_reason "eos": the EOS token left out of token_ids, as (token_id, logprob,
    # its top_logprobs list or None). The server's completions list it last, as OpenAI and vLLM do: lm-eval's echo
    # requests read token_logprobs[ctxlen:-1], taking the last entry for the answer's token (without it, the
    # prompt's last token was cut from the sum where the model's next token was EOS)
    eos_logprob: tuple | None = field(default=None, repr=False, compare=False)
    # finish_reason "stop": what stopped it, as vLLM's stop_reason: the stop_token_ids id (left out of token_ids, as
    # EOS is) or the stop string; None for the other finishes
    stop_reason: int | str | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": len(self.prompt_token_ids),
               "finish_reason": self.finish_reason, "stats": self.stats.to_dict()}
        if self.stop_reason is not None:
            out["stop_reason"] = self.stop_reason
        # JSON has no -Infinity (a token the model rules out): LOGPROB_FLOOR, as the server and vLLM write it
        from .generation import LOGPROB_FLOOR
        if self.token_logprobs is not None:
            out["token_logprobs"] = [max(lp, LOGPROB_FLOOR) for lp in self.token_logprobs]
        if self.top_logprobs is not None:       # [[token_id, logprob], ...] per token in JSON
            out["top_logprobs"] = [[[t, max(lp, LOGPROB_FLOOR)] for t, lp in top] for top in self.top_logprobs]
        return out


class RenderedPrompt(list):
    """A chat prompt's token ids, rendered already with the template, variables and template ends of the call it is
    passed to (a server renders each request's in its handler thread, so a slow template holds up no run): taken as
    given, as token ids are, with those ends allowed, and counted as rendered with the template (its end-of-turn
    text ends the answer). source: the prompt it was rendered from, which errors name as they name that prompt."""

    def __init__(self, ids, source):
        super().__init__(ids)
        self.source = source


def is_token_ids(prompt) -> bool:
    """A prompt given as token ids: a non-empty list or tuple of integers (numpy's too; not bools)."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(is_integral(t) and not isinstance(t, bool) for t in prompt))


def check_top_logprobs(top_logprobs, logprobs: bool = True) -> int:
    """top_logprobs as a Python int in [0, MAX_TOP_LOGPROBS]; > 0 needs logprobs=True (OpenAI's rule)."""
    from .generation import MAX_TOP_LOGPROBS
    if isinstance(top_logprobs, bool) or not is_integral(top_logprobs) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InputError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got "
                         f"{type(top_logprobs).__name__} {top_logprobs!r:.40}")
    if top_logprobs and logprobs is not True:
        raise InputError(f"top_logprobs={int(top_logprobs)} needs logprobs=True (they are listed beside each token's "
                         f"own logprob)")
    return int(top_logprobs)


def check_min_tokens(min_tokens) -> int:
    """min_tokens as a Python int: numpy's integers too, as max_new_tokens takes them (np.int64(4) from an array was
    refused as "must be an integer")."""
    if not is_integral(min_tokens) or min_tokens < 0:
        raise InputError(f"min_tokens must be an integer >= 0 (0 = off), got {type(min_tokens).__name__} "
                         f"{min_tokens!r:.40}")
    return int(min_tokens)


def check_max_new_tokens(max_new_tokens) -> int:
    """max_new_tokens as a Python int. Numpy's integers are integers too (np.int64(64) from an array or a config
    was refused as "must be a positive integer, got np.int64(64)"), as the sampling parameters take them."""
    if not is_integral(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return int(max_new_tokens)


def is_per_row(value) -> bool:
    """A list, tuple or 1-D array of values (one per prompt) rather than one value."""
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0


def check_row_limits(max_new_tokens) -> int | list[int]:
    """max_new_tokens of a batch: one positive int for every prompt, or a list / tuple (or 1-D array) of one per
    prompt, each checked and named by its index. Returns an int or a list of ints (the count is the caller's to
    check against the prompts: check_limits_count)."""
    if not is_per_row(max_new_tokens):
        return check_max_new_tokens(max_new_tokens)
    if getattr(max_new_tokens, "ndim", 1) != 1:
        raise InputError(f"max_new_tokens must be one positive integer or a flat list of one per prompt, got a "
                         f"{max_new_tokens.ndim}-D {type(max_new_tokens).__name__}")
    values = max_new_tokens.tolist() if hasattr(max_new_tokens, "tolist") else list(max_new_tokens)
    if not values:
        raise InputError("max_new_tokens is an empty list: give one positive integer per prompt (or one for all)")
    for i, v in enumerate(values):
        if not is_integral(v) or v < 1:
            raise InputError(f"max_new_tokens[{i}] must be a positive integer, got {type(v).__name__} {v!r:.40} "
                             f"(a list gives one limit per prompt)")
    return [int(v) for v in values]


def check_limits_count(limits: int | list[int], prompts: int) -> list[int]:
    """Each prompt's max_new_tokens (check_row_limits' value): a list must hold one per prompt."""
    if not isinstance(limits, list):
        return [limits] * prompts
    if len(limits) != prompts:
        raise InputError(f"max_new_tokens has {len(limits)} values for {prompts} prompt{'s' * (prompts != 1)}: give "
                         f"one per prompt, in order (or one integer for every prompt)")
    return limits


def check_truncate_prompt_tokens(n) -> int | None:
    """vLLM's truncate_prompt_tokens: None (off) or an integer >= 1, the prompt tokens kept (its last ones)."""
    if n is None:
        return None
    if not is_integral(n) or n < 1:
        raise InputError(f"truncate_prompt_tokens must be an integer >= 1 (the prompt's last N tokens are kept) or "
                         f"None, got {type(n).__name__} {n!r:.40}")
    return int(n)


def check_stop(stop) -> list[str]:
    """Stop strings as a list: None, one string or a list (or 1-D array) of non-empty strings."""
    if getattr(stop, "ndim", 0) and hasattr(stop, "tolist"):
        # `stop or []` on an array raised numpy's bare "truth value ... is ambiguous"; a 1-D array of strings is taken
        # as the token id options take theirs
        stop = stop.tolist()
    # None alone is "no stops": {}, False and 0 were taken as it too (`stop or []`), silently
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InputError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(not s for s in stop):
        raise InputError("stop strings must be non-empty")
    return list(stop)


def check_stop_unicode(stop: list[str]) -> None:
    """A stop string holding a lone surrogate (bytes that were not UTF-8, read with errors='surrogateescape') can
    never match the answer's text, which holds U+FFFD where its bytes were not UTF-8: the stop did nothing, while
    the same bytes in a prompt are refused (Tokenizer.encode). The CLI names its --stop flag itself."""
    for i, s in enumerate(stop):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"stop string {i} ({s!r:.40}) is not valid Unicode: it holds U+{ord(s[e.start]):04X}, a "
                             f"lone surrogate (bytes that were not UTF-8, read with errors='surrogateescape'?), "
                             f"which no answer's text can hold") from None


def check_batch_wide(**options):
    """Refuses a per-prompt list (or array) for an option that applies to every prompt of a call, by name: it was
    refused as "temperature must be a number, got [0.5, 0.7]", as if a list could never be meant. (max_new_tokens
    is not one of them: it may be a list of one per prompt, check_row_limits.)"""
    for name, value in options.items():
        if is_per_row(value):
            raise InputError(f"{name} takes one value, which applies to every prompt of the batch; got "
                             f"{type(value).__name__} {value!r:.80}: per-prompt settings are not supported (make "
                             f"one generate_batch call per group of prompts that share them)")


# encode_prompt's refusal of continue_final_message / add_generation_prompt for a prompt the template does not end
_TEMPLATE_ENDS_ONLY = ("continue_final_message and add_generation_prompt apply to a message list's chat template, "
                       "not to {}: to continue a partial reply, pass messages ending with an assistant message "
                       "holding it")

DEFAULT_MAX_SEQ_LEN = 2048


def check_engine_args(max_seq_len, max_batch_size, cuda_graphs) -> tuple[int, int]:
    """The cache and graph settings, named before anything loads (a str max_seq_len met `-x` in RoPE's tables).
    Returns (max_seq_len, max_batch_size) as Python ints: numpy's integers are taken too (np.int64 was refused
    as "must be an integer, got int64 2048")."""
    refuse_huge_ints({"max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
    for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
        if not is_integral(value):
            raise InputError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    max_seq_len, max_batch_size = int(max_seq_len), int(max_batch_size)
    if max_seq_len < 2:
        raise InputError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if max_batch_size < 1:
        raise InputError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if not isinstance(cuda_graphs, bool):
        raise InputError(f"cuda_graphs must be True or False, got {type(cuda_graphs).__name__} {cuda_graphs!r}")
    return max_seq_len, max_batch_size


@dataclass
class _KeptPrefix:
    """Cache row 0 holds the K/V of `ids` in slots 0..len(ids) - 1 (and, when `heads` drafted that run, their
    own cache the matching entries, valid while their cache epoch stays `epoch`). backend: the kernel backend that
    computed them: another one's K/V differ from its own by far more than the last bits (cpu vs torch: a cpu turn
    after a torch one answered other greedy tokens than a fresh cpu run)."""
    cache: KVCache
    heads: object
    epoch: int | None
    ids: list[int]
    backend: str | None = None


class Engine:
    """A model (and optionally drafting heads) with one KV cache: `Engine.from_pretrained(model, heads=...)`, then
    generate / stream one prompt, generate_batch / stream_batch several. One run at a time per engine. It holds no
    files or threads: `del engine` gives its memory back (there is nothing to close)."""
    _BUSY = ("this engine is decoding in another thread: it has one KV cache, so runs cannot overlap; use one engine "
             "per thread, serialise the calls, or batch the prompts (generate_batch)")
    _OVERTAKEN = ("this stream was overtaken by a later generation on the same engine (started between its chunks, or "
                  "inside its admit()), which reused its KV cache; finish a stream before starting another (or use "
                  "stream_batch for several prompts at once)")

    @one_thread_if_forked
    def __init__(self, loaded: LoadedModel, heads=None, max_seq_len: int | None = None, max_batch_size: int = 1,
                 cuda_graphs: bool = True, quant: str = "none", *, backend: str | None = None,
                 _owns_model: bool = False):
        """max_seq_len None: DEFAULT_MAX_SEQ_LEN (a sliding window does not cap it: model.py attends over it). The
        model stays the caller's: its float weights are kept (from_pretrained's own model keeps only oneDNN's packed
        copies on a CPU).
        backend: the kernel backend of this engine's hot ops ("torch", "triton", "cuda", "cpu"; see from_pretrained)."""
        self._backend = None if backend is None else check_backend(backend, "Engine backend")
        with use_backend(self._backend):
            self._setup(loaded, heads, max_seq_len, max_batch_size, cuda_graphs, quant, _owns_model)

    def _setup(self, loaded, heads, max_seq_len, max_batch_size, cuda_graphs, quant, _owns_model):
        self.loaded = loaded
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config
        self.device = self.model.device
        self.dtype = self.model.tok_embeddings.weight.dtype
        if max_seq_len is None:
            max_seq_len = DEFAULT_MAX_SEQ_LEN
        max_seq_len, max_batch_size = check_engine_args(max_seq_len, max_batch_size, cuda_graphs)
        self.max_seq_len = max_seq_len
        # The cache holds max_batch_size rows from the first run on: named here, not at that run as a max_seq_len
        KVCache.check_fits(self.config, max_batch_size, max_seq_len, self.dtype, self.device)
        if max_seq_len > self.model.rope_len:
            # A model from load_model(..., max_seq_len=N) holds N RoPE rows: position N raised a bare IndexError
            # mid-run. (A dynamic-NTK model refuses lengths past its trained ones here, by name.)
            self.model.setup_rope(max_seq_len)
        trained = self.config.max_position_embeddings
        if max_seq_len > trained and not self.config.rope_scaling:
            warnings.warn(f"max_seq_len={max_seq_len} is past the {trained} positions the model was trained on: "
                          "RoPE is extrapolated there, and text that long may degrade", stacklevel=3)
        self.heads = None           # loaded at the end (load_heads): a path or module is checked, not kept as given
        self._lookup_drafter = None     # speculative="lookup"'s (made at its first run)
        self._with_lookup = None        # ((heads id, chain), HeadsWithLookup): speculative="amphista+lookup"'s
        self._cache: KVCache | None = None
        self._cache_batch = max_batch_size
        self.last_result: GenerationResult | None = None
        self.last_results: list[GenerationResult] = []
        self.loaded_name = loaded.source
        self.profile = False        # sync between speculative phases so their time split is exact on GPUs
        # more variables for the model's chat template, e.g. {"enable_thinking": False} (Qwen3: answer without a
        # <think> block), as transformers' apply_chat_template(**kwargs)
        self.chat_template_kwargs: dict = {}
        self._chat_template: str | None = None      # the chat_template property: None renders the model's own
        self._trees = {}
        self._checks = {}           # (tree, sampled share) -> SpeculationCheck, for speculative="auto"
        self._grammars = {}         # (response_format (canonical JSON), eos ids) -> structured.Grammar
        self._kept: _KeptPrefix | None = None      # what the cache holds after a reuse_prefix run
        self._runs = 0                                # generations started: an overtaken stream stops (_drive)
        # the running (else last) run's leading prompt tokens taken from the cache (reuse_prefix), set as it starts
        self.prompt_tokens_reused = 0
        # (thread, run) decoding now: one KV cache cannot serve two threads at once (_drive refuses the second)
        self._decoding: tuple[int, int] | None = None
        # Reentrant: a stream abandoned in a reference cycle is closed by whichever allocation triggers the garbage
        # collector, also one inside a block holding this lock, and its close takes the lock to end its run (a plain
        # Lock deadlocked that thread for good, and every later call on the engine with it).
        self._decoding_lock = threading.RLock()
        _ENGINES.add(self)
        # How the linear layers run (kernels/linear_setup.py): packed for oneDNN on a CPU (the target's as 4-bit
        # codes with quant="q4", or "auto" for a file stored 4-bit), routed through the backend switch on CUDA
        # (each few-row product on the faster of the Triton GEMM and cuBLAS) unless AMPHISTA_TRITON_LINEAR=0.
        if (unmet := unmet_choice(self.device)) is not None:
            warnings.warn(unmet, stacklevel=3)
        from .kernels.linear_setup import LinearSetup
        setup = LinearSetup.for_device(self.device, self.dtype, quant, free_floats=_owns_model)
        self.linears = replace(setup.resolved(setup.apply(self.model)), backend=self._backend)
        self.quant = self.linears.quant
        self.cpu_packed = self.linears.packed
        # Decode steps replayed from CUDA graphs, shared by every decoder this engine makes; always off on the
        # CPU. On by default since the H200 run of the GPU suite (graph replay == eager over 200 tokens; plain
        # 7B-shape step 2.6x faster): cuda_graphs=False or AMPHISTA_CUDA_GRAPHS=0 turns them off.
        from .cuda_graphs import DecodeGraphs
        self.graphs = DecodeGraphs(enabled=cuda_graphs)
        if heads is not None:
            self.load_heads(heads)

    @classmethod
    @one_thread_if_forked
    def from_pretrained(cls, model: str = DEFAULT_MODEL, heads=None, device: str | None = None,
                        dtype: str | torch.dtype | None = None, max_seq_len: int | None = None,
                        max_batch_size: int = 1, cuda_graphs: bool = True, quant: str = "auto",
                        backend: str | None = None, chat_template: str | None = None) -> "Engine":
        """model: checkpoint directory, .gguf file or alias; heads: drafting heads (optional, see load_heads);
        max_seq_len: the KV cache's length (None: 2048);
        max_batch_size: the KV cache's rows, checked against free memory here and allocated at the first run; a
        larger batch is still taken (no cap): the cache grows to it, checked the same way before allocating, and
        keeps that size;
        quant (CPU): "q4" runs the target's layers on 4-bit codes and its LM head in int8, "auto" (the default)
        does so where the file stores the layers 4-bit (GGUF Q4_0/Q4_1/Q4_K, e.g. smollm2-135m; K-quant mixes such as
        Q4_K_M run their wider layers as int8 rows), "none" multiplies the
        dequantized weights in the model dtype (kernels/cpu_quant.py). `Engine(loaded)` itself defaults to "none":
        it adapts a model loaded elsewhere, and quantizing changes that model in place.
        backend: the kernel backend of this engine's hot ops, "torch" (the reference), "triton", "cuda" or "cpu", for
        every call and stream of this engine, in any thread (`engine.backend`); None (the default): the process's
        choice (`kernels.use_backend` around a call, `kernels.set_backend`, AMPHISTA_BACKEND, else the device's
        fastest). `engine.backend = name` changes it between runs.
        chat_template: the template message lists are rendered with in place of the model's own (see the
        chat_template property), checked before the load."""
        from .chat import check_chat_template
        check_engine_args(DEFAULT_MAX_SEQ_LEN if max_seq_len is None else max_seq_len, max_batch_size, cuda_graphs)
        backend = None if backend is None else check_backend(backend, "Engine backend")
        if quant is not None and (not isinstance(quant, str) or not quant):
            # LinearSetup reads a falsy quant as "none": quant="" or False loaded dequantized weights without a word
            from .kernels.cpu_quant import SCHEMES
            raise ConfigError(f"quant must be one of {', '.join(SCHEMES)}, got {type(quant).__name__} {quant!r:.40}")
        chat_template = check_chat_template(chat_template)
        with use_backend(backend):
            engine = cls._load(model, heads, device, dtype, max_seq_len, max_batch_size, cuda_graphs, quant, backend)
        engine._chat_template = chat_template
        return engine

    @classmethod
    def _load(cls, model, heads, device, dtype, max_seq_len, max_batch_size, cuda_graphs, quant, backend):
        device = parse_device(device)
        dtype = parse_dtype(dtype, device)
        from .kernels.linear_setup import LinearSetup
        # resolved first (a bad quant fails before minutes of loading), so that a 4-bit model loads layer by layer
        load_quant = LinearSetup.for_device(device, dtype, quant).quant
        loaded = load_model(model, dtype=dtype, device=device,
                            max_seq_len=DEFAULT_MAX_SEQ_LEN if max_seq_len is None else max_seq_len, quant=load_quant)
        engine = cls(loaded, max_seq_len=max_seq_len, max_batch_size=max_batch_size, cuda_graphs=cuda_graphs,
                     quant=quant, backend=backend, _owns_model=True)
        engine.loaded_name = str(model)
        if heads is not None:
            engine.load_heads(heads)
        return engine

    @property
    def chat_template(self) -> str | None:
        """The chat template this engine renders message lists (and, by default, string prompts) with: None (the
        default) is the model's own, or the ChatML / Vicuna fallback of a model without one; a Jinja string or a
        built-in name ("chatml", "vicuna_v1.1") overrides it, as vLLM's --chat-template and transformers'
        apply_chat_template(chat_template=...) do. Its end-of-turn tokens end answers (eos_ids); tools' call format
        is read off it. Set: checked at once (one that does not parse is an InputError naming chat_template)."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None):
        from .chat import check_chat_template
        self._chat_template = check_chat_template(template)

    @property
    def backend(self) -> str | None:
        """The kernel backend this engine's calls run on (Engine(backend=...)); None: the process's choice."""
        return self._backend

    @backend.setter
    def backend(self, name: str | None):
        name = None if name is None else check_backend(name, "Engine backend")
        with self._decoding_lock:
            if self._decoding is not None:
                raise InputError("engine.backend cannot change while a run or stream of this engine decodes: finish "
                                 "or close it first")
            # Captured graphs hold the old backend's kernels, and speed checks timed them
            self._backend = name
            self.linears = replace(self.linears, backend=name)
            self.graphs.clear()
            self._checks.clear()
        if name is not None:
            # as a load with this backend warns: one that cannot run here (cuda on a CPU) fell back without a word
            with use_backend(name):
                unmet = unmet_choice(self.device)
            if unmet is not None:
                warnings.warn(unmet, stacklevel=2)

    @one_thread_if_forked
    @_on_backend
    def load_heads(self, heads):
        """heads: a heads directory, "default" (the Amphista heads shipped for this model), a shipped directory's
        name ("smollm2-135m-amphista", "smollm2-135m-medusa") or a heads module; None or "none" unloads them
        (plain decoding, as `--heads none`). Returns the heads this engine runs: a module that another engine runs
        (`engine_b.load_heads(engine_a.heads)`) or that lies on another device is copied (same weights, this
        engine's device and dtype), since heads keep per-run state and are bound to one model."""
        from .heads import load_heads
        from .shipped_heads import heads_alias
        if isinstance(heads, str) and heads == "none" and not os.path.exists(heads):   # as `--heads none`
            heads = None
        heads = heads_alias(heads, self.loaded_name)
        if heads is not None and not isinstance(heads, (torch.nn.Module, str, os.PathLike)):
            raise InputError(f"heads must be a heads directory, a shipped heads name, \"default\", None or a heads "
                             f"module, got {type(heads).__name__} {heads!r:.80}")
        if isinstance(heads, torch.nn.Module):
            heads = self._check_heads_module(heads)      # this engine's own copy where another engine runs them
        loaded = load_heads(heads, self.model, device=self.device, dtype=self.dtype,
                            target_name=self.loaded_name) \
            if heads is not None and not isinstance(heads, torch.nn.Module) else heads   # before dropping the old
        if loaded is not None:
            # before they become this engine's: heads whose adaptation failed stayed loaded, half adapted, and the
            # next speculative call decoded with them; now a failure leaves the old heads, as a bad path does
            self.linears.apply(loaded)
        self.graphs.clear()      # graphs captured with the old heads must not outlive them
        self._trees.clear()      # so do trees resolved by name (tuned-N comes from the heads' config)
        self._checks.clear()
        self._with_lookup = None     # it holds the old heads
        self.heads = loaded
        if loaded is None:
            return None
        _HEADS_ENGINE[loaded] = weakref.ref(self)
        return self.heads

    def _check_heads_module(self, heads):
        """A heads module must be drafting heads for this engine's target, as a heads directory must (checkpoint.
        load_heads): another module was packed in place and failed at the first step, and heads of another target
        drafted from that target's embeddings and LM head (they are bound to it). Returns the module bound to this
        target: the module itself, or a copy where another engine runs it or it lies on another device.

        Heads keep per-run state (the Amphista SAL cache, its epoch, a kept chat prefix's entries), their binding to
        one target and that engine's in-place adaptation of their linears (packed, or 4-bit under quant="q4"): one
        module shared by two engines was rebound to the second engine's model, took its quantization, and each
        engine's runs reset the other's heads cache, so a chat's kept prefix was never reused on either."""
        from .errors import HeadsMismatchError
        from .heads import DraftHeads, lm_head_fingerprint
        from .heads.checkpoint import converted_copy_distance
        if not isinstance(heads, DraftHeads):
            raise InputError(f"heads must be drafting heads (AmphistaHeads or MedusaHeads, e.g. from "
                             f"amphista_engine.heads.load_heads), a heads directory or None, got a "
                             f"{type(heads).__name__} module")
        c, tc = heads.config, self.config
        ours = lm_head_fingerprint(self.model)
        same_shape = (c.dim, c.vocab_size) == (tc.dim, tc.vocab_size)
        # heads a directory load took for a converted or quantized copy of their model (checkpoint.load_heads) keep
        # that model's LM-head rows: the module is taken back as the directory was (eval re-loads its modules)
        if not same_shape or (c.target_fingerprint and c.target_fingerprint != ours
                              and converted_copy_distance(heads, self.model) is None):
            raise HeadsMismatchError(
                f"these heads were built for another target: theirs has LM-head fingerprint "
                f"{c.target_fingerprint or '(none)'} (d={c.dim}, V={c.vocab_size}), the loaded model has {ours} "
                f"(d={tc.dim}, V={tc.vocab_size})")
        owner = _HEADS_ENGINE.get(heads)
        owner = owner() if owner is not None else None
        weight = next(heads.parameters(), None)
        if (owner is not None and owner is not self and owner.heads is heads) or (
                weight is not None and weight.device != self.device):
            heads = _heads_copy(heads, self.device, self.dtype)
        return heads.bind(self.model)

    # ---- prompts ---------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, chat: bool | None = None, template: str | None = None,
                      continue_final_message: bool = False, add_generation_prompt: bool | None = None,
                      chat_template_kwargs: dict | None = None) -> list[int]:
        """A string (chat-formatted when the model has a template or chat_template is set, unless chat=False), a
        message list, or a list of token ids (ints: the prompt's tokens as given, no template and no BOS added).
        template: None, the engine's chat_template (else the model's own). continue_final_message,
        add_generation_prompt: how a message list's template ends (render_chat), for message lists only.
        chat_template_kwargs: the template's variables (None: the engine's chat_template_kwargs), so that a caller
        renders with its own without setting the engine's, which other threads render with."""
        return self._encode_prompt(prompt, chat, self._chat_template if template is None else template,
                                   continue_final_message, add_generation_prompt, chat_template_kwargs)

    def _encode_prompt(self, prompt, chat, template, continue_final_message: bool = False,
                       add_generation_prompt: bool | None = None, variables: dict | None = None) -> list[int]:
        """encode_prompt with the template decided (None: the model's own): a run renders every prompt, joiners'
        too, with the template (and variables: None, the engine's) it read once as it started, the one its eos_ids
        come from."""
        from .chat import render_chat
        variables = self.chat_template_kwargs if variables is None else variables
        if chat is not None and not isinstance(chat, bool):      # chat="no" is truthy: not a silent yes
            raise InputError(f"chat must be True, False or None (the model's template when it has one), "
                             f"got {type(chat).__name__} {chat!r}")
        if isinstance(prompt, RenderedPrompt):
            return self.check_token_ids(prompt)
        if is_token_ids(prompt):
            if chat is True:
                raise InputError("a prompt of token ids is taken as given: it gets no chat template (chat=True); "
                                 "pass chat=None or False, or the text")
            if continue_final_message or add_generation_prompt is not None:
                raise InputError(_TEMPLATE_ENDS_ONLY.format("a prompt of token ids, taken as given"))
            return self.check_token_ids(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, numbers.Number) for t in prompt):
            # token ids with a float or bool among them were told "message 0 is a int, expected a dict"
            i = next(i for i, t in enumerate(prompt) if not is_integral(t))
            raise InputError(f"a prompt of token ids takes integers only: item {i} is {type(prompt[i]).__name__} "
                             f"{prompt[i]!r:.40}")
        templated = {"continue_final_message": continue_final_message, "add_generation_prompt": add_generation_prompt}
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("prompt is empty")
            use_chat = self._chats(chat, template)
            if continue_final_message or (add_generation_prompt is not None and not use_chat):
                # a templated string is one user message: there is no assistant message to continue
                raise InputError(_TEMPLATE_ENDS_ONLY.format("a string prompt (one user message, or raw text with "
                                                            "chat=False)"))
            text = (render_chat(self.tokenizer, prompt, template=template, variables=variables,
                                add_generation_prompt=add_generation_prompt) if use_chat else prompt)
        elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)) and prompt:
            if chat is False:
                raise InputError("a message list needs chat formatting; pass a string with chat=False")
            if all(isinstance(m, str) for m in prompt):     # several prompts, not one conversation
                raise InputError(f"prompt is a list of {len(prompt)} strings: for several prompts use "
                                 f"generate_batch / stream_batch; a conversation is a list of "
                                 f"{{'role': ..., 'content': ...}} dicts")
            if all(isinstance(m, (list, tuple)) for m in prompt):
                # generate([conversation, conversation]) or generate([[ids], [ids]]) was told "message 0 is a list,
                # expected a dict", as if one conversation were malformed
                raise InputError(f"prompt is a list of {len(prompt)} lists (several prompts: conversations or token "
                                 f"id lists?): for several prompts use generate_batch / stream_batch; a "
                                 f"conversation is a list of {{'role': ..., 'content': ...}} dicts")
            text = render_chat(self.tokenizer, list(prompt), template=template, variables=variables,
                               **templated)
        else:
            raise InputError(f"prompt must be a non-empty string or list of messages, got {type(prompt).__name__}")
        try:
            ids = self.tokenizer.encode(text)
        except InputError as e:     # "text is not valid Unicode" named no input (a stop string, a bad word name theirs)
            raise InputError(f"the prompt's {str(e).removeprefix('the ')}") from None
        if not ids:
            raise InputError("prompt encodes to zero tokens")
        return ids

    def check_token_ids(self, ids) -> list[int]:
        """ids as a list of Python ints, each a row of the model's embedding table (InputError naming the first that
        is not)."""
        V = self.config.vocab_size
        for i, t in enumerate(ids):
            if not 0 <= t < V:
                # one past 4300 digits (10**5000) cannot be written out: its length is said instead
                what = f"a token id of {int_digits(t)} digits" if is_huge_int(t) else f"token id {int(t)}"
                raise InputError(f"{what} (at position {i} of the prompt) is outside the model's vocabulary: ids go "
                                 f"from 0 to {V - 1}")
        return [int(t) for t in ids]

    @one_thread_if_forked
    @_on_backend
    def prompt_logprobs(self, ids, top_logprobs: int = 0, ranks: bool = False):
        """The target's log-probability of each token of a prompt given the tokens before it (what OpenAI's
        completions return with echo=True): one forward pass over the prompt, the logits at position i - 1 scoring
        token i (generation.sequence_scores, which `amphista perplexity` runs on each of its chunks too). ids: a
        prompt (a string, taken without the chat template, or token ids as given; encode_prompt(..., chat=False)).
        Returns (logprobs, top): logprobs has one float per token, None for the first (nothing comes before it);
        top (top_logprobs=N > 0) one list per token of N (token_id, logprob) pairs, best first (None for the first),
        else None. A prompt longer than max_seq_len is refused as generation refuses it (CacheFullError). ranks:
        a third item, each token's rank in the vocabulary from the same forward (1 the likeliest, ties counted as
        vLLM's prompt_logprobs counts them; None for the first)."""
        from .generation import sequence_scores
        refuse_huge_ints({"top_logprobs": top_logprobs})
        top_logprobs = check_top_logprobs(top_logprobs)
        ids = self.encode_prompt(ids, chat=False)
        if len(ids) > self.max_seq_len:
            raise CacheFullError(f"prompt is {len(ids)} tokens, longer than the cache (max_seq_len="
                                 f"{self.max_seq_len}): shorten it or raise max_seq_len")
        if len(ids) == 1:
            return ([None], [None] if top_logprobs else None) + (([None],) if ranks else ())
        with self._one_run(overtakes=False):    # no KV cache used, but no overlap with another thread's run
            lp, values, tops, *rank = sequence_scores(self.model, ids, 1, top_logprobs, ranks=ranks)
        # NaN only: a -inf logprob is a token the model rules out (a -inf logit, as flag_non_finite allows), not an
        # overflow (NaN or +inf logits make every logprob of their row NaN); the server writes it as -9999
        if torch.isnan(lp).any():
            from .errors import NonFiniteError
            raise NonFiniteError("the model's logits are not finite (NaN or inf) on this prompt: its activations "
                                 "overflowed (fp16 overflows where bf16 and fp32 do not)")
        logprobs = [None] + lp.tolist()
        top = None if not top_logprobs else [None] + [list(zip(i, v)) for i, v in zip(tops.tolist(), values.tolist())]
        return (logprobs, top) + (([None] + rank[0].tolist(),) if ranks else ())

    @one_thread_if_forked
    def reserve_batch(self, rows: int) -> None:
        """Raise max_batch_size to `rows` after the load (a server that batches its requests): the memory for that
        many rows is checked now, and the first run that needs more rows than the cache has allocates them all at
        once, so no later batch regrows it. Never shrinks the cache."""
        _, rows = check_engine_args(self.max_seq_len, rows, True)
        if rows <= self._cache_batch:
            return
        KVCache.check_fits(self.config, rows, self.max_seq_len, self.dtype, self.device,
                           freeable=0 if self._cache is None else self._cache.nbytes)
        self._cache_batch = rows

    def _cache_for(self, batch: int) -> KVCache:
        if self._cache is None or self._cache.batch < batch:
            # Before the run's own busy check (_one_run): a batch from a second thread grew the cache under a run
            # of another (both caches alive at once, the OOM check_fits is for, and the run's kept prefix dropped)
            # before being refused
            async_api.wait_for_stopped_run(self, threading.get_ident())
            with self._decoding_lock:
                self._refuse_other_threads()
            # Checked before the old buffers go, counting them as free (they are, once dropped): a batch refused for
            # memory keeps the old cache and a chat's kept prefix in it, rather than dropping both for nothing
            KVCache.check_fits(self.config, max(batch, self._cache_batch), self.max_seq_len, self.dtype, self.device,
                               freeable=0 if self._cache is None else self._cache.nbytes)
            if self._kept is not None and self._kept.cache is self._cache:
                # a reuse_prefix run's kept K/V held the old buffers alive: both caches at once (the OOM kill
                # check_fits is there to prevent)
                self._kept = None
            self._cache = None   # free the old buffers before allocating the larger ones
            self._cache = KVCache.for_model(self.config, max(batch, self._cache_batch), self.max_seq_len,
                                            self.dtype, self.device)
        return self._cache

    def _check_room(self, prompt_ids: list[int], max_new_tokens: int, extra: int, row: int | None = None,
                    prompt=None):
        """row: the prompt's index in a batch of several (named: which of 100 prompts is too long?, and kept on the
        error as `prompt_index`: a server can run the batch's other prompts without it); prompt: as given, so that
        a conversation that outgrew the cache is told it can drop its oldest exchanges."""
        try:
            self._check_room_of(prompt_ids, max_new_tokens, extra, row, prompt)
        except AmphistaError as e:
            if row is not None:
                e.prompt_index = row
            raise

    def _check_room_of(self, prompt_ids: list[int], max_new_tokens: int, extra: int, row: int | None, prompt):
        check_max_new_tokens(max_new_tokens)
        n, what = len(prompt_ids), "prompt" if row is None else f"prompt {row}"
        # A chat's growing message list is the usual way past the cache: the fix there is the caller's to make
        # (drop the oldest exchanges, as `amphista chat` does), not only a larger cache.
        chat = isinstance(prompt, Sequence) and not isinstance(prompt, str) and any(
            isinstance(m, Mapping) and m.get("role") == "assistant" for m in prompt)
        drop = " (or drop the conversation's oldest exchanges)" if chat else ""
        need = n + max_new_tokens + extra
        # A max_seq_len past the model's trained positions is no fix for a long document (a 65k-token file on
        # SmolLM2, trained on 8192, was told only to raise max_seq_len to 65683): RoPE is extrapolated there, a
        # dynamic-NTK model refuses it outright, so the way out is a shorter prompt, and the error says how short.
        trained, room = self.config.max_position_embeddings, self.config.max_position_embeddings - need + n
        past = ((f"; but the model was trained on {trained} positions (past them RoPE is extrapolated and answers "
                 f"degrade): " + (f"keep the prompt to at most {room} tokens" if room > 0 else "lower max_new_tokens"))
                if need > trained else "")
        # Both errors name the max_seq_len that would serve the request: a prompt longer than the cache was told
        # only "no room for an answer", with nothing to do about it.
        if n >= self.max_seq_len:
            raise CacheFullError(f"{what} is {n} tokens, {'longer than' if n > self.max_seq_len else 'as long as'} the "
                                 f"cache (max_seq_len={self.max_seq_len}): no room for an answer; "
                                 + (f"raise max_seq_len{drop}" if chat else "shorten it or raise max_seq_len")
                                 + f" (with max_new_tokens={max_new_tokens} it needs max_seq_len >= {need})" + past)
        if need > self.max_seq_len:
            # the tree's room alone: the answer fits plain decoding, which "auto" falls back to
            tree_only = extra and n + max_new_tokens <= self.max_seq_len
            raise CacheFullError(
                f"{what} ({n} tokens) + max_new_tokens ({max_new_tokens})"
                + (f" + tree room ({extra})" if extra else "")
                + f" exceeds the cache (max_seq_len={self.max_seq_len}) by {need - self.max_seq_len}; raise "
                f"max_seq_len or lower max_new_tokens" + drop
                + ("; or decode plainly (speculative=None, or 'auto', which does so where only the tree's room "
                   "is missing)" if tree_only else "") + past, tree_room=extra or 0)

    @one_thread_if_forked
    @_on_backend
    def speculation_check(self, tree=None, temperature: float = 0.0, top_p: float = 1.0, batch: int = 1,
                          min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                          frequency_penalty: float = 0.0):
        """Whether the loaded heads decode faster than plain steps here with `tree` (None or "auto": the fastest
        of the heads' recorded trees) (speculation_check.py: timed on a CPU, a few seconds once per machine and
        setup; always yes on a GPU), for runs sampling at `temperature` / `top_p` / `min_p` (greedy by default): sampled
        answers accept fewer drafts, as do runs under repetition / presence / frequency penalties; and decoding `batch`
        rows at once (a batch's tree rows cost more than its
        plain rows: speculation_check.timed_batch)."""
        from .speculation_check import BUSY_KEEP_S, check_speculation, penalty_share, sampled_share, timed_batch
        if self.heads is None:     # before the cache: a verdict for earlier heads says nothing now
            raise InputError('speculation_check needs drafting heads: engine.load_heads("default") for the shipped '
                             'ones, or engine.load_heads(DIR)')
        tree = None if tree == "auto" else tree
        p = SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                           presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)   # refuses what
        temperature, top_p, min_p = p.temperature, p.top_p, p.min_p                     # no run would take
        penalties = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        rows = timed_batch(batch)        # a bad batch is refused on any device
        if self.device.type != "cpu":
            # no timing on a GPU: a batch's verdict differs only by the untimed tree it gets (default_tree), and its
            # reason names the batch (keyed by the tree alone, a batch of 8 was told "a batch of 5 rows gets ...")
            rows = (self._tree_spec(None, batch).name, batch) if tree is None else 1
        # settings that weigh alike, timed on the backend in force (without an engine backend, a use_backend block
        # or set_backend may pick another for a later call: it was served the first backend's verdict)
        # and on the threads in force: the step times are (a verdict timed on one thread was served after
        # torch.set_num_threads(8), where the cost file's key, which counts them, would have timed again)
        # and AMPHISTA_EXACT_GREEDY, read at each step (the cost file's key holds the ordered path it selects)
        from .kernels import gpu_exact
        key = (_tree_key(tree), round(sampled_share(temperature, top_p, min_p) * penalty_share(*penalties), 3), rows,
               get_backend(self.device), torch.get_num_threads(), gpu_exact.enabled())

        def check():
            # Its timed steps run the heads on their own cache (reset): a run it interrupts would go on drafting
            # from what the timing left there. As a run, it and another thread's runs refuse each other, and it
            # overtakes a stream.
            with self._one_run():
                return check_speculation(self, tree, temperature=temperature, top_p=top_p, batch=batch, min_p=min_p,
                                         penalties=penalties)
        kept = self._checks.get(key)
        if kept is not None and kept.busy_since is not None and time.monotonic() - kept.busy_since > BUSY_KEEP_S:
            del self._checks[key]       # timed while other processes held the CPUs: time again now
        return _recent(self._checks, key, check)

    def resolve_speculation(self, speculative, tree, temperature: float = 0.0, top_p: float = 1.0, batch: int = 1,
                            min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                            frequency_penalty: float = 0.0):
        """(speculative, tree, check) with "auto" resolved. speculative="auto": the loaded heads where the check
        finds them faster, else None (plain). tree="auto", or no tree under speculative="auto": the tree the check
        found fastest (on a CPU; the device default on a GPU). check is None where nothing was weighed. batch: the
        rows the run decodes at once (a CPU weighs a batch at its size); the penalties: the run's, which weigh the
        heads' tau down as sampling does."""
        auto_tree = tree == "auto" or (tree is None and speculative == "auto")
        if self.heads is None or not (speculative == "auto" or (auto_tree and speculative is not None)) \
                or speculative not in ("auto", self.heads.config.kind):   # refused by the decoder, before any timing
            return (None if speculative == "auto" else speculative), tree, None
        check = self.speculation_check(None if auto_tree else tree, temperature, top_p, batch, min_p,
                                       repetition_penalty, presence_penalty, frequency_penalty)
        if speculative == "auto":
            speculative = self.heads.config.kind if check.pays else None
        return speculative, (check.tree if auto_tree else tree), check

    def _decoder(self, batch: int, params: SamplingParams, speculative, tree, acceptance, fits=None,
                 tree_room: bool = True):
        """(decoder, extra cache room it takes). fits(extra): the caller's room checks, called before the cache is
        allocated or grown; it refuses by raising, or returns False where "auto" then decodes plainly. tree_room:
        False where the tree never runs (max_new_tokens=1), so it takes no room."""
        fits = fits or (lambda extra: True)
        speculative, tree, _ = self.resolve_speculation(speculative, tree, params.temperature, params.top_p, batch,
                                                        params.min_p, params.repetition_penalty,
                                                        params.presence_penalty, params.frequency_penalty)
        if speculative is not None:
            from .speculative import make_speculative_decoder
            dec, extra = make_speculative_decoder(self, batch, params, speculative, tree, acceptance, fits=fits,
                                                  tree_room=tree_room)
            if dec is not None:
                return self.graphs.attach(dec), extra
        fits(0)
        return self.graphs.attach(PlainDecoder(self.model, self._cache_for(batch), params)), 0

    def _lookup(self, tree):
        """(the engine's prompt-lookup drafter, its chain's TreeSpec): both kept, so a kept prefix's drafter and a
        captured graph's tree buffers are the next run's."""
        from .prompt_lookup import chain_depth, chain_spec
        k = chain_depth(tree, self.device)
        return self._drafter(), _recent(self._trees, ("lookup", k), lambda: chain_spec(k, self.device))

    def _drafter(self) -> PromptLookup:
        """The engine's one prompt-lookup drafter (made at its first run), alone or beside the heads."""
        from .prompt_lookup import default_min_ngram
        if self._lookup_drafter is None:
            self._lookup_drafter = PromptLookup(self.config.vocab_size, self.device, self.dtype,
                                                min_ngram=default_min_ngram(self.device))
        return self._lookup_drafter

    def _heads_with_lookup(self, tree, batch: int):
        """(the loaded heads with a prompt-lookup chain beside their tree, that TreeSpec). tree: the heads' tree
        (None: the device's default), or "TREE+chain-K" for a chain of K (else the device's default chain)."""
        from .prompt_lookup import HeadsWithLookup, chain_depth, split_chain
        from .speculative import GPU_ROWS
        from .tree import TREES
        heads_tree, chain = split_chain(tree)
        try:
            k = chain_depth(chain, self.device)
        except ConfigError:      # it named speculative='lookup' and a bare 'chain-K', not the tree given
            from .prompt_lookup import MAX_DEPTH, default_depth
            raise ConfigError(f"tree {tree!r}: the prompt-lookup chain beside the heads' tree is 'TREE+chain-K' with "
                              f"K in 1..{MAX_DEPTH} (e.g. 'mix-4+chain-3'; TREE alone: "
                              f"chain-{default_depth(self.device)})") from None
        if heads_tree in (None, "auto") and self.device.type != "cpu":
            # The GPU kernels take trees of at most 64 nodes (a uint64 mask row; past it attention falls back to a
            # dense mask), and a batch's default keeps B x N rows within GPU_ROWS (default_tree; past 4 rows of
            # heads without fitted trees, a dynamic tree, which takes no chain): the default with the chain would
            # pass them, so the largest of the heads' fitted trees that leaves the chain room (mix-32 + chain-7 for
            # one row), else Medusa's tree cut to fit (its order: every prefix is a tree)
            base = self._tree_spec(None, batch)
            budget = min(64, max(GPU_ROWS // batch, 2))
            if base.static is None or base.num_nodes + k > budget:
                fitted = self.heads.config.extra.get("trees") or {}
                sizes = [n for n in (32, 16, 8, 4) if f"mix-{n}" in fitted and n + k <= budget]
                heads_tree = f"mix-{sizes[0]}" if sizes else [list(p) for p in
                                                              TREES["mc_sim_7b_63"][:max(budget - 1 - k, 1)]]
        key = (id(self.heads), k)
        if self._with_lookup is None or self._with_lookup[0] != key:
            self._with_lookup = (key, HeadsWithLookup(self.heads, self._drafter(), k))
        return self._with_lookup[1], self._tree_spec(None if heads_tree in (None, "auto") else heads_tree, batch,
                                                     chain=k)

    def _tree_spec(self, tree, batch: int = 1, chain: int = 0):
        """Static trees are built once per engine and kept on the device. tree None: the device's default for a
        batch of `batch` rows (speculative.default_tree). chain: a prompt-lookup chain of that many nodes beside."""
        from .speculative import TreeSpec, default_tree
        if tree is None:
            tree = default_tree(self.heads.num_heads, self.device, self.heads.config.extra.get("trees"),
                                self.quant == "q4", batch)
        key = (_tree_key(tree), self.heads.num_heads, chain)
        if isinstance(tree, str) and tree.endswith(".json") and os.path.isfile(tree):
            key += (os.stat(tree).st_mtime_ns,)      # a tree file edited since is read again, not served stale
        return _recent(self._trees, key, lambda: TreeSpec(tree, self.heads.num_heads, self.device,
                                                        self.heads.config.extra.get("trees"),
                                                        four_bit=self.quant == "q4", chain=chain))

    # ---- generation ------------------------------------------------------------------------------------
    @one_thread_if_forked
    @_on_backend
    def stream_batch(self, prompts: list, max_new_tokens: int | Sequence[int] = 256, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                     stop: Sequence[str] | None = None, seed: int | None = None, chat: bool | None = None,
                     speculative: str | None = None,
                     tree=None, acceptance: str = "auto", reuse_prefix: bool = False,
                     row_results: bool = False, logprobs: bool = False,
                     top_logprobs: int = 0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     logit_bias: dict | None = None, ignore_eos: bool = False, min_tokens: int = 0,
                     stop_token_ids: Sequence[int] | None = None, admit=None,
                     response_format: dict | None = None, min_p: float = 0.0, continue_final_message: bool = False,
                     add_generation_prompt: bool | None = None, include_stop_str_in_output: bool = False,
                     truncate_prompt_tokens: int | None = None, allowed_token_ids: Sequence[int] | None = None,
                     bad_words: Sequence[str] | None = None, chat_template: str | None = None,
                     chat_template_kwargs: dict | None = None,
                     prediction: str | None = None) -> Iterator[tuple[int, str]]:
        """Yields (row, text delta) for a batch of prompts; `self.last_results` holds the results after
        ([] where the run did not finish: closed early, or stopped by an error). row is the prompt's index; a row's
        deltas, joined, are its result's text, and stop once it ends. Deltas of rows come interleaved, step by
        step, until the batch's last row ends.

        max_new_tokens: one limit for every prompt, or a list of one per prompt (positive ints, in the prompts'
        order): each row ends at its own limit (finish_reason "length"), its result and stats its own, and the
        room check is made per row (prompt i + its limit must fit the cache). generate() and stream() take an int
        or a one-element list.

        Every other option applies to every prompt (one stop list, seed, temperature... for the batch: a list of
        per-prompt values is refused; `stop` is a list of strings that each stop any row). chat=False turns the
        template off for string prompts only: a message list always gets it, so one batch may mix both.

        reuse_prefix (one prompt): start from the K/V the cache still holds for the longest common prefix of this
        prompt and the previous reuse_prefix run's prompt + answer, and prefill only the rest (a chat's history).
        The prefix's K/V then come from that run (its prefill and decode steps), so the logits can differ from a
        fresh run's in the last bits: off by default, where repeated calls must give the same answer.

        row_results: the stream also yields (row, GenerationResult) right after a row's last delta, when that row
        ends, so a caller can answer it before the batch's last row ends (`amphista serve` does); its stats time that
        row alone. last_results still holds every row's result (batch-timed) once the stream ends. A row of a batch
        left no token to choose mid-run then yields (row, InputError) and ends there, as under admit, while the
        others go on (a run of one prompt raises it, as without row_results).

        logprobs: each result also holds token_logprobs, the target's log-probability of each token it gave (read
        from the logits every step computes anyway: plain and speculative alike). top_logprobs=N (0 to 20, with
        logprobs=True): each result's top_logprobs also lists, per token, the N most likely tokens at its position as
        (token_id, logprob) pairs, best first, from the same distribution. They are the model's own log-probabilities:
        logit_bias and the penalties change which tokens are chosen, not these.

        presence_penalty, frequency_penalty: OpenAI's, on the tokens the answer holds so far (0 = off; speculative
        decoding penalises each tree node for its own path too, as repetition_penalty). logit_bias: {token id:
        value} added to those tokens' logits at every position (-100 bans a token, +100 all but forces it);
        speculative decoding takes it too, greedy output still equal to plain decoding's. ignore_eos: end rows only
        at max_new_tokens or a stop string (latency benchmarks' fixed lengths; end-of-sequence tokens are then left
        out of the text as other special tokens are).
        min_p: min-p sampling (vLLM's): only tokens at least min_p times as likely as the most likely one are sampled
        (0 = off; applied after top_p, as transformers does); speculative decoding's rejection sampling keeps that
        distribution.
        stop_token_ids: token ids that end a row as EOS does (left out of its ids and text), finish_reason "stop".
        min_tokens: no row ends by EOS or a stop_token_ids id before it has this many tokens (those tokens' logits are
        held at -inf until then; speculative decoding too, node by node), nor by a stop string (a chat template's
        end-of-turn text too) that completes in its first min_tokens tokens: one completing in a later token ends it,
        though it starts in them (vLLM's min_tokens since vllm#22014; per token, several per speculative step).
        max_new_tokens still ends it.
        continue_final_message: each prompt is a message list whose last message is a partial assistant reply, and the
        model goes on with it (assistant prefill, as transformers' apply_chat_template and vLLM take it): the prompt
        ends right after that text, without the turn's end, and each result's text is only what the model adds.
        add_generation_prompt: whether a message list's prompt ends with a new assistant turn's header (None: unless
        continue_final_message; both True is refused).
        vLLM's request extras: include_stop_str_in_output: a row ended by a stop string keeps that string at the end of
        its text (and its stream). truncate_prompt_tokens=N: each prompt keeps only its last N tokens (after the chat
        template), what prefill, the room checks and prompt_tokens see. allowed_token_ids: only these tokens are
        ever chosen (-inf elsewhere, as logit_bias is applied: speculative decoding too, greedy output still equal to
        plain decoding's); as in vLLM, EOS ids are not added, so a row ends by EOS only where the list holds one.
        bad_words: words never generated (vLLM's): each word and its leading-space form are tokenized; a word of one
        token is banned outright, a longer word's last token wherever the answer's latest tokens are the rest of it
        (the answer's only, not the prompt's; speculative decoding checks each tree node's own path).
        chat_template, chat_template_kwargs: this call's template (a built-in name or Jinja; None: the engine's
        chat_template) and its variables (over the engine's chat_template_kwargs), as vLLM's LLM.chat takes them:
        the engine's own are left as they are, so concurrent calls render each with their own. Where every prompt
        is rendered with a template, its end-of-turn markers that are plain text in this vocabulary (vicuna_v1.1's
        </s> for a model whose </s> is no special token) end a row as a stop string does: cut before it,
        finish_reason "stop", stop_reason None as for EOS (it is no stop string of the caller's); not under
        ignore_eos.

        speculative="lookup": prompt lookup decoding, for any model, heads or none: each step drafts the tokens that
        followed the latest earlier occurrence of the text's last 1-3 tokens (prompt and answer so far) as a chain
        (tree "chain-K", K in 1..16; None: 7 on a GPU, 4 on a CPU), verified as the heads' trees are (greedy output
        equal to plain decoding's, sampling lossless). It pays where the answer repeats what it has read: edits of
        a given text, code, quotes. speculative="amphista+lookup" (or "medusa+lookup"): the loaded heads' tree and
        the lookup's chain off its root, verified in one forward (tree: the heads' tree, "TREE+chain-K" to size the
        chain), so each step keeps the longer of the heads' guess and the copy. prediction: the answer's expected
        text (OpenAI's predicted outputs), searched before the prompt, for every prompt of the call; it speeds up,
        never changes, the answer. A prediction under speculative="auto" decodes by lookup (beside the loaded
        heads where they pay: speculation_check; alone where they lose to plain steps or there are none); under
        None, "amphista" or "medusa" it is refused.

        admit: continuous batching (a server's requests that arrive mid-run). admit(free) is called between steps
        while the run has `free` rows to give (rows that ended, or rows up to max_batch_size) and returns a list of
        at most `free` (prompt, max_new_tokens) pairs to join the run, with this call's options. They become rows
        len(prompts), len(prompts) + 1, ... in order: each is prefilled alone (the same K/V as a run of its own),
        then decodes with the others. One the engine refuses (malformed, too long for the cache) yields (row,
        error), an AmphistaError, in place of any delta; so does a row left no token to choose mid-run (the InputError
        a run of its own raises there), which ends it while the others go on. last_results holds every row's result
        (None for a refused or failed one). Not with reuse_prefix."""
        # First, while locals() holds the arguments only: an int too long for Python to write (10**5000) met its
        # ValueError in the message of whichever check quoted it. Prompts' token ids are checked as they are
        # encoded (check_token_ids), admit's joiners as they come (_admission).
        huge = {k: v for k, v in locals().items() if k not in ("self", "prompts", "admit")}
        with self._decoding_lock:       # a call refused below leaves no result either, never an earlier run's
            if self._decoding is None:  # (while another run decodes, its own is set as it ends)
                self.last_result, self.last_results = None, []
        refuse_huge_ints(huge)
        # Read once: the prompts (joiners' too) render with it and its end-of-turn tokens end the rows, though
        # another thread set engine.chat_template meanwhile (an async call's worker renders while the loop goes on)
        if chat_template is None:
            template = self._chat_template
            run_eos = self.eos_ids          # the property: what stands in for it (a test's patch) decides
            if self._chat_template is not template:     # set in between
                run_eos = self._eos_ids(template)
        else:
            from .chat import check_chat_template
            template = check_chat_template(chat_template)
            run_eos = self._eos_ids(template)
        from .chat import check_template_variables
        try:    # the engine's own too: `engine.chat_template_kwargs = None` (or a list) met `**` as a bare TypeError
            own = check_template_variables(self.chat_template_kwargs)
        except InputError as e:
            raise InputError(f"engine.{e}") from None
        variables = {**own, **check_template_variables(chat_template_kwargs)}
        min_tokens = check_min_tokens(min_tokens)
        stop_token_ids = self._check_stop_token_ids(stop_token_ids)
        grammar = self._grammar(response_format, ignore_eos, min_tokens, run_eos)
        for name, value in (("row_results", row_results), ("logprobs", logprobs), ("ignore_eos", ignore_eos)):
            if not isinstance(value, bool):
                raise InputError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
        # how a message list's template ends: every prompt's (encode_prompt, render_chat), joiners' too
        template_ends = dict(continue_final_message=continue_final_message, add_generation_prompt=add_generation_prompt)
        for name, value in template_ends.items():
            if not isinstance(value, bool) and not (value is None and name == "add_generation_prompt"):
                raise InputError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")
        if continue_final_message and grammar is not None:
            # the grammar holds the answer from its first token, where the partial reply already stands before it
            raise InputError("continue_final_message does not mix with response_format: the format's grammar would "
                             "start a new answer after the partial reply, not continue it; leave out one of them")
        top_logprobs = check_top_logprobs(top_logprobs, logprobs)
        check_batch_wide(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, seed=seed, chat=chat, speculative=speculative,
                         acceptance=acceptance, reuse_prefix=reuse_prefix, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty)
        if speculative == "none":         # the CLI's word for plain decoding (--speculative none)
            speculative = None
        auto_lookup = False
        if prediction is not None:
            if not isinstance(prediction, str):
                raise InputError(f"prediction must be a string (the answer's expected text), got "
                                 f"{type(prediction).__name__} {prediction!r:.60}")
            if speculative == "auto":     # a prediction is the lookup's to draft from: the heads never read it
                # still "auto" for the room: where only the tree's does not fit, it decodes plainly (fits below)
                auto_lookup = True
                speculative = "lookup" if self.heads is None else f"{self.heads.config.kind}+lookup"
            elif not str(speculative).endswith("lookup"):
                raise InputError(f"prediction drafts for prompt lookup decoding, but speculative={speculative!r} "
                                 f"never reads it; pass speculative='lookup' (or 'auto', 'amphista+lookup') with "
                                 f"it, or leave it out")
        if not isinstance(include_stop_str_in_output, bool):
            raise InputError(f"include_stop_str_in_output must be True or False, got "
                             f"{type(include_stop_str_in_output).__name__} {include_stop_str_in_output!r:.40}")
        keep_last = check_truncate_prompt_tokens(truncate_prompt_tokens)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed, presence_penalty,
                                frequency_penalty, logit_bias, min_p, allowed_token_ids=allowed_token_ids,
                                bad_words_ids=self._bad_words_ids(bad_words))
        params.bias_tensor(self.config.vocab_size, "cpu")      # an id past the vocabulary, named before any work
        if min_tokens and params.allowed_token_ids is not None and set(params.allowed_token_ids) <= set(
                stop_token_ids) | (set() if ignore_eos else set(run_eos)):
            raise InputError("allowed_token_ids holds only ending tokens (EOS, stop_token_ids), which min_tokens holds "
                             "back: no token is left to choose")
        max_new_tokens = check_row_limits(max_new_tokens)
        if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Sequence):
            raise InputError(f"prompts must be a list of prompts (strings or message lists), got "
                             f"{type(prompts).__name__}; for one prompt use generate() or stream()")
        if not prompts:
            raise InputError("no prompts given")
        if is_token_ids(prompts):
            # one prompt's token ids given as the batch: each id was refused as a prompt ("got int"), unnamed
            raise InputError(f"prompts is a list of {len(prompts)} integers: that is one prompt's token ids, not a "
                             f"batch of prompts; pass [ids] to generate_batch / stream_batch, or the ids to "
                             f"generate() / stream()")
        if all(isinstance(p, Mapping) for p in prompts):
            # one conversation given as the batch: each message was refused as a prompt ("got dict"), unnamed
            raise InputError(f"prompts is a list of {len(prompts)} message dict{'s' * (len(prompts) != 1)}: that is "
                             f"one conversation, not a batch of prompts; pass [messages] (a list of conversations) "
                             f"to generate_batch / stream_batch, or the messages to generate() / stream()")
        limits = check_limits_count(max_new_tokens, len(prompts))     # each row's own max_new_tokens
        if min_tokens > min(limits):
            raise InputError(f"min_tokens ({min_tokens}) is more than max_new_tokens ({min(limits)}): no answer "
                             f"could end by EOS; lower min_tokens")
        if not isinstance(reuse_prefix, bool):
            raise InputError(f"reuse_prefix must be True or False, got {type(reuse_prefix).__name__} {reuse_prefix!r}")
        if reuse_prefix and len(prompts) > 1:
            raise InputError(f"reuse_prefix applies to one prompt (a chat's history), got {len(prompts)} prompts")
        if admit is not None and not callable(admit):
            raise InputError(f"admit must be a function admit(free_rows) -> [(prompt, max_new_tokens), ...], got "
                             f"{type(admit).__name__}")
        if admit is not None and reuse_prefix:
            raise InputError("admit (prompts joining the run) and reuse_prefix (one prompt's kept K/V) do not mix")
        from .speculative import ACCEPTANCE, resolve_acceptance
        if acceptance not in ACCEPTANCE:      # checked even where the run turns out plain (speculative="auto")
            raise InputError(f"acceptance must be one of {ACCEPTANCE}, got {acceptance!r}")
        if speculative is not None:          # so is its fit to the sampling parameters: not only where it speculates
            resolve_acceptance(acceptance, params)
        if speculative is None and (tree is not None or acceptance != "auto"):     # not ignored without a word
            what = f"tree={tree!r}" if tree is not None else f"acceptance={acceptance!r}"
            raise InputError(f"{what} applies to speculative decoding, but speculative=None decodes plainly; pass "
                             f"speculative='amphista', 'medusa' or 'auto' (with heads loaded), or 'lookup'")
        stop = check_stop(stop)
        check_stop_unicode(stop)
        turn_stops = [] if ignore_eos or not all(self._templated(p, chat, template) for p in prompts) else \
            [s for s in self._turn_stops(template) if s not in stop]
        tree = _plain_ranks(tree)
        _tree_key(tree)                       # a bad tree is named even where the run turns out plain
        if chat is not None and not isinstance(chat, bool):    # the call's setting, not a fault of prompt 0
            raise InputError(f"chat must be True, False or None (the model's template when it has one), "
                             f"got {type(chat).__name__} {chat!r}")
        # chat=False turns the template off for string prompts; a message list always gets it (README), so a batch
        # may mix raw completions and conversations. A call of message lists only, with chat=False, asks for two
        # contradicting things and is still refused (encode_prompt).
        mixed = chat is False and any(isinstance(p, str) for p in prompts)
        ids = []
        for i, p in enumerate(prompts):
            try:
                ids.append(self._encode_prompt(p, None if mixed and not isinstance(p, str) else chat, template,
                                               **template_ends, variables=variables))
            except InputError as e:       # which of a batch's prompts is empty or malformed
                if len(prompts) == 1:
                    raise
                err = type(e)(f"prompt {i}: {e}")
                err.prompt_index = i      # a server can run the batch's other prompts without it
                raise err from None
        prompts = [getattr(p, "source", p) for p in prompts]     # what the room checks name (RenderedPrompt)
        if keep_last:                         # vLLM's left truncation, before every check of the prompts' room
            ids = [x[-keep_last:] for x in ids]
        if speculative == "auto" and max(limits) == 1 and tree in (None, "auto"):
            # the prefill gives the one token and no step runs: no tree to weigh (the check times for seconds)
            speculative, tree = None, None
        auto, rows = speculative == "auto" or auto_lookup, range(len(ids))

        def fits(extra: int) -> bool:
            """The room checks, made before the cache is allocated or grown (_decoder): a refused call grew the
            cache first (memory a tight machine paid for nothing, and a kept chat prefix dropped with the old one).
            False: "auto" decodes plainly, the tree's room alone not fitting."""
            if extra and auto and any(len(ids[i]) + limits[i] + extra > self.max_seq_len for i in rows):
                # "auto" is the faster way that fits: the tree's scratch slots do not, plain decoding does (where it
                # does not either, the error names the plain room, without a warning for a fallback that never runs)
                for i in rows:
                    self._check_room(ids[i], limits[i], 0, i if len(ids) > 1 else None, prompts[i])
                # It said "needs {extra} more cache slots than max_seq_len leaves": the tree's whole room, not the
                # shortfall, and nothing of what would let this request speculate. Each row with its own limit:
                # the tightest row decides (named where the rows' limits differ).
                tight = min(rows, key=lambda i: self.max_seq_len - limits[i] - len(ids[i]))
                left = self.max_seq_len - limits[tight] - len(ids[tight])
                shorter = left + limits[tight] - extra
                which = f" for prompt {tight}" if len(set(limits)) > 1 else ""
                warnings.warn(f"speculative='auto': the tree needs {extra} cache slots past prompt + max_new_tokens, "
                              f"but max_seq_len={self.max_seq_len} leaves {left}{which}; decoding plainly (to "
                              f"speculate: " + (f"max_new_tokens <= {shorter}{which} or " if shorter >= 1 else "")
                              + f"max_seq_len >= {self.max_seq_len + extra - left})")
                return False
            for i in rows:
                self._check_room(ids[i], limits[i], extra, i if len(ids) > 1 else None, prompts[i])
            return True
        if admit is not None and self._cache is not None and self._cache.batch < self._cache_batch:
            # Joiners take the cache's spare rows (row_capacity), and the cache only grows as a run starts: one
            # allocated before reserve_batch (a generate() before make_server) held a 1-row run at 1 row, so no
            # request could join it. The rows reserve_batch checked the memory for, allocated now.
            self._cache_for(max(self._cache_batch, len(ids)))
        if auto_lookup and self.heads is not None and tree in (None, "auto") and max(limits) > 1 and not \
                self.speculation_check(None, params.temperature, params.top_p, len(ids), params.min_p,
                                       params.repetition_penalty, params.presence_penalty,
                                       params.frequency_penalty).pays:
            # "auto" with a prediction, where the heads lose to plain steps (a 4-bit CPU): beside the chain their tree
            # costs as many nodes for as little, so the prediction drafts alone (measured with predictions, 4-bit
            # SmolLM2: lookup 2.50x plain, amphista+lookup 1.58x; README). Always the heads on a GPU (the check pays)
            speculative = "lookup"
        # max_new_tokens=1 (every row's): the prefill gives the one token and no step runs, so no tree slot is
        # ever written; one row with a larger limit runs steps, and every row's tree then needs its room
        decoder, extra = self._decoder(len(ids), params, speculative, tree, acceptance, fits,
                                       tree_room=max(limits) > 1)
        decoder.logprobs, decoder.top_logprobs = logprobs, top_logprobs
        if hasattr(getattr(decoder, "heads", None), "set_prediction"):
            # every lookup run says its own (none: an earlier run's prediction is not this one's), at its prefill
            # (a stream is lazy: another set up meanwhile shares the drafter); its ids as the server's usage counts them
            decoder.prediction = None if not prediction else [
                prediction_ids(self.tokenizer, prediction, self.max_seq_len)] * len(ids)
        if grammar is not None:
            from .structured import Constraint
            decoder.constraint = Constraint(grammar, len(ids), self.device)
            self.graphs.detach(decoder)     # the masks are host work between a step's forward and its choice
            admit = None                    # joiners' matchers would need their own prefill's token (row_capacity)
        decoder.admits = admit is not None
        # read now, not as the lazy stream starts: a server renders each run's prompts with their own chat_template
        eos_ids = [] if ignore_eos else run_eos
        ends = sorted(set(stop_token_ids) | set(eos_ids))
        if min_tokens and ends:
            decoder.min_tokens, decoder.ban_ids = min_tokens, torch.tensor(ends, device=self.device)
        with self._decoding_lock:       # a stream closed before its first chunk leaves no result, not an earlier one
            if self._decoding is None:  # (another thread's run sets its own when it ends)
                self.last_result, self.last_results = None, []
        # What the cache holds (the kept prefix) is taken when the run starts (_drive), not here: a stream is lazy,
        # and one set up and never started (or a run started in between) must not decide what the next run reuses.
        if admit is not None and not extra and getattr(decoder, "tree", None) is not None:
            # A speculative run of max_new_tokens=1 rows took no tree room (tree_room above): the steps joiners
            # bring write the tree past the room their rows were checked for (an IndexError mid-run, on positions
            # past the cache). It ends after its prefill anyway: joiners wait for the next run.
            admit = None
        joins = None if admit is None else self._admission(admit, chat, extra, min_tokens, mixed, template_ends,
                                                           keep_last, template, variables)
        # The backend this call runs on (the engine's, else a use_backend block around the call), for every step of
        # the stream: it is lazy, and its steps may run after the block, in another thread
        return self._drive(decoder, ids, limits, stop + turn_stops, reuse_prefix, row_results, eos_ids, joins,
                           stop_token_ids, scoped_backend(), include_stop_str_in_output, continue_final_message,
                           turn_stops, min_tokens)

    def _grammar(self, response_format, ignore_eos: bool, min_tokens: int, eos_ids: list[int]):
        """The compiled response_format (structured.Grammar, kept for the engine's recent formats), or None. eos_ids:
        the run's (its chat_template's own end-of-turn tokens end a complete answer too)."""
        from .structured import Grammar, format_key, grammar_source
        if response_format is None or grammar_source(response_format) is None:
            return None
        if ignore_eos or min_tokens:
            what = "ignore_eos" if ignore_eos else "min_tokens"
            raise InputError(f"{what} does not mix with response_format: a constrained answer ends by EOS where its "
                             "grammar is complete, and nowhere else")
        return _recent(self._grammars, (format_key(response_format), tuple(eos_ids)),
                       lambda: Grammar(response_format, self.tokenizer, self.config.vocab_size, eos_ids))

    def _bad_words_ids(self, words) -> tuple:
        """vLLM's bad_words as token sequences: each word with its leading spaces stripped, and with one space before
        it where that is a word of its own (as many tokens, another first token); never the prompt's BOS."""
        if words is None:
            return ()
        words = [words] if isinstance(words, str) else words
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise InputError(f"bad_words must be a list of strings, got {words!r:.80}")
        out = []
        for w in words:
            if not w.strip():
                raise InputError(f"bad_words: {w!r:.40} is empty or only spaces: no word to ban")
            try:
                plain = self.tokenizer.encode(w.lstrip(), add_bos=False)
                spaced = self.tokenizer.encode(" " + w.lstrip(), add_bos=False)
            except InputError as e:         # a lone surrogate: said of the field that holds it
                raise InputError(f"bad_words: {w!r:.40}: {e}") from None
            if not plain:       # a tokenizer that normalises the word away: it would ban nothing, silently
                raise InputError(f"bad_words: {w!r:.40} is no token of this model's tokenizer: no word to ban")
            out.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                out.append(spaced)
        return tuple(tuple(x) for x in out)

    def _check_stop_token_ids(self, ids) -> list[int]:
        if ids is None:
            return []
        # a 1-D array too, and numpy's integers in a list (np.int64(2) was "not a token id of this model"), as a
        # prompt's token ids and max_new_tokens take them
        if getattr(ids, "ndim", 1) == 1 and hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise InputError(f"stop_token_ids must be a list of token ids, got {type(ids).__name__} {ids!r:.80}")
        V = self.config.vocab_size
        for i in ids:
            if not is_integral(i):
                raise InputError(f"stop_token_ids: {i!r:.40} is not a token id (an integer from 0 to {V - 1}), "
                                 f"got {type(i).__name__}")
            if not 0 <= i < V:
                raise InputError(f"stop_token_ids: {int(i)} is not a token id of this model (0 to {V - 1})")
        return [int(i) for i in ids]

    def _admission(self, admit, chat, extra: int, min_tokens: int = 0, mixed: bool = False,
                   template_ends: dict | None = None, keep_last: int | None = None, template: str | None = None,
                   variables: dict | None = None):
        """generation.run's admit: the caller's prompts encoded and checked as stream_batch checks its own (the
        tree's room `extra` too, the run's chat template), each an AmphistaError where refused."""
        def joins(free: int) -> list:
            # The caller's code, called between steps: not in the steps' inference mode (tensors it made there could
            # never join an autograd graph later, and its own inference_mode checks said True)
            with torch.inference_mode(False):
                entries, got = [], admit(free)
            # a str or a dict was iterated into per-character (per-key) errors, a number raised a TypeError
            if got is not None and (isinstance(got, (str, bytes, Mapping)) or not hasattr(got, "__iter__")):
                raise InputError(f"admit({free}) must return a list of (prompt, max_new_tokens) pairs, got "
                                 f"{type(got).__name__} {got!r:.80}")
            for item in got or ():
                try:
                    if not (isinstance(item, (tuple, list)) and len(item) == 2):
                        raise InputError(f"admit must return (prompt, max_new_tokens) pairs, got {item!r:.80}")
                    prompt, limit = item
                    refuse_huge_ints({"max_new_tokens": limit})
                    limit = check_max_new_tokens(limit)
                    if min_tokens > limit:
                        raise InputError(f"min_tokens ({min_tokens}) is more than max_new_tokens ({limit})")
                    # as the run's own prompts are encoded: a message list in a chat=False run of strings gets the
                    # template (it was refused, "needs chat formatting", where it would have shared the run)
                    # token ids are taken as given: a server's joiner comes rendered with the run's template_ends
                    ids = self._encode_prompt(prompt, None if mixed and not isinstance(prompt, str) else chat,
                                              template, **({} if is_token_ids(prompt) else template_ends or {}),
                                              variables=variables)
                    ids = ids[-keep_last:] if keep_last else ids     # truncate_prompt_tokens, as the run's own
                    self._check_room(ids, limit, extra, None, getattr(prompt, "source", prompt))
                    entries.append((ids, limit))
                except AmphistaError as e:
                    entries.append(e)
            if len(entries) > free:
                raise InputError(f"admit({free}) returned {len(entries)} prompts: at most {free} rows are free")
            return entries
        return joins

    def _reusable(self, kept: "_KeptPrefix | None", decoder, prompt: list[int], backend: str | None = None) -> int:
        """Leading prompt tokens whose K/V (and drafting heads' entries) the cache holds from the last kept run.
        One short of the common prefix: the token after the heads' last reused entry must not have changed, and
        at least one token is prefilled to give the first logits."""
        heads = getattr(decoder, "heads", None)
        if kept is None or kept.cache is not decoder.cache or kept.backend != backend or (
                heads is not None and (kept.heads is not heads or kept.epoch != heads.cache_epoch())):
            return 0
        n = 0
        while n < min(len(kept.ids), len(prompt)) and kept.ids[n] == prompt[n]:
            n += 1
        return max(n - 1, 0)

    def _refuse_other_threads(self):
        """InputError where another thread's run decodes on this engine (called under _decoding_lock)."""
        if self._decoding is not None and self._decoding[0] != threading.get_ident():
            raise InputError(async_api.busy_reason(self, self._decoding[0]) or self._BUSY)

    @contextlib.contextmanager
    def _one_run(self, clear_results: bool = False, overtakes: bool = True):
        """The block is a run (its number is yielded): another thread's run would step on this one's cache between
        its steps (and this one on its), each printing the other's garbage, so runs of two threads refuse each
        other. In one thread a newer run overtakes an older stream (_drive). overtakes=False: work that leaves the
        cache alone (prompt_logprobs) refuses other threads' runs but leaves an open stream of its own thread be."""
        me = threading.get_ident()
        async_api.wait_for_stopped_run(self, me)    # an async run its caller stopped (a dropped astream) ends first
        with self._decoding_lock:
            self._refuse_other_threads()
            before = self._decoding
            if overtakes:
                self._runs += 1
            token = self._decoding = (me, self._runs if overtakes else None)
            if clear_results:
                self.last_result, self.last_results = None, []
        try:
            yield token[1]
        finally:
            with self._decoding_lock:
                if self._decoding == token:
                    self._decoding = None if overtakes else before

    def _drive(self, decoder, ids, limits: list[int], stop, keep: bool = False, row_results: bool = False,
               eos_ids=(), admit=None, stop_ids=(), backend: str | None = None, keep_stop: bool = False,
               continued: bool = False, turn_stops=(), min_tokens: int = 0):
        """limits: each row's max_new_tokens. keep: a reuse_prefix run, which starts from what the cache holds and
        keeps its own prompt + answer. eos_ids: the tokens that end a row (none under ignore_eos). backend: the
        kernel backend every step runs on (None: the process's choice).
        row_results: also yield (row, GenerationResult) after a row's last delta, as it ends (stream_batch).
        turn_stops: the stop strings (among `stop`) that are the chat template's end of turn, not the caller's: a row
        they end has stop_reason None, as an EOS token gives (vLLM names only a request's own stops there).
        min_tokens: a stop string (a turn stop too) completing in a row's first min_tokens tokens does not end it."""
        stats = [GenerationStats() for _ in ids]
        ended: list[int] = []           # rows that ended since the last item: their results follow it
        # Not the previous run's result: a run closed early or stopped by an error leaves none
        paused = 0.0
        # paused when each row began: a row that joined mid-run (admit) decodes from then, and less all the
        # run's pauses its decode_ms came out 0 (0 tok/s in a server's log) once its callers' pauses outgrew it
        since: list[float] = []
        with self._one_run(clear_results=True) as mine:
            # Taken when the run starts, as this run's prefill rewrites the cache: taken when the stream was set up,
            # a stream made and never iterated dropped a chat's kept prefix (the next turn prefilled it all again).
            # A run started in between took it then, so what is left here is what the cache holds now.
            kept, self._kept = self._kept, None
            with use_backend(backend):      # what this run's steps compute on (the engine's, the call's, the process')
                ran_on = get_backend(self.device)
            if keep:
                decoder.prefix_reuse = self._reusable(kept, decoder, ids[0], ran_on)
                if decoder.prefix_reuse:    # now: a row's result sent as it ends (row_results) copies its stats
                    stats[0].extra["prompt_tokens_reused"] = decoder.prefix_reuse
            # known from here on, before the run's result: a server's stream tells it as the run starts
            self.prompt_tokens_reused = decoder.prefix_reuse if keep else 0
            steps = run(decoder, ids, self.tokenizer, limits, list(eos_ids), stop, stats,
                        on_row_end=ended.append if row_results else None, admit=admit, stop_ids=stop_ids,
                        # a chat template's end-of-turn text stands for EOS: never kept in the text, as EOS is not
                        keep_stop=[s for s in stop if s not in turn_stops] if keep_stop and turn_stops else keep_stop,
                        continued=continued,   # each row's text read after its prompt
                        min_tokens=min_tokens,
                        # a caller answering rows as they end answers a failed one apart (a server's other requests)
                        row_errors=row_results and len(ids) > 1)
            while True:
                # Inference mode around each step only, never across a yield: held there, the caller's loop body
                # ran in it, a stream left suspended (break, a pool thread's next()) left the thread in it, and
                # streams closed out of order restored each other's mode (the thread stayed in it for good).
                with torch.inference_mode(), use_backend(backend):
                    item = next(steps, None)
                if item is not None and self._runs != mine:
                    # a run started inside this step (from the caller's admit()): its prefill replaced our cache,
                    # so this step's tokens were decoded on its K/V; they must not reach the caller as our text
                    steps.close()
                    raise InputError(self._OVERTAKEN)
                since += [paused] * (len(stats) - len(since))
                for out in ([] if item is None else [item]) + [(b, self._row_result(decoder, stats, b,
                                                                                    paused - since[b], turn_stops))
                                                               for b in ended]:
                    t = time.perf_counter()
                    yield out
                    paused += time.perf_counter() - t
                ended.clear()
                if item is None:
                    break
                if self._runs != mine:      # the caller started another run: its prefill replaced our cache
                    steps.close()
                    raise InputError(self._OVERTAKEN)
            # Inside the run: another thread's run, free to start once this one ends, must not find this one's
            # result (or kept prefix) landing after its own.
            results = [None if p is None else       # a prompt that joined and was refused (admit)
                       GenerationResult(r.text, r.ids, p, r.finish_reason, s, r.logprobs, r.top_logprobs,
                                        r.eos_logprob, _stop_reason(r, turn_stops))
                       for r, p, s in zip(decoder.rows, decoder.row_prompts, stats)]
            for s, t in zip(stats, since):
                s.extra.update(getattr(decoder, "stats_extra", lambda: {})())
                # the time the caller spent between chunks (printing, sending) is no decoding time of this run
                s.decode_ms = max(0.0, s.decode_ms - (paused - t) * 1e3)
            self.last_results, self.last_result = results, results[0]
            if keep:    # the fed tokens' K/V: prompt + answer, up to the cache length (not the last sampled token)
                seq = ids[0] + decoder.rows[0].ids
                heads = getattr(decoder, "heads", None)
                self._kept = _KeptPrefix(decoder.cache, heads, None if heads is None else heads.cache_epoch(),
                                         seq[:min(int(decoder.cache.length[0]), len(seq))], ran_on)
        return results      # generate() takes its own run's results from here, never from last_result

    @staticmethod
    def _row_result(decoder, stats, b: int, paused: float, turn_stops=()) -> GenerationResult:
        """Row b's result as it ends mid-run: its own token count and decode time (less the caller's time between
        items so far), where the run's end gives every row the whole batch's."""
        s = copy.deepcopy(stats[b])
        s.extra.update(getattr(decoder, "stats_extra", lambda: {})())
        s.decode_ms = max(0.0, s.decode_ms - paused * 1e3)
        r = decoder.rows[b]
        return GenerationResult(r.text, list(r.ids), decoder.row_prompts[b], r.finish_reason, s,
                                None if r.logprobs is None else list(r.logprobs),
                                None if r.top_logprobs is None else list(r.top_logprobs), r.eos_logprob,
                                _stop_reason(r, turn_stops))

    def _forget_results(self):
        """A call refused before stream_batch's own checks (n, row_results) leaves no result either, never an earlier
        run's (while another thread's run decodes, its own is set as it ends)."""
        with self._decoding_lock:
            if self._decoding is None:
                self.last_result, self.last_results = None, []

    def stream(self, prompt, max_new_tokens: int = 256, **options) -> Iterator[str]:
        """Text chunks as they are decoded; `engine.last_result` holds the full result afterwards (None where the
        stream was closed before its end or stopped by an error). Options: those of stream_batch (max_new_tokens: an
        int, or a list of one, as a batch of one prompt takes it).

        Bad arguments raise here, before the first chunk is asked for."""
        self._forget_results()
        if options.get("row_results") is True:
            # its (row, GenerationResult) item came out of this text stream as a chunk ("".join raised TypeError)
            raise InputError("row_results=True applies to stream_batch; stream() yields text chunks only (the result "
                             "is in engine.last_result once the stream ends)")
        _refuse_n(options, "stream")
        _check_one_prompt(prompt)
        # Row 0 only: with admit, prompts that join the run are rows 1, 2, ...; their deltas (and a refused one's
        # error) were yielded as this prompt's text. Their results are in last_results, as after generate().
        return (delta for row, delta in self.stream_batch([prompt], max_new_tokens, **options) if row == 0)

    def generate(self, prompt, max_new_tokens: int = 256, **options) -> GenerationResult:
        """One prompt (text, or a list of chat messages) to its GenerationResult. Options: those of stream_batch
        (max_new_tokens: an int, or a list of one, as a batch of one prompt takes it)."""
        self._forget_results()
        _refuse_n(options, "generate")
        _check_one_prompt(prompt)
        return _drain(self.stream_batch([prompt], max_new_tokens, **options))[0]

    def generate_batch(self, prompts: list, max_new_tokens: int = 256, n: int = 1, **options) -> list[GenerationResult]:
        """Several prompts (texts or message lists), decoded in one batch, to their GenerationResults in order.
        max_new_tokens: one int for all, or a list of one per prompt (each row ends at its own). n: answers per
        prompt (OpenAI's and vLLM's n), rows of the one batch, returned prompt by prompt (prompt 0's n, then prompt
        1's...); sampled answers differ (one generator draws for all rows), greedy ones are the same. Options: those
        of stream_batch."""
        self._forget_results()
        _check_option_names(options, "generate_batch")
        refuse_huge_ints({"n": n, "max_new_tokens": max_new_tokens})     # checked here before stream_batch's check
        if isinstance(n, bool) or not is_integral(n) or n < 1:
            raise InputError(f"n must be an integer >= 1 (answers per prompt), got {type(n).__name__} {n!r}")
        if n > 1 and isinstance(prompts, (list, tuple)):     # anything else: stream_batch names it (a tuple's n
            # was dropped: one answer per prompt)
            # checked as given (an error counts the prompts, not n times them), then each prompt's limit n times
            limits = check_limits_count(check_row_limits(max_new_tokens), len(prompts))
            rows = len(prompts) * int(n)
            if rows > self._cache_batch:
                # before n copies of each prompt are listed: n=10**12 filled the memory with those lists (an
                # out-of-memory kill) before the cache's own check could refuse the batch
                try:
                    KVCache.check_fits(self.config, rows, self.max_seq_len, self.dtype, self.device,
                                       freeable=0 if self._cache is None else self._cache.nbytes)
                except CacheFullError as e:
                    raise CacheFullError(f"n={int(n)} answers to each of {len(prompts)} prompt"
                                         f"{'s' * (len(prompts) != 1)} make a batch of {rows} rows: {e}") from None
            max_new_tokens = [m for m in limits for _ in range(int(n))]
            prompts = [p for p in prompts for _ in range(int(n))]
        return _drain(self.stream_batch(prompts, max_new_tokens, **options))

    # ---- asyncio (async_api.py): each call's sync run in a worker thread of its own, one call at a time -------
    async def agenerate(self, *args, **kwargs) -> GenerationResult:
        """`await engine.agenerate(...)`: generate()'s arguments and result, without blocking the event loop.
        Concurrent async calls on this engine wait their turn; cancelling stops the run before its next step."""
        return await async_api.result(self, "generate", args, kwargs)

    def astream(self, *args, **kwargs) -> AsyncIterator[str]:
        """`async for chunk in engine.astream(...)`: stream()'s arguments and chunks (bad arguments raise at the
        first step). Closing it (break, aclose) or cancelling its task stops the run before its next step."""
        return async_api.items(self, "stream", args, kwargs)

    async def agenerate_batch(self, *args, **kwargs) -> list[GenerationResult]:
        """`await engine.agenerate_batch(...)`: generate_batch()'s arguments and results (see agenerate)."""
        return await async_api.result(self, "generate_batch", args, kwargs)

    def astream_batch(self, *args, **kwargs) -> AsyncIterator[tuple[int, str]]:
        """`async for item in engine.astream_batch(...)`: stream_batch()'s arguments and items (see astream)."""
        return async_api.items(self, "stream_batch", args, kwargs)

    @property
    def eos_ids(self) -> list[int]:
        return self._eos_ids(self._chat_template)

    def _eos_ids(self, template: str | None) -> list[int]:
        """The ids that end an answer to a prompt rendered with `template` (None: the model's own)."""
        from .chat import chat_stops
        # A model without a template of its own is prompted in the fallback's format (ChatML: <|im_end|> ends the
        # turn), which its declared EOS need not be; special tokens only, never text that merely spells one.
        turn_ends = {i for i in chat_stops(self.tokenizer, template).token_ids if i in self.tokenizer.special_ids}
        return sorted(set(self.tokenizer.eos_ids) | set(self.config.eos_token_id or []) | turn_ends)

    def _turn_stops(self, template: str | None) -> list[str]:
        """The end-of-turn markers of `template` (None: the model's own) that no special token stands for (eos_ids
        takes those): text, matched in the answer as stop strings (vicuna_v1.1's </s> where </s> is plain text)."""
        from .chat import chat_stops
        tok = self.tokenizer
        return [s for s in chat_stops(tok, template).strings if tok.token_to_id(s) not in tok.special_ids]

    def _templated(self, prompt, chat: bool | None, template: str | None) -> bool:
        """Whether _encode_prompt renders this prompt with a chat template (as it decides it)."""
        if isinstance(prompt, RenderedPrompt):
            return True
        if is_token_ids(prompt):
            return False
        if not isinstance(prompt, str):
            return True         # a message list always gets it
        return self._chats(chat, template)

    def _chats(self, chat: bool | None, template: str | None) -> bool:
        """Whether a string prompt is rendered as a user message: chat=None, where a template exists."""
        return chat if chat is not None else (self.tokenizer.chat_template or template) is not None


# heads module -> (a weak reference to) the engine that loaded it last: a module another engine runs is copied
_HEADS_ENGINE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ENGINES: "weakref.WeakSet" = weakref.WeakSet()


def _runs_of_other_threads_end_in_child():
    """Only the forking thread lives on in a forked child: a run another thread had going never ends there, and left
    marked the engine refused every call of the child as "decoding in another thread" (and a decoding lock that
    thread held at the fork was held for good: the child's first call hung). Such a run took the kept prefix with
    it (_drive), so the child's next run prefills afresh."""
    me = threading.get_ident()
    for engine in list(_ENGINES):
        if not engine._decoding_lock._is_owned():
            engine._decoding_lock = threading.RLock()
        if engine._decoding is not None and engine._decoding[0] != me:
            engine._decoding = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_runs_of_other_threads_end_in_child)


def _heads_copy(heads, device, dtype):
    """Heads of their own for an engine (state, binding, linears): the same weights (shared where the dtype and
    device are the engine's already), cast and placed as a heads directory's load would place them."""
    from .heads import HeadsConfig
    from .heads.checkpoint import KEPT_SKETCH, _assign, build_heads
    with torch.device("meta"):
        twin = build_heads(HeadsConfig.from_dict(copy.deepcopy(heads.config.to_dict())))
    twin = _assign(twin, heads.state_dict(), "heads", device, dtype)
    if getattr(heads, KEPT_SKETCH, None) is not None:
        setattr(twin, KEPT_SKETCH, getattr(heads, KEPT_SKETCH))
    return twin


def _stop_reason(row, turn_stops) -> int | str | None:
    """A row's stop_reason, None where a chat template's end-of-turn string ended it (see _drive)."""
    return None if row.finish_reason == "stop" and row.stop_reason in turn_stops else row.stop_reason


def _check_one_prompt(prompt):
    """generate / stream's one prompt, before it is wrapped as a batch of one: an int or one message dict was told
    "prompts is a list of 1 integers" / "1 message dict" (generate_batch's words, of a list the caller never gave)."""
    if isinstance(prompt, Mapping):
        raise InputError(f"prompt is one message dict, got {prompt!r:.60}: a conversation is a list of them (pass "
                         f"[message])")
    if isinstance(prompt, numbers.Number):
        refuse_huge_ints({"prompt": prompt})
        raise InputError(f"prompt must be a non-empty string, a list of messages or a list of token ids, got "
                         f"{type(prompt).__name__} {prompt!r:.40} (one token id is [id])")


def _refuse_n(options: dict, method: str):
    """n (answers per prompt) is generate_batch's: passed to generate() or stream() it raised a TypeError naming
    stream_batch, a method the caller never called."""
    if "n" in options:
        refuse_huge_ints({"n": options["n"]})
        raise InputError(f"n={options['n']!r:.40}: {method}() gives one answer; for several answers to one prompt use "
                         f"generate_batch([prompt], n=N)")
    _check_option_names(options, method)


def _check_option_names(options: dict, method: str):
    """An option stream_batch does not take, named with the closest it does (a misspelt temprature=0.7 raised
    Python's TypeError naming stream_batch, a method the caller never called)."""
    import difflib
    import inspect
    params = inspect.signature(Engine.stream_batch).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return          # stream_batch wrapped by a caller that takes any keyword (a test's spy): it says itself
    known = [p for p in params if p not in ("self", "prompts")]
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise InputError(f"{method}() has no option {name!r}" + (f": did you mean {close[0]!r}?" if close else
                                                                      f"; its options: {', '.join(known)}"))


def _drain(steps) -> list[GenerationResult]:
    """Runs a stream to its end: its own results. Not engine.last_result(s): another thread's run, starting the
    moment this one ends, resets them (generate returned None, or that run's result)."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def _with_batch_signature(method, first: str, returns: str):
    """help() and editors show the sampling and speculation options stream_batch takes, not **options."""
    import inspect
    params = list(inspect.signature(Engine.stream_batch).parameters.values())
    params[1] = params[1].replace(name=first, annotation=inspect.Parameter.empty)
    params[3:] = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params[3:]]   # as the methods take them
    method.__signature__ = inspect.Signature(params, return_annotation=returns)


_with_batch_signature(Engine.stream, "prompt", "Iterator[str]")
_with_batch_signature(Engine.generate, "prompt", "GenerationResult")
_with_batch_signature(Engine.generate_batch, "prompts", "list[GenerationResult]")
async_api.mirror_signatures(Engine)

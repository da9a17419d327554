"""An OpenAI-compatible HTTP API over one Engine: /v1/chat/completions, /v1/completions, /v1/models, /health
(and /metrics, Prometheus's text format: metrics.py; vLLM's /tokenize and /detokenize; OpenAI's Responses API,
/v1/responses, mapped onto chat completions: responses.py; Anthropic's Messages API, /v1/messages, alike:
anthropic_messages.py). With an API key, every path but /health and /metrics takes it as `Authorization: Bearer KEY`
or `x-api-key: KEY` (401 without it).

Standard library only (http.server, json). The engine has one KV cache and decodes one run at a time, but a run may
hold several prompts: a scheduler thread (batching.py) owns the engine and decodes the requests that wait when a run
starts, and that share its batch-wide options, together in one engine.stream_batch (up to max_batch); handler threads
hand it their request and relay what it sends back. Streamed replies are Server-Sent Events as OpenAI sends them.
Errors are OpenAI's JSON error object: 400 for a bad request (the engine's own InputError messages, which name the
problem), 404 for an unknown path, 500 for anything else (a bug: the traceback goes to the server's stderr, never into
the reply, and the server goes on serving).
"""
from __future__ import annotations

import contextlib
import decimal
import hmac
import json
import math
import queue
import re
import secrets
import select
import socket
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from ..errors import (AmphistaError, CacheFullError, ConfigError, HUGE_INT_DIGITS, InputError, int_digits, read_json,
                      refuse_huge_ints)
from ..generation import LOGPROB_FLOOR    # -inf logprobs as JSON can carry them (to_dict writes them alike)
from ..prompt_lookup import prediction_counts, prediction_ids
from ..reasoning import ReasoningSplitter, check_reasoning_parser
from ..structured import VLLM_KINDS, _lone_surrogate, closed_objects, grammar_source, json_whitespace, vllm_format
from ..tools import (ToolCallFilter, ToolError, ToolPlan, check_tool_calls, openai_tool_calls, plan_for,
                     prepare_messages, show_controls, template_supports_tools, tool_call_format)
from .batching import Job, Scheduler
from .metrics import CONTENT_TYPE as METRICS_TYPE, Metrics, completion_tokens, request_latency

# What a request that leaves a field out gets (`amphista serve` sets them from its sampling flags). temperature 0:
# greedy, as the engine and the other commands default to (OpenAI's own default is 1).
DEFAULTS = dict(max_new_tokens=512, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, stop=None,
                seed=None)
MAX_BODY = 32 << 20          # bytes: a request body past this is refused (413) without reading it
# s: a request body that has not all come by then is a 408 and its connection closed. Not the handler's 300 s
# socket timeout, which stays for a slow reader of a streamed reply: a client that sent less than its
# Content-Length and waited held a handler thread that long
BODY_TIMEOUT_S = 30.0
# s: a request's line and headers, from their first byte, alike (a 408 and the connection closed)
HEADER_TIMEOUT_S = 30.0
# s: the wait for a request line's first byte. A new connection's is short: one that never sent a byte was held
# 300 s, a handler thread each (nginx's client_header_timeout holds it 60 s, uvicorn 5 s). A keep-alive connection
# idle between its requests keeps the longer wait (a client's pool reuses it). Either is closed quietly, as nginx
# and uvicorn close them: no request came to answer
FIRST_BYTE_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 300.0
MAX_BATCH = 8                # requests decoded together at most (`amphista serve --max-batch`)
WAIT_POLL_S = 0.1            # a handler waiting for its run looks this often whether its client left
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SPECULATIVE = ("auto", "amphista", "medusa", "lookup", "amphista+lookup", "medusa+lookup", "none")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
# OpenAI fields this server does not implement: refused where they ask for something (a client sending the default
# value, as many do, is served). name -> (the values that ask for nothing, what to say)
UNSUPPORTED = {
    "tools": ((None, []), "tools apply to /v1/chat/completions (a completion's prompt is not templated)"),
    "tool_choice": ((None, "none", "auto"), "tool_choice applies to /v1/chat/completions, with tools"),
    # OpenAI's deprecated form of tools: its replies (message.function_call) differ too, so it is not mapped
    "functions": ((None, []), "functions (OpenAI's deprecated function calling) is not supported: send "
                  "tools=[{\"type\": \"function\", \"function\": {...}}] instead"),
    "function_call": ((None, "none", "auto"), "function_call (OpenAI's deprecated function calling) is not "
                      "supported: send tool_choice with tools instead"),
    "best_of": ((None, 1), "best_of other than 1 is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    # a chat answer with audio (OpenAI's audio models): the reply would come without the message.audio it asked for
    "audio": ((None,), "audio output is not supported: this server answers with text only (leave out audio)"),
    "modalities": ((None, [], ["text"]), "modalities other than [\"text\"] are not supported: this server answers "
                   "with text only"),
    # the openai SDK's chat.completions.create sends them: a search or a moderation pass the answer would lack
    "web_search_options": ((None,), "web search is not supported: this server runs no built-in tools (leave out "
                           "web_search_options)"),
    "moderation": ((None,), "moderation is not supported: this server runs no moderation model (leave out "
                   "moderation)"),
}
# the refusals each endpoint checks (tools and tool_choice are served on chat: tools.py)
CHAT_ONLY = {"functions", "function_call", "audio", "modalities", "web_search_options", "moderation"}
# logprobs (an int on /v1/completions, true on chat), top_logprobs (chat) and echo (completions) are served:
# decoding() reads them
COMPLETION_ONLY = {"best_of", "suffix", "tools", "tool_choice", "functions", "function_call", "web_search_options",
                   "moderation"}
# OpenAI fields taken as hints and ignored (both endpoints): an end-user id, a cache key, its retention and options, a
# service tier, a reasoning model's effort and verbosity, store (as vLLM: served, nothing kept) and metadata (kept
# with a stored completion). They change nothing an answer holds here, but a malformed one is a 400 naming it
# (_hints), as OpenAI refuses it. A predicted output is checked there too, and drafted from (decoding(): prompt
# lookup), which speeds an answer up and never changes it.
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast", "ultrafast")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
VERBOSITY = ("low", "medium", "high")
HINT_TEXTS = ("user", "prompt_cache_key", "safety_identifier")
HINT_VALUES = {"service_tier": SERVICE_TIERS, "reasoning_effort": REASONING_EFFORTS, "verbosity": VERBOSITY,
               "prompt_cache_retention": ("in_memory", "24h")}
# prompt_cache_options' keys -> the values each takes (None: a string); its prewarm (fill the cache, answer nothing)
# is refused where true: this server answers every request
CACHE_OPTIONS = {"mode": ("implicit", "explicit"), "ttl": ("30m", "12h"), "comparison_response_id": None,
                 "prewarm": (False,)}
# presence_penalty, frequency_penalty, logit_bias (both endpoints) and vLLM's ignore_eos are served: decoding() reads
# them, in OpenAI's ranges
PENALTY_RANGE = 2.0          # OpenAI's presence/frequency penalties: [-2, 2]
LOGIT_BIAS_RANGE = 100.0     # OpenAI's logit_bias values: [-100, 100]
MAX_TOP_LOGPROBS = 20        # OpenAI's limit for chat's top_logprobs; a completion's logprobs (OpenAI: 5) takes it too
# Open without the API key: a load balancer's probe and a Prometheus scrape carry no credentials (vLLM leaves /health
# open too). Only these exact routes, and not under /v1/ (where vLLM asks for the key on every path).
OPEN_ROUTES = ("/health", "/metrics")
# A client's X-Request-Id taken as its reply's x-request-id (as vLLM echoes it): one token of printable ASCII, no
# longer than this. Anything else (a space, a control or non-ASCII character, a megabyte) is not written back into a
# header or the log line; the reply gets a fresh id instead.
_CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,128}")


class ApiError(Exception):
    """A request the server refuses: OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def check_api_key(key) -> bytes | None:
    """An API key (None: none asked) as the bytes a request's header must hold. Its text is never put in a
    message: a refusal names what is wrong with it only."""
    if key is None:
        return None
    if not isinstance(key, str):
        raise InputError(f"api_key must be a string or None, got {type(key).__name__}")
    if not key:
        raise InputError("the API key is empty: give a non-empty key, or none to serve without one")
    # a header carries printable ASCII only (clients refuse others), and a space would end the Bearer token
    if not all("!" <= c <= "~" for c in key):
        raise InputError("the API key holds a space, a control character or a non-ASCII character: an "
                         "Authorization header cannot carry it as one Bearer token")
    return key.encode("ascii")


def request_id(sent: str | None = None) -> str:
    """A reply's x-request-id: the client's own X-Request-Id where it sent a sane one, else a fresh 32-hex id (as
    vLLM's random uuid), which the server's log line for the request carries too."""
    if isinstance(sent, str) and _CLIENT_REQUEST_ID.fullmatch(sent.strip(" \t")):
        return sent.strip(" \t")
    return secrets.token_hex(16)


def _engine_error(e: AmphistaError, prompt_field: str = "messages", tree_given: bool = False,
                  constraint: str | None = None) -> ApiError:
    """An engine error as the API's: its message in the request's field names (max_tokens, not max_new_tokens;
    the cache is the server's --max-seq-len). tree_given: the request named a tree, which a ConfigError (an unknown
    tree, bad paths, a tree deeper than the heads) is about. constraint: the field the request's structured-output
    constraint came in (guided_choice, structured_outputs.regex, ...: _constraint_field), which the engine's
    response_format errors are about."""
    message = str(e).replace("max_new_tokens", "max_tokens").replace(
        "max_seq_len", "the server's --max-seq-len").replace("speculative=None", "speculative='none'")
    if constraint not in (None, "response_format"):
        # not only at its start: "ignore_eos does not mix with response_format" named a field the client never sent
        message = re.sub(r"\bresponse_format\b", lambda m: constraint, message)
    if isinstance(e, CacheFullError):       # OpenAI's status and code for a prompt past the context
        return ApiError(400, message, prompt_field, "context_length_exceeded")
    if isinstance(e, InputError):
        m = re.match(r"(\w+)", message)
        field = m.group(1) if m else None
        # response_format: the errors that need the tokenizer (structured.Grammar, built once per format as the run
        # starts: engine._grammar), which the shape check before the run (grammar_source) cannot see
        # "prompt is empty" is about the request's prompt field (messages on chat), as a prompt too long is
        param = prompt_field if field == "prompt" else field if field in (
            "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop", "max_tokens", "speculative",
            "tree", "acceptance", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "min_tokens",
            "stop_token_ids", "response_format", "continue_final_message", "truncate_prompt_tokens",
            "allowed_token_ids", "bad_words", "include_stop_str_in_output", "ignore_eos", "prediction") else None
        if constraint is not None and message.startswith(constraint):
            param = constraint          # a vLLM constraint's name (structured_outputs.regex: more than one word)
        return ApiError(400, message, param)
    if isinstance(e, ConfigError) and tree_given and "tree" in message:
        return ApiError(400, message, "tree")
    # NonFiniteError (the model's logits overflowed), a model's broken chat template: the server's, not the client's
    return ApiError(500, message, kind="server_error")


def _not_utf8(text: str) -> bool:
    """JSON's \\ud800 escapes decode to lone surrogates, which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{param} must be a string, got {_json_type(value)}", param)
    if _not_utf8(value):
        raise ApiError(400, f"{param} is not valid Unicode (a lone surrogate escape such as \\ud800)", param)
    return value


def _json_bytes(obj) -> bytes:
    """A reply's JSON as UTF-8. A lone surrogate a request sent as \\ud800 (a structured_outputs key, a regex) and
    an error message quotes has no UTF-8: encoding it raised past the error handling, and the client got no reply
    at all. Such a reply is written with escapes, as the request came."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj).encode("ascii")


def _long_int_field(data: bytes, error: Exception) -> ApiError | None:
    """json.loads' refusal of an integer longer than Python reads (4300 digits by default) as a 400 naming the field
    that holds it: that is valid JSON, not "not valid JSON". The body is read again (only after such a refusal)
    with each long integer standing in as a LongInt of its length. None: the error was another."""
    if type(error) is not ValueError:       # JSONDecodeError, UnicodeDecodeError: their own message says it
        return None
    try:
        body = read_json(data)
        refuse_huge_ints(body if isinstance(body, dict) else {"the request body": body})
    except InputError as e:
        field = re.match(r"\w+", str(e))
        return ApiError(400, f"{e}; the request body's JSON holds an integer too long to read",
                        field[0] if field and isinstance(body, dict) and field[0] in body else None)
    except (ValueError, RecursionError):
        pass
    return None


# The JSON schema keywords whose numbers the grammar engine (llguidance) reads as 64-bit floats to bound an answer
# (under const and enum: anywhere in the value)
_SCHEMA_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_SCHEMA_VALUES = ("const", "enum")
# the request fields that carry JSON schemas to the grammar engine (chat, completions, Responses' text.format, the
# Messages API's tools[].input_schema); a number under a template variable or metadata is no schema's
_SCHEMA_ROOTS = ("response_format", "guided_json", "structured_outputs", "tools", "text")
# keywords whose values are data about a schema, not read as bounds (default: {"const": 0.30000000000000001})
_SCHEMA_DATA = ("default", "examples")
# a decimal of at most 15 significant digits (DBL_DIG) is written back as itself by float's repr, unless it is
# below a float's normal range (1e-400 is 0.0)
_EXACT_TEXT = 16


class _BodyNumbers:
    """json.loads' hooks for a request body's non-integer numbers, and the refusals they call for.

    Python's json took NaN, Infinity and -Infinity (not JSON: OpenAI's server refuses them) and read a number past
    a float's range (1e400) as inf: a field then said "got inf" of a number the client never wrote, or took it
    (a schema's const 1e400 was "Unsatisfiable schema: incompatible types"). Each is a 400 naming the field. A number
    with more digits than a float holds (0.30000000000000001, 1e-400) is rounded, as every OpenAI server reads it,
    except as a schema's bound, multipleOf, const or enum: the grammar engine takes those as 64-bit floats, so the
    rounding silently changed the schema (a bound 9007199254740993.0 became 2^53, which passed the refusal of
    bounds past it; multipleOf 1e-400 became 0). Refused there, as structured.py refuses integer bounds past 2^53.
    Only a body that holds such a number is walked again to find where."""

    def __init__(self):
        self.odd: dict[int, tuple] = {}        # id(the float read) -> (the float, its text, what is wrong)

    def number(self, text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            self.odd[id(value)] = (value, text, "overflow")
        elif (len(text) > _EXACT_TEXT or abs(value) < sys.float_info.min) and _lost_digits(text, value):
            self.odd[id(value)] = (value, text, "inexact")
        return value

    def constant(self, text: str) -> float:
        value = float(text)
        self.odd[id(value)] = (value, text, "constant")
        return value

    def check(self, body) -> None:
        if not self.odd:
            return
        for steps, (_, text, what) in _floats_in(body, self.odd):
            if what == "inexact" and not _in_schema_number(steps):
                continue
            where = _field_path(steps) if steps else "the request body"
            if what == "constant":
                message = f"{where} is {text}, which is not JSON (JSON has no NaN or Infinity): send a finite number"
            elif what == "overflow":
                message = (f"{where} is {text[:40]}, past the largest number a 64-bit float holds (about 1.8e308; "
                           f"it would be read as infinity): send a finite number within it")
            else:
                message = (f"{where} is {text[:60]}, which the grammar engine (llguidance) cannot hold as written: "
                           f"it reads a schema's numbers as 64-bit floats, so this one would be {float(text)!r}; give "
                           f"one a float holds as written (at most 15 significant digits, magnitude from about "
                           f"2.2e-308 to 1.8e308)")
            raise ApiError(400, message, steps[0] if steps and isinstance(steps[0], str) else None)


def _lost_digits(text: str, value: float) -> bool:
    """Whether the decimal text differs from the float it was read as, written back (float's shortest repr)."""
    try:
        return decimal.Decimal(text) != decimal.Decimal(repr(value))
    except decimal.InvalidOperation:
        return False


def _floats_in(body, odd: dict):
    """(path steps, odd[id]) for each float of odd in body, in the body's order. A stack, not recursion: json.loads
    reads bodies nested deeper than Python's recursion limit."""
    stack = [((), body)]
    while stack:
        steps, value = stack.pop()
        if isinstance(value, float):
            hit = odd.get(id(value))
            if hit is not None and hit[0] is value:
                yield list(steps), hit
        elif isinstance(value, dict):
            stack.extend(((*steps, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*steps, i), v) for i, v in reversed(list(enumerate(value))))


def _in_schema_number(steps) -> bool:
    if not steps or steps[0] not in _SCHEMA_ROOTS:
        return False

    def keyword(i: int) -> bool:        # a keyword, not a property's name (properties.const is a subschema)
        return isinstance(steps[i], str) and steps[i - 1] != "properties"

    if any(steps[i] in _SCHEMA_DATA and keyword(i) for i in range(1, len(steps))):
        return False
    if steps[-1] in _SCHEMA_NUMBERS:
        return True
    return any(steps[i] in _SCHEMA_VALUES and keyword(i) for i in range(1, len(steps)))


def _field_path(steps) -> str:
    out, rest = (steps[0][:40], steps[1:]) if isinstance(steps[0], str) else ("the request body", steps)
    for s in rest:
        out += f"[{s}]" if isinstance(s, int) else f".{s[:40]}" if s.isidentifier() else f"[{s!r:.40}]"
    return out


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__) + f" ({json.dumps(value)[:60]})"


def _content(content, i: int, role: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts (joined by newlines,
    as vLLM joins them)."""
    param = f"messages[{i}].content"
    if content is None and role == "assistant":      # an assistant turn that only called tools has none
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else None
                raise ApiError(400, f"{param}[{j}] is not a text part ({{\"type\": \"text\", \"text\": ...}})"
                               + (f": {kind!r} parts are not supported by this text-only model" if kind else ""),
                               param)
            texts.append(_text(part.get("text"), f"{param}[{j}].text"))
        return "\n".join(texts)
    return _text(content, param)


def _messages(body) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is a required field: a list of {\"role\": ..., \"content\": ...} objects",
                       "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages must be a non-empty array of message objects, got {_json_type(messages)}",
                       "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content', got {_json_type(m)}",
                           f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of 'system', 'user', 'assistant', 'tool' (or "
                           f"'developer', taken as 'system'), got {json.dumps(role)}" + (
                               ": function messages (OpenAI's deprecated function calling) are not supported; "
                               "send tool messages" if role == "function" else ""), f"messages[{i}].role")
        one = {"role": ROLES[role], "content": _content(m.get("content"), i, role)}
        try:
            if role == "assistant" and m.get("tool_calls") not in (None, []):
                # arguments as dicts, as templates read them (tools.py)
                one["tool_calls"] = check_tool_calls(m["tool_calls"], i)
        except ToolError as e:
            raise ApiError(400, str(e), e.param) from None
        if role == "assistant" and m.get("reasoning_content") is not None:
            # a reply's reasoning sent back (--reasoning-parser): the template's to use (Qwen3's renders it in a
            # tool-calling turn) or leave out
            one["reasoning_content"] = _text(m["reasoning_content"], f"messages[{i}].reasoning_content")
        if role == "tool":          # a function's result: passed through, with the call it answers
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise ApiError(400, f"messages[{i}].tool_call_id must be the id (a string) of the assistant's tool "
                               f"call this message answers, got {_json_type(call_id)}", f"messages[{i}].tool_call_id")
            one["tool_call_id"] = call_id
            if isinstance(m.get("name"), str):
                one["name"] = m["name"]
        out.append(one)
    return out


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def _prompts(body) -> list:
    """A completion request's prompts, as OpenAI takes them: a string, a list of strings, a list of token ids (one
    prompt) or a list of token-id lists (what lm-evaluation-harness sends with a tokenizer). Each is a string or a
    list of ints (the engine takes those as given: no template, no BOS added); one choice per prompt."""
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is a required field (a string, a list of strings, or token ids)", "prompt")
    if isinstance(prompt, str):
        return [_text(prompt, "prompt")]
    if _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [_text(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    if isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
        return prompt
    raise ApiError(400, f"prompt must be a string, a list of strings, a list of token ids (integers) or a list of "
                   f"token-id lists, got {_json_type(prompt)}", "prompt")


def _max_tokens(body, zero_ok: bool = False) -> int | None:
    """max_tokens; zero_ok: 0 is taken too (echo: the prompt's logprobs only)."""
    for name in ("max_completion_tokens", "max_tokens"):     # the newer name first, as OpenAI reads them
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
            zero = (" (0 only with \"echo\": true on /v1/completions, which scores the prompt)"
                    if value == 0 and not isinstance(value, bool) else "")
            raise ApiError(400, f"{name} must be a positive integer{zero}, got {_json_type(value)}", name)
        return value
    return None


def _top_count(value, param: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"{param} must be an integer from 0 to {MAX_TOP_LOGPROBS} ({what}), got "
                       f"{_json_type(value)}", param)
    return value


def _logprob_options(body, chat: bool) -> dict:
    """stream_batch's logprobs / top_logprobs for a request. Chat: "logprobs": true, "top_logprobs": N. Completions
    (OpenAI's legacy format): "logprobs": N, the alternatives to list at each position (0: none, each token's own
    logprob only)."""
    lp = body.get("logprobs")
    if chat:
        if lp not in (None, False, True):
            raise ApiError(400, f"logprobs must be true or false, got {_json_type(lp)}", "logprobs")
        top = body.get("top_logprobs")
        top = 0 if top is None else _top_count(top, "top_logprobs", "the most likely tokens listed at each position")
        if top and lp is not True:
            raise ApiError(400, f"top_logprobs={top} needs \"logprobs\": true", "top_logprobs")
    else:
        if body.get("top_logprobs") not in (None, 0):       # chat's field: not ignored without a word here
            raise ApiError(400, f"top_logprobs is a chat completion's field; a completion asks for the most likely "
                           f"tokens at each position with \"logprobs\": N (got top_logprobs="
                           f"{json.dumps(body['top_logprobs'])[:40]})", "top_logprobs")
        if lp is None or lp is False:
            return {}
        top = _top_count(lp, "logprobs", "on /v1/completions: how many most likely tokens to list at each position; "
                         "0 gives each token's own logprob only")
    if lp is None or lp is False:
        return {}
    return {"logprobs": True, **({"top_logprobs": top} if top else {})}


def _prompt_logprobs(body) -> int | None:
    """vLLM's prompt_logprobs: N (0 to MAX_TOP_LOGPROBS), the most likely tokens listed beside each prompt token's
    own logprob and rank; None: not asked for. As vLLM, N > 0 is refused with stream (its chunks have no place for
    them) and 0 there asks for nothing."""
    value = body.get("prompt_logprobs")
    if value is None:
        return None
    if value == -1 and type(value) is int:
        # vLLM's -1 is the whole vocabulary (there too only where its max_logprobs allows it): a list per token
        raise ApiError(400, f"prompt_logprobs=-1 (every token of the vocabulary at each position) is not served: "
                       f"send an integer from 0 to {MAX_TOP_LOGPROBS}", "prompt_logprobs")
    _top_count(value, "prompt_logprobs", "the most likely tokens listed at each prompt position, beside the prompt "
               "token's own")
    if body.get("stream") is True:
        if value:
            raise ApiError(400, f"prompt_logprobs={value} is not available with \"stream\": true (as vLLM): send the "
                           f"request without stream", "prompt_logprobs")
        return None
    return value


def _openai_logit_options(body: dict) -> dict:
    """presence_penalty, frequency_penalty, logit_bias, and vLLM's ignore_eos, min_tokens and stop_token_ids as engine
    options (only those the request sets to something: the rest keep the engine's off), in OpenAI's ranges; the
    engine checks the token ids."""
    out = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is None or value == 0 and not isinstance(value, bool):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > PENALTY_RANGE:
            raise ApiError(400, f"{name} must be a number in [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}], got "
                           f"{json.dumps(value)[:40]}", name)
        out[name] = float(value)
    bias = body.get("logit_bias")
    if bias is not None and bias != {}:
        if not isinstance(bias, dict):
            raise ApiError(400, f"logit_bias must be an object mapping token ids to biases, got {_json_type(bias)}",
                           "logit_bias")
        for key, value in bias.items():
            # ASCII digits only: str.isdigit() also takes "²" (int() then raised a bare ValueError: a 500)
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ApiError(400, f"logit_bias keys must be token ids (e.g. \"50256\"), got {json.dumps(key)}",
                               "logit_bias")
            if len(key) > HUGE_INT_DIGITS:      # int() of one past 4300 digits raised Python's ValueError: a 500
                raise ApiError(400, f"logit_bias: a key is a token id of {len(key)} digits: far past any token id",
                               "logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
                raise ApiError(400, f"logit_bias[{key}] must be a number in [-{LOGIT_BIAS_RANGE:g}, "
                               f"{LOGIT_BIAS_RANGE:g}], got {json.dumps(value)[:40]}", "logit_bias")
        out["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
    ignore = body.get("ignore_eos")
    if ignore is not None and not isinstance(ignore, bool):      # `in (True, False)` takes 1 and 0.0
        raise ApiError(400, f"ignore_eos must be true or false, got {_json_type(ignore)}", "ignore_eos")
    if ignore:
        out["ignore_eos"] = True
    # vLLM's: the engine checks them (InputError, named)
    if body.get("min_tokens") is not None and (body["min_tokens"] != 0 or isinstance(body["min_tokens"], bool)):
        out["min_tokens"] = body["min_tokens"]      # false too: the engine names it (it was taken for 0)
    if body.get("stop_token_ids") not in (None, []):
        out["stop_token_ids"] = body["stop_token_ids"]
    # vLLM's request extras (Engine.stream_batch checks their values and names them; [] allowed ids is an error)
    keep = body.get("include_stop_str_in_output")
    if keep not in (None, False, True) or isinstance(keep, (int, float)) and not isinstance(keep, bool):
        raise ApiError(400, f"include_stop_str_in_output must be true or false, got {_json_type(keep)}",
                       "include_stop_str_in_output")
    if keep:
        out["include_stop_str_in_output"] = True
    if body.get("truncate_prompt_tokens") is not None:
        if body.get("echo"):
            # echo gives the prompt as sent and its logprobs, which truncation would leave disagreeing with usage
            raise ApiError(400, "truncate_prompt_tokens does not mix with echo: send one of them",
                           "truncate_prompt_tokens")
        out["truncate_prompt_tokens"] = body["truncate_prompt_tokens"]
    if body.get("allowed_token_ids") is not None:
        out["allowed_token_ids"] = body["allowed_token_ids"]
    if body.get("bad_words") not in (None, []):
        out["bad_words"] = body["bad_words"]
    rf = _constraint(body)
    if rf is not None:
        out["response_format"] = rf
    return out


# vLLM's older structured-output fields -> the structured_outputs key (structured.VLLM_KINDS) each one means
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
# structured_outputs' keys other than its constraints: whitespace_pattern, disable_any_whitespace and
# disable_additional_properties are honoured on JSON; disable_fallback (a backend's) is taken and ignored;
# structural_tag is refused where it asks for something
STRUCTURED_OPTIONS = ("whitespace_pattern", "disable_any_whitespace", "disable_additional_properties",
                      "disable_fallback", "structural_tag")


# Every field /v1/chat/completions and /v1/completions read (served, taken as a hint, or refused where it asks for
# something). Any other is ignored and named in a warning on the server's log, as vLLM does: a typo (max_token,
# temprature) would otherwise go unnoticed, and a 400 would refuse the extra fields SDKs send.
SHARED_FIELDS = frozenset((
    "model", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "repetition_penalty", "seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "echo", "ignore_eos", "min_tokens", "stop_token_ids", "include_stop_str_in_output",
    "truncate_prompt_tokens", "allowed_token_ids", "bad_words", "response_format", *GUIDED, "prompt_logprobs",
    "guided_whitespace_pattern", "guided_decoding_backend", "structured_outputs", "speculative", "tree",
    "cache_prompt", "chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
    *HINT_TEXTS, *HINT_VALUES, "store", "metadata", "prompt_cache_options", "prediction"))
CHAT_FIELDS = SHARED_FIELDS | {"messages", "tools", "tool_choice", "parallel_tool_calls", *UNSUPPORTED}
COMPLETION_FIELDS = SHARED_FIELDS | {"prompt", *UNSUPPORTED}


def ignored_fields(body: dict, known: frozenset) -> str | None:
    """The warning for a request's fields outside `known` (None: none), their names as repr() writes them (a
    client's key cannot break the log line) and cut short."""
    unknown = [name for name in body if name not in known]
    if not unknown:
        return None
    names = ", ".join(repr(name[:60]) for name in unknown[:10]) + (f" and {len(unknown) - 10} more"
                                                                   if len(unknown) > 10 else "")
    return (f"warning: the request's field{'s' if len(unknown) > 1 else ''} {names} "
            f"{'are' if len(unknown) > 1 else 'is'} not read by this server and ignored (a misspelt name?)")


def _constraints(body: dict) -> list[tuple[str, str | None, object]]:
    """The structured-output constraints a request sets, (field, vLLM kind or None for response_format, value): its
    response_format (not {"type": "text"}), vLLM's guided_json / guided_regex / guided_choice / guided_grammar, and
    the constraint keys of vLLM's structured_outputs object (a null or false one sets nothing, as in vLLM)."""
    found = []
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        found.append(("response_format", None, rf))
    found += [(name, kind, body[name]) for name, kind in GUIDED.items() if body.get(name) is not None]
    so = body.get("structured_outputs")
    if so is None:
        return found
    if not isinstance(so, dict):
        raise ApiError(400, f"structured_outputs must be an object (vLLM's: {{\"json\": ...}}, {{\"regex\": ...}}, "
                       f"{{\"choice\": [...]}}, {{\"grammar\": ...}} or {{\"json_object\": true}}), got "
                       f"{_json_type(so)}", "structured_outputs")
    unknown = sorted(set(so) - set(VLLM_KINDS) - set(STRUCTURED_OPTIONS))
    if unknown:
        raise ApiError(400, f"structured_outputs has no key {unknown[0]!r} (its keys: "
                       f"{', '.join(VLLM_KINDS + STRUCTURED_OPTIONS)})", f"structured_outputs.{unknown[0]}")
    for kind in VLLM_KINDS:
        if so.get(kind) is not None and not (kind == "json_object" and so[kind] is False):
            found.append((f"structured_outputs.{kind}", kind, so[kind]))
    return found


def _constraint_field(body) -> str | None:
    """The field a request's one structured-output constraint came in, or None (none, or a request refused):
    tool_choice where it holds the answer to tool calls ("required" or a named function; tool_plan refuses it beside
    another constraint), whose grammar the engine calls response_format too."""
    try:
        found = _constraints(body) if isinstance(body, dict) else []
    except ApiError:
        return None
    if not found and isinstance(body, dict) and body.get("tools") and \
            body.get("tool_choice") not in (None, "none", "auto"):
        return "tool_choice"
    return found[0][0] if len(found) == 1 else None


def _constraint(body: dict) -> dict | None:
    """A request's one structured-output constraint (_constraints) as the response_format the engine takes
    (structured.py: vLLM's fields are aliases of it), checked: a 400 naming the field before the request waits (the
    grammar's fit to the tokenizer is checked when its run starts). None: free text. Two constraints, or vLLM's
    options where they cannot be honoured, are 400s naming the fields."""
    found = _constraints(body)
    if len(found) > 1:
        names = [name for name, _, _ in found]
        raise ApiError(400, f"a request takes one structured-output constraint, got {', '.join(names[:-1])} and "
                       f"{names[-1]}: send one of them", names[1])
    backend = body.get("guided_decoding_backend")       # vLLM's choice of grammar engine: here always llguidance
    if backend is not None and not isinstance(backend, str):
        raise ApiError(400, f"guided_decoding_backend must be a string, got {_json_type(backend)}",
                       "guided_decoding_backend")
    so = body.get("structured_outputs") or {}
    for key in ("disable_any_whitespace", "disable_fallback", "disable_additional_properties"):
        if so.get(key) is not None and not isinstance(so[key], bool):      # 1 == True: `in` took it for one
            raise ApiError(400, f"structured_outputs.{key} must be true or false, got {_json_type(so[key])}",
                           f"structured_outputs.{key}")
    if so.get("structural_tag") is not None:
        raise ApiError(400, "structured_outputs.structural_tag is not supported: send tools (tool calls) or one of "
                       "json, regex, choice, grammar", "structured_outputs.structural_tag")
    patterns = [(name, value) for name, value in (("guided_whitespace_pattern", body.get("guided_whitespace_pattern")),
                ("structured_outputs.whitespace_pattern", so.get("whitespace_pattern"))) if value is not None]
    if len(patterns) > 1:
        raise ApiError(400, "guided_whitespace_pattern and structured_outputs.whitespace_pattern are both set: send "
                       "one of them", patterns[1][0])
    if not found:
        if patterns:
            raise ApiError(400, f"{patterns[0][0]} sets the whitespace of JSON answers: it needs a JSON constraint "
                           f"(guided_json, structured_outputs.json or json_object, response_format json_schema or "
                           f"json_object)", patterns[0][0])
        return None
    field, kind, value = found[0]
    # OpenAI's json_object / json_schema, regex / grammar / choice as SGLang and vLLM take them (structured.py)
    name = field
    try:
        rf = value if kind is None else vllm_format(kind, value, field)
        if so.get("disable_additional_properties"):
            rf = closed_objects(rf)
        compact = bool(so.get("disable_any_whitespace"))    # on a regex, choice or grammar: nothing to disable
        if patterns or compact:
            name, pattern = patterns[0] if patterns else ("structured_outputs.disable_any_whitespace", None)
            spaced = json_whitespace(rf, name, pattern, compact)
            if spaced is None and patterns:
                raise ApiError(400, f"{name} sets the whitespace of JSON answers, and {field} is not JSON: leave it "
                               f"out", name)
            rf = rf if spaced is None else spaced
        if grammar_source(rf) is None:
            return None
    except AmphistaError as e:
        message = str(e)
        if not message.startswith(name):       # the constraint's error, not its whitespace pattern's
            name = field
            for said in ("response_format json_schema.schema", "response_format"):
                if field != "response_format" and message.startswith(said):
                    message = field + message[len(said):]      # the mapped format's error, in the field's name
                    break
        raise ApiError(400, message, name) from None
    return rf


def _unsupported(body, fields):
    for name in fields:
        allowed, why = UNSUPPORTED[name]
        # none of the values that ask for nothing is a boolean: true is no best_of 1 (`in` took it for one)
        if name in body and (body[name] not in allowed or isinstance(body[name], bool)):
            raise ApiError(400, f"{why} (got {name}={json.dumps(body[name])[:80]})", name)


def check_metadata(metadata):
    """OpenAI's metadata: at most 16 string pairs, keys up to 64 characters, values up to 512."""
    if metadata is None:
        return
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ApiError(400, f"metadata must be an object of string values, got {_json_type(metadata)}", "metadata")
    if len(metadata) > 16:
        raise ApiError(400, f"metadata may have at most 16 key-value pairs, got {len(metadata)}", "metadata")
    for key, value in metadata.items():
        # echoed in a Response: a lone surrogate there is text no client could read back
        if _not_utf8(key):
            raise ApiError(400, "metadata has a key that is not valid Unicode (a lone surrogate escape such as "
                           "\\ud800)", "metadata")
        _text(value, f"metadata.{key}")
        if len(key) > 64:
            raise ApiError(400, f"metadata keys must be at most 64 characters, got one of {len(key)}: "
                           f"{json.dumps(key[:40])}...", "metadata")
        if len(value) > 512:
            raise ApiError(400, f"metadata values must be at most 512 characters, got {len(value)}",
                           f"metadata.{key}")


def check_cache_options(options):
    """OpenAI's prompt_cache_options (a hint here: this server caches by --cache-prompt), checked."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise ApiError(400, f"prompt_cache_options must be an object ({{\"mode\": ..., \"ttl\": ...}}), got "
                       f"{_json_type(options)}", "prompt_cache_options")
    for key, value in options.items():
        if key not in CACHE_OPTIONS:
            raise ApiError(400, f"prompt_cache_options has no key {json.dumps(key)[:60]} (its keys: "
                           f"{', '.join(CACHE_OPTIONS)})", f"prompt_cache_options.{key}")
        allowed, name = CACHE_OPTIONS[key], f"prompt_cache_options.{key}"
        if key == "prewarm" and value is True:
            raise ApiError(400, "prompt_cache_options.prewarm (filling the prompt cache without an answer) is not "
                           "supported: this server answers every request (leave it out)", name)
        if allowed is None:
            if value is not None:
                _text(value, name)
            continue
        if value is None or any(type(value) is type(a) and value == a for a in allowed):
            continue
        raise ApiError(400, f"{name} must be one of {', '.join(map(json.dumps, allowed))} or null, got "
                       f"{_json_type(value)}", name)


def check_hint_values(body: dict, names) -> None:
    """Each of `names` (keys of HINT_VALUES) the body sends is null or one of its allowed strings."""
    for name in names:
        allowed = HINT_VALUES[name]
        if body.get(name) is not None and not (isinstance(body[name], str) and body[name] in allowed):
            raise ApiError(400, f"{name} must be one of {', '.join(map(repr, allowed))} or null, got "
                           f"{_json_type(body[name])}", name)


def _hints(body: dict):
    """The OpenAI hints a request sends (HINT_TEXTS, HINT_VALUES, store, metadata, prompt_cache_options,
    prediction), checked; none of them changes the answer (a prediction is drafted from: _prediction)."""
    for name in HINT_TEXTS:
        if body.get(name) is not None:
            _text(body[name], name)
    check_hint_values(body, HINT_VALUES)
    if body.get("store") is not None and not isinstance(body["store"], bool):
        raise ApiError(400, f"store must be true or false, got {_json_type(body['store'])}", "store")
    check_metadata(body.get("metadata"))
    check_cache_options(body.get("prompt_cache_options"))
    prediction = body.get("prediction")
    if prediction is not None:
        content = prediction.get("content") if isinstance(prediction, dict) else None
        if not (isinstance(prediction, dict) and prediction.get("type") == "content" and (
                isinstance(content, str) or isinstance(content, list) and all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                    for p in content))):
            raise ApiError(400, f"prediction must be {{\"type\": \"content\", \"content\": a string or text "
                           f"parts}}, got {_json_type(prediction)}", "prediction")


def _prediction(body: dict) -> str | None:
    """The text of a request's OpenAI predicted output (its parts joined; checked by _hints), or None where it sends
    none or an empty one, which has nothing to draft from."""
    prediction = body.get("prediction")
    if not isinstance(prediction, dict):
        return None
    content = prediction.get("content")
    text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content or ()
                                                            if isinstance(p, dict))
    return text or None


def _template_ends(body: dict, chat: bool) -> dict:
    """vLLM's add_generation_prompt (default true) and continue_final_message (default false) of a request, checked,
    as the engine's keyword arguments (stream_batch, encode_prompt): {} for the defaults, so requests that differ
    only in spelling them out share a run. chat: the request's messages get the chat template (else: 400)."""
    given = {}
    for name in ("add_generation_prompt", "continue_final_message"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, bool):         # `in (True, False)` takes 1 and 0.0
            raise ApiError(400, f"{name} must be true or false, got {_json_type(value)}", name)
        if not chat:
            raise ApiError(400, f"{name} applies to messages (the chat template): a prompt is taken as given",
                           name)
        given[name] = value
    if given.get("continue_final_message") and given.get("add_generation_prompt"):
        raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true: "
                       "continue_final_message continues the last (assistant) message, add_generation_prompt starts "
                       "a new assistant turn after it", "continue_final_message")
    if given.get("continue_final_message"):
        return {"continue_final_message": True}
    return {"add_generation_prompt": False} if given.get("add_generation_prompt") is False else {}


def reserve_rows(engine, rows: int):
    """Sizes the engine's KV cache for batches of up to `rows` requests, checking now that the memory is there
    (Engine.reserve_batch: the first batch larger than the current cache allocates all the rows at once, and no
    later one regrows it). `amphista serve` builds the engine as `generate` does, with one row."""
    if rows <= 1:
        return
    try:
        engine.reserve_batch(rows)
    except CacheFullError as e:
        raise CacheFullError(f"batches of up to {rows} requests (max_batch, `amphista serve --max-batch`): {e}; or a "
                             f"smaller max_batch") from None


def _token_text(tok, ids: list[int], i: int) -> tuple[str, bytes]:
    """Answer token i's (text, UTF-8 bytes) for OpenAI's logprobs, whose tokens' bytes joined give the answer's.
    Not decode([id]) alone: a token holding part of a character decodes to U+FFFD, whose bytes (EF BF BD) are no
    part of the answer (a client joining them got garbage where the answer had an accent or an emoji); and a
    sentencepiece token (Llama 2, Mistral) decoded alone loses its leading space (the dummy prefix comes off a
    text's first piece), so the tokens joined ran the words together. Its text is then what it adds to the few
    tokens before it."""
    alone = tok.decode([ids[i]])
    if "\ufffd" in alone and (data := _piece_bytes(tok, ids[i], alone)) is not None:
        return alone, data
    if i:
        before, both = tok.decode(ids[max(0, i - 4):i]), tok.decode(ids[max(0, i - 4):i + 1])
        if "\ufffd" not in both and both.startswith(before):
            return both[len(before):], both[len(before):].encode("utf-8")
    return alone, alone.encode("utf-8")


def _finite(lp):
    """A logprob for a reply: JSON has no -Infinity (json.dumps wrote it, and clients' parsers refused the reply)."""
    return None if lp is None else max(lp, LOGPROB_FLOOR)


def _legacy_token(text: str, data: bytes) -> str:
    """A token's text in a completion's legacy logprobs: a token holding part of a character is named by its bytes,
    "bytes:\\xe6\\x97", as OpenAI names it (its text alone, U+FFFD, named several tokens alike: their top_logprobs
    entries merged, and a client comparing a top token's text with the given one's took any such pair as equal)."""
    if "\ufffd" in text and data != text.encode("utf-8"):
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
    return text


def _alt_text(tok, ids: list[int], i: int, alt: int) -> tuple[str, bytes]:
    """_token_text of token `alt` in place of ids[i] (a top_logprobs alternative), read with the same tokens before
    it as the token given there."""
    start = max(0, i - 4)
    return _token_text(tok, ids[start:i] + [alt], i - start)


def _piece_bytes(tok, token_id: int, alone: str) -> bytes | None:
    """The bytes a token that decodes to U+FFFD stands for: a byte-fallback piece's (<0xE2>), or a byte-level BPE
    piece's through GPT-2's byte alphabet (where they decode to the token's text); None where neither holds."""
    from ..tokenizer import _byte_alphabet, _byte_piece
    piece = tok.id_to_piece(token_id)
    if (byte := _byte_piece(piece)) is not None:
        return bytes([byte])
    inverse = {c: b for b, c in _byte_alphabet().items()}
    if piece and all(c in inverse for c in piece):
        data = bytes(inverse[c] for c in piece)
        if data.decode("utf-8", "replace") == alone:
            return data
    return None


class OpenAIApp:
    """The API over one engine: what each request decodes, and how its reply reads. speculative/tree: the server's
    default way of decoding (a request may name its own); defaults: the sampling values a request leaves out
    (DEFAULTS' keys); max_batch: the most requests decoded together in one run (1: one request at a time)."""

    def __init__(self, engine, model_id: str | list[str] | None = None, speculative: str | None = None, tree=None,
                 defaults: dict | None = None, quiet: bool = False, log=None, max_batch: int = MAX_BATCH,
                 cache_prompt: bool = False, continuous: bool = True, api_key: str | None = None,
                 reasoning_parser: str | None = None, trust_request_chat_template: bool = False):
        """continuous: requests arriving while a run decodes join it between steps where they can share it
        (continuous batching); False: they wait for the next run. api_key: every request but /health and
        /metrics must send `Authorization: Bearer <api_key>` (None: no key asked). reasoning_parser: "qwen3" or
        "deepseek_r1" (vLLM's): a chat answer's <think> block is message.reasoning_content (reasoning.py).
        model_id: the name replies carry; a list of names (vLLM's --served-model-name a b): /v1/models lists each,
        replies carry the first. trust_request_chat_template: a chat request may send its own chat_template
        (vLLM's --trust-request-chat-template; off: refused, since the client's Jinja would run on this server,
        in the request's own thread: no other request waits for it, but its CPU time is the server's)."""
        if isinstance(model_id, (list, tuple)):
            if not model_id or not all(isinstance(n, str) and n.strip() for n in model_id):
                raise InputError(f"model_id must be a name or a non-empty list of names, got {model_id!r:.80}")
            names = list(dict.fromkeys(model_id))
        else:
            names = [model_id or str(getattr(engine, "loaded_name", "model"))]
        self._api_key = check_api_key(api_key)      # before anything starts (the scheduler's thread)
        self.reasoning_parser = check_reasoning_parser(reasoning_parser)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be an integer >= 1 (1: one request at a time), got {max_batch!r}")
        for name, value in (("cache_prompt", cache_prompt), ("continuous", continuous),
                            ("trust_request_chat_template", trust_request_chat_template)):
            if not isinstance(value, bool):
                raise InputError(f"{name} must be True or False, got {value!r}")
        # A request decoded alone starts from the K/V the cache still holds of the last such request's prompt +
        # answer (Engine's reuse_prefix): a chat's next turn prefills only its new messages. Off by default: the
        # reused K/V come from that earlier run, so an answer may differ from a fresh one's in the last bits.
        self.cache_prompt = cache_prompt
        self.trust_request_chat_template = trust_request_chat_template
        reserve_rows(engine, max_batch)
        self.engine = engine
        self.model_ids = names
        self.model_id = names[0]
        self.speculative, self.tree = speculative, tree
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.quiet = quiet
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.scheduler = Scheduler(self._start_run, max_batch, self._encode if continuous else None)
        self.lock = self.scheduler.lock      # held while a run decodes
        # A request's chat_template and variables go to the engine as arguments (encode_prompt, stream_batch), never
        # set on it: one request's slow template (--trust-request-chat-template) holds up no other's rendering
        self.created = int(time.time())
        # GET /metrics: handlers count each reply, the scheduler each run (never a decode step)
        self.metrics = Metrics(max_batch, {"model": self.model_id, "method": self.default_method()},
                               self.scheduler.waiting, self.scheduler.running, time.time())
        self.scheduler.metrics = self.metrics

    @property
    def requires_key(self) -> bool:
        return self._api_key is not None

    def key_matches(self, authorization: str | None) -> bool:
        """Whether an Authorization header's value carries the API key as a Bearer token (scheme in any case, as
        RFC 7235 has it); compared in constant time."""
        if self._api_key is None:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # http.server decodes header bytes as Latin-1: encoded back, they are the bytes the client sent
        given = token.strip().encode("latin-1", "replace")
        return hmac.compare_digest(given, self._api_key)

    def default_method(self) -> str:
        """The server's default way of decoding, as /metrics names it: plain, amphista, medusa or lookup."""
        if self.speculative is None:
            return "plain"
        if self.speculative == "auto":      # the heads loaded decide; none: plain
            heads = getattr(self.engine, "heads", None)
            return heads.config.kind if heads is not None else "plain"
        return str(self.speculative)

    @property
    def batch_sizes(self):
        """A Counter of the rows of each run started so far (runs of 1 included): how much batching happened."""
        return self.scheduler.batch_sizes

    def close(self):
        self.scheduler.close()

    # ---- requests -------------------------------------------------------------------------------------------
    def template_variables(self, body: dict, chat: bool) -> dict:
        """The chat template's variables for this request: its chat_template_kwargs (vLLM's field) over the
        server's --chat-template-kwargs. Part of what a run shares (they change the prompts' tokens)."""
        extra = body.get("chat_template_kwargs") if isinstance(body, dict) else None
        if extra is not None and not chat:
            raise ApiError(400, "chat_template_kwargs applies to /v1/chat/completions: a completion's prompt is "
                           "not templated", "chat_template_kwargs")
        from ..chat import check_template_variables
        try:
            extra = check_template_variables(extra)
        except InputError as e:
            raise ApiError(400, str(e), "chat_template_kwargs") from None
        return {**self.engine.chat_template_kwargs, **extra}

    def request_template(self, body: dict, chat: bool) -> str | None:
        """A request's chat_template (vLLM's field: Jinja text, or a built-in name; never a file), checked, or None:
        the server's (engine.chat_template: --chat-template, else the model's own). Part of what a run shares."""
        template = body.get("chat_template") if isinstance(body, dict) else None
        if template is None:
            return None
        if not chat:
            raise ApiError(400, "chat_template applies to /v1/chat/completions: a completion's prompt is not "
                           "templated", "chat_template")
        if not self.trust_request_chat_template:
            raise ApiError(400, "chat_template in a request is refused: the server was not started with "
                           "--trust-request-chat-template (a client's template would run on the server); "
                           "--chat-template sets the server's own", "chat_template")
        from ..chat import check_chat_template
        try:
            return check_chat_template(template)
        except InputError as e:
            raise ApiError(400, str(e), "chat_template") from None

    def chat_template(self, body: dict) -> str | None:
        """The template a chat request renders with: its own chat_template, else the server's (None: the model's)."""
        template = self.request_template(body, True)
        return template if template is not None else self.engine.chat_template

    def reasoning_splitter(self, job: Job, plan: ToolPlan | None = None) -> ReasoningSplitter | None:
        """A chat answer's reasoning splitter (--reasoning-parser), or None: no parser, or an answer a grammar holds
        to JSON or to tool calls from its first character, which has no <think> block (deepseek_r1 would take all of
        it for reasoning, as the template opened one)."""
        rf = job.options.get("response_format")
        if self.reasoning_parser is None or plan is not None and plan.calls_only or \
                isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema"):
            return None
        splitter = ReasoningSplitter(self.reasoning_parser, job.variables.get("enable_thinking") is not False)
        if job.options.get("continue_final_message") and isinstance(job.prompt, list) and job.prompt \
                and isinstance(job.prompt[-1], dict) and isinstance(job.prompt[-1].get("content"), str):
            # the answer goes on from the prefilled assistant text: a <think> opened there makes what follows
            # reasoning
            splitter.prime(job.prompt[-1]["content"])
        return splitter

    def tool_plan(self, body: dict) -> ToolPlan:
        """A chat request's tools and tool_choice, checked (tools.py), with the grammar "required" or a named
        function holds the answer to."""
        tools = body.get("tools")
        if isinstance(tools, list) and (at := _lone_surrogate(tools)) is not None:
            # the template writes the tools into the prompt, where the tokenizer refused them naming no field
            raise ApiError(400, f"tools{at} is not valid Unicode (a lone surrogate escape such as \\ud800)", "tools")
        try:
            # parallel_tool_calls too: OpenAI's false (at most one call) was ignored, and "required" answered several
            plan = plan_for(self.engine.tokenizer, body.get("tools"), body.get("tool_choice"),
                            body.get("parallel_tool_calls"), self.chat_template(body))
        except ToolError as e:
            raise ApiError(400, str(e), e.param) from None
        given = _constraints(body) if plan.parse else []
        if given:
            field = given[0][0]
            # the answer is read for tool calls (and held to their grammar under "required" or a named function):
            # a format of the client's own (or vLLM's guided_* / structured_outputs) would forbid or garble them
            raise ApiError(400, f"{field} does not mix with tools: the answer is read for tool calls (send "
                           f"tool_choice 'none' to use {field} with tools in the prompt, or leave out {field})", field)
        return plan

    def chat_messages(self, body: dict, plan: ToolPlan | None = None) -> list[dict]:
        """A chat request's messages for the template: tool calls and results as the model's template reads them,
        or written out in Hermes' format, with the tools in the system message, for a template that never mentions
        tools (tools.prepare_messages)."""
        messages = _messages(body)
        tools = plan.tools if plan is not None else None
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = prepare_messages(messages, tools, template_supports_tools(self.engine.tokenizer,
                                                                                 self.chat_template(body)))
        return messages

    def submit(self, body: dict, prompt, chat: bool, stream: bool) -> Job:
        """Hands the request to the scheduler: its Job's queue brings what the run sends. A bad request is refused
        here (ApiError), before it waits for a run."""
        return self.submit_all(body, [prompt], chat, stream)[0]

    def submit_all(self, body: dict, prompts: list, chat: bool, stream: bool,
                   plan: ToolPlan | None = None) -> list[Job]:
        """submit for each prompt of a request (a completion's list of prompts: one Job each, which share a run
        where they share their options; each Job decodes the request's n choices as n rows of one run). All are
        checked before any is handed over. plan: a chat request's tools (tool_plan)."""
        n = self.choices(body)
        variables = self.template_variables(body, chat)
        self.request_template(body, chat)      # refused before any prompt renders (decoding() passes it on)
        if plan is not None and plan.tools:
            # the template's `tools` (transformers' apply_chat_template(tools=...)): a variable, so the batch key
            # keeps requests with other tools out of this one's run, whose prompts render with its variables
            variables = {**variables, "tools": plan.tools}
        if plan is not None and plan.calls_only and body.get("continue_final_message") is True:
            # the calls' grammar holds the answer from its first token: a partial reply before it is not continued
            raise ApiError(400, f"continue_final_message does not mix with tool_choice {json.dumps(plan.choice)}: "
                           f"the answer is held to tool calls from its start; send tool_choice 'auto' or 'none'",
                           "continue_final_message")
        if plan is not None and plan.response_format is not None:
            body = {**body, "response_format": plan.response_format}    # tool_plan refused one of the client's
        cache_prompt = body.get("cache_prompt") if isinstance(body, dict) else None
        if cache_prompt is not None and not isinstance(cache_prompt, bool):    # llama.cpp's; not in the batch key
            raise ApiError(400, f"cache_prompt must be true or false, got {_json_type(cache_prompt)}", "cache_prompt")
        # A chat prompt renders here, in this request's own thread, not in the run's (the scheduler's): a template
        # that renders for long (--trust-request-chat-template) holds up no run; the default max_tokens is cut to
        # the room it leaves
        rendered = [self._render(body, p, variables) if chat else None for p in prompts]
        jobs = [Job(p, self.decoding(body, p, None if chat else False, variables, r), variables, stream, n)
                for p, r in zip(prompts, rendered)]
        for job, r in zip(jobs, rendered):
            job.cache_prompt = cache_prompt
            job.rendered = r
        for i, job in enumerate(jobs):
            try:
                self.scheduler.submit(job)
            except RuntimeError as e:
                for j in jobs[:i]:
                    j.gone.set()
                raise ApiError(503, str(e), kind="server_error") from None
        return jobs

    def check_prompts(self, prompts: list) -> list:
        """A completion's prompts, their token ids checked against the model's vocabulary (400 naming a bad id)."""
        for k, p in enumerate(prompts):
            if not isinstance(p, str):
                try:
                    self.engine.check_token_ids(p)
                except InputError as e:
                    raise ApiError(400, (f"prompt[{k}]: " if len(prompts) > 1 else "prompt: ") + str(e),
                                   "prompt") from None
        return prompts

    def tokenize(self, body) -> dict:
        """POST /tokenize (vLLM's): a prompt's token ids as /v1/completions encodes it, or a chat's as
        /v1/chat/completions prefills it (its tools and chat_template_kwargs rendered the same way)."""
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
        has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
        if has_prompt == has_messages:
            raise ApiError(400, "send prompt (a string, tokenized as /v1/completions takes it) or messages (a chat, "
                           "tokenized with the chat template as /v1/chat/completions prefills it)" +
                           (", not both" if has_prompt else ""), "messages" if has_prompt else "prompt")
        flags = {}
        for name in ("add_special_tokens", "return_token_strs"):
            value = body.get(name)
            if value is not None and not isinstance(value, bool):      # `in (True, False)` takes 1 and 0.0
                raise ApiError(400, f"{name} must be true or false, got {_json_type(value)}", name)
            flags[name] = value
        ends = _template_ends(body, has_messages)   # how the template ends: as a chat completion reads it
        add_special = flags["add_special_tokens"]
        # True: the tokenizer's own special tokens (its BOS where the model takes one; never doubled), as vLLM's
        # default for a prompt; False: none
        add_bos = None if add_special is not False else False
        tok = self.engine.tokenizer
        if has_prompt:
            for name in ("chat_template", "chat_template_kwargs", "tools", "tool_choice"):
                if body.get(name) is not None:
                    raise ApiError(400, f"{name} applies to messages (the chat template): a prompt is tokenized "
                                   f"as given", name)
            ids = tok.encode(_text(body["prompt"], "prompt"), add_bos=add_bos)
        else:
            plan = self.tool_plan(body)
            messages = self.chat_messages(body, plan)
            variables = self.template_variables(body, True)
            if plan.tools:      # as submit_all renders a chat with tools
                variables = {**variables, "tools": plan.tools}
            template = self.chat_template(body)
            if add_special is None:     # what a chat completion prefills
                ids = self.engine.encode_prompt(messages, None, template, **ends, chat_template_kwargs=variables)
            else:
                from ..chat import render_chat
                text = render_chat(tok, messages, template=template, variables=variables, **ends)
                ids = tok.encode(text, add_bos=True if add_special else add_bos)
        reply = {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids}
        if flags["return_token_strs"]:
            reply["token_strs"] = [tok.id_to_piece(i) for i in ids]
        return reply

    def detokenize(self, body) -> dict:
        """POST /detokenize (vLLM's): token ids' text, special tokens included."""
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
        tokens = body.get("tokens")
        if tokens is None:
            raise ApiError(400, "'tokens' is a required field: a list of token ids (integers)", "tokens")
        if not isinstance(tokens, list):
            raise ApiError(400, f"tokens must be a list of token ids (integers), got {_json_type(tokens)}", "tokens")
        vocab = self.engine.config.vocab_size       # the embedding's rows, as a completion's token ids are checked
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, int):
                raise ApiError(400, f"tokens[{i}] must be a token id (an integer), got {_json_type(t)}", "tokens")
            if not 0 <= t < vocab:
                raise ApiError(400, f"tokens[{i}] is {t}, outside the model's vocabulary: ids go from 0 to "
                               f"{vocab - 1}", "tokens")
        return {"prompt": self.engine.tokenizer.decode(tokens)}

    def choices(self, body: dict) -> int:
        """OpenAI's n: how many choices to decode for each prompt, as rows of one run (so at most max_batch)."""
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
        n = body.get("n")
        if n is None:
            return 1
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ApiError(400, f"n must be an integer >= 1 (the number of choices), got {_json_type(n)}", "n")
        limit = self.scheduler.max_batch
        if n > limit:
            # a request's choices are decoded together: more rows than a run holds could never be
            raise ApiError(400, f"n={n} is more than this server decodes together: at most {limit} choices per "
                           f"request (max_batch, `amphista serve --max-batch`); send n <= {limit}, or several "
                           f"requests", "n")
        return n

    def _render(self, body: dict, prompt, variables: dict):
        """A chat prompt's token ids as the run prefills them (engine.RenderedPrompt), or None where rendering it
        fails: the run renders it again and names the fault as it does for any prompt."""
        from ..engine import RenderedPrompt
        try:
            ends = _template_ends(body, True)
            ids = self.engine.encode_prompt(prompt, None, self.request_template(body, True), **ends,
                                            chat_template_kwargs=variables)
        except (ApiError, InputError):
            return None
        return RenderedPrompt(ids, prompt)

    def decoding(self, body: dict, prompt, chat: bool | None, variables: dict | None = None,
                 rendered: list | None = None) -> dict:
        """The keyword arguments of engine.stream_batch for this request (checked by the engine itself); its n is
        choices()'s, not one of them (requests that differ in n share runs). variables: the chat template's
        (template_variables, tools included; None: the server's), for the prompt's length; rendered: its token ids
        (_render), where they are known."""
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {_json_type(stream)}", "stream")
        d = self.defaults
        kwargs = _logprob_options(body, chat is not False)
        if chat is not False and body.get("echo") not in (None, False):     # vLLM's chat echo: not ignored silently
            raise ApiError(400, "echo applies to /v1/completions (the prompt's text and logprobs before the answer); a "
                           "chat completion does not echo its messages", "echo")
        echo = body.get("echo") if chat is False else None
        if echo is not None and not isinstance(echo, bool):      # `in (True, False)` takes 1 and 0.0
            raise ApiError(400, f"echo must be true or false, got {_json_type(echo)}", "echo")
        if echo:
            kwargs["echo"] = True       # the server's own option (_start_run): part of the batch key
        plp = _prompt_logprobs(body)
        if plp is not None:
            kwargs["prompt_logprobs"] = plp     # the server's own option too (_start_run), as echo
        for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop"):
            value = body.get(key)
            if key != "stop" and isinstance(value, (list, dict)):
                # the engine's word for a list here is about batches ("per-prompt settings"): not this request's
                raise ApiError(400, f"{key} must be a number, got {_json_type(value)}", key)
            if key in ("temperature", "top_p", "min_p", "repetition_penalty") and isinstance(value, int) and \
                    not isinstance(value, bool) and abs(value) > sys.float_info.max:
                # the batch key's float() of it raised OverflowError: a 500
                raise ApiError(400, f"{key} must be a finite number, got an integer of {int_digits(value)} digits "
                               f"(past a float's range)", key)
            kwargs[key] = d[key] if value is None else value
        kwargs.update(_openai_logit_options(body))
        if isinstance(kwargs["stop"], list) and not kwargs["stop"]:      # OpenAI's "no stop strings"
            kwargs["stop"] = None
        if kwargs["stop"] is not None and not isinstance(kwargs["stop"], (str, list)):
            # the engine's check takes any empty value ({}, false, 0) for no stops
            raise ApiError(400, f"stop must be a string or a list of strings, got {_json_type(kwargs['stop'])}",
                           "stop")
        stops = kwargs["stop"]          # its type is the engine's to refuse (check_stop), by name
        for s in [stops] if isinstance(stops, str) else stops if isinstance(stops, list) else []:
            if isinstance(s, str) and _not_utf8(s):
                raise ApiError(400, "a stop string is not valid Unicode (a lone surrogate escape)", "stop")
        speculative, tree = self.speculative, self.tree
        prediction = _prediction(body)
        if body.get("speculative") is not None:
            speculative = body["speculative"]
            if speculative not in SPECULATIVE:
                raise ApiError(400, f"speculative must be one of {', '.join(map(repr, SPECULATIVE))}, got "
                               f"{_json_type(speculative)}", "speculative")
            if prediction is not None and speculative != "auto" and not speculative.endswith("lookup"):
                # refused before the request waits (the engine would, at its run)
                raise ApiError(400, f"prediction drafts for prompt lookup decoding, which speculative "
                               f"{speculative!r} never reads; send speculative 'lookup' (or 'auto', "
                               f"'amphista+lookup') with it, or leave one of them out", "prediction")
            speculative = None if speculative == "none" else speculative
            if speculative is None or body.get("tree") is None:
                tree = None         # the server's --tree was meant for its own method, not this request's
        elif prediction is not None and not str(speculative).endswith("lookup"):
            # a prediction is the lookup's to draft from, whatever the server's own method (its heads never read it:
            # beside them where the server decodes with its heads, alone where it decodes plainly). Not "auto" for
            # the server's own "auto": a request without max_tokens is cut to the cache's room, and the engine's
            # "auto" decodes plainly where the tree's room is missing, where a named method is retried shorter
            heads = getattr(self.engine, "heads", None)
            speculative = "lookup" if speculative is None or heads is None else f"{heads.config.kind}+lookup"
            tree = None
        if prediction is not None:
            # batch-wide in the engine: in the options, so the batch key keeps other predictions out of this run
            kwargs["prediction"] = prediction
        if body.get("tree") is not None:
            tree = body["tree"]
            # A request must not make the server open files of its choosing: tree files are the operator's
            if isinstance(tree, str) and (tree.endswith(".json") or "/" in tree or "\\" in tree):
                raise ApiError(400, f"tree {tree!r} names a file: a request may name a tree (e.g. 'mix-4', "
                               f"'dynamic-8') or give its paths as a list; tree files are read only from the "
                               f"server's --tree", "tree")
        kwargs.update(speculative=speculative, tree=tree, chat=chat)
        ends = _template_ends(body, chat is not False)     # part of the batch key: they change the prompt's tokens
        kwargs.update(ends)
        template = self.request_template(body, chat is not False)
        if template is not None:
            kwargs["chat_template"] = template      # the server's own option (_start_run, _encode), as echo
        max_new = _max_tokens(body, zero_ok=bool(echo))
        if max_new is None:
            # Left out: the server's default, cut to the room the prompt leaves in the cache (as OpenAI's models
            # answer up to their context), rather than refused as too long for it.
            max_new = d["max_new_tokens"]
            try:
                kept = len(rendered if rendered is not None else
                           self.engine.encode_prompt(prompt, chat, template, **ends, chat_template_kwargs=variables))
                cut = kwargs.get("truncate_prompt_tokens")     # checked by the run: only a valid one counts here
                if isinstance(cut, int) and not isinstance(cut, bool) and cut >= 1:
                    kept = min(kept, cut)
                room = self.engine.max_seq_len - kept
            except InputError:
                room = 0            # the run names it below
            kwargs["cut_to_room"] = max_new > room      # the run may cut it further for a tree's room (start)
            max_new = max(1, min(max_new, room))
        kwargs["max_new_tokens"] = max_new
        return kwargs

    def _encode(self, job: Job) -> list[int]:
        """A job's prompt as token ids, its template rendered with its variables (one joining a run: Scheduler)."""
        rendered = getattr(job, "rendered", None)
        if rendered is not None:
            return rendered
        return self.engine.encode_prompt(job.prompt, job.options.get("chat"), job.options.get("chat_template"),
                                         continue_final_message=job.options.get("continue_final_message", False),
                                         add_generation_prompt=job.options.get("add_generation_prompt"),
                                         chat_template_kwargs=job.variables)

    def _start_run(self, jobs: list[Job], admit=None):
        """engine.stream_batch of the jobs' prompts, which share their options (the scheduler's `start`), each job's
        prompt once per choice (job.n rows, in the jobs' order: the scheduler's rows): the engine's checks raise
        here, before anything is sent. An echo request with logprobs also gets its prompt's logprobs
        (job.prompt_scores: Engine.prompt_logprobs, one forward over the prompt, for all its choices), here in the
        thread that owns the engine; with max_tokens 0 nothing is decoded."""
        kwargs = dict(jobs[0].options)
        for name in ("max_new_tokens", "cut_to_room"):
            kwargs.pop(name, None)
        # each request's own max_tokens (batch_key leaves it out): the engine ends each row at its own limit
        limits = [job.options["max_new_tokens"] for job in jobs for _ in range(job.n)]
        cut = [job.options.get("cut_to_room", False) for job in jobs]
        max_new = limits[0] if len(jobs) == 1 else limits       # one request: one limit for its rows
        echo = kwargs.pop("echo", False)
        plp = kwargs.pop("prompt_logprobs", None)
        template = kwargs.get("chat_template")
        if template is not None or jobs[0].variables:
            # the run's prompts (joiners' too) render with the request's template and variables, passed, never set
            kwargs["chat_template_kwargs"] = jobs[0].variables
        prompts = [getattr(job, "rendered", None) or job.prompt for job in jobs for _ in range(job.n)]
        # reuse_prefix holds one prompt's K/V: a run of one row only (a batched run leaves nothing to reuse)
        if len(prompts) == 1 and (self.cache_prompt if jobs[0].cache_prompt is None else jobs[0].cache_prompt):
            kwargs["reuse_prefix"] = True
        elif admit is not None and not echo and plp is None and limits[0] != 0:
            # requests arriving mid-run join it (echo's and prompt_logprobs' scores are taken at start)
            kwargs["admit"] = admit
        try:
            steps = (self._prompts_only(prompts, kwargs) if limits[0] == 0 else
                     self._decode(prompts, max_new, cut[0], kwargs))
            if limits[0] != 0 and jobs[0].variables.get("tools"):
                # a run with tools (its requests' alike: the batch key) decodes the control tokens their calls
                # are written with into its text, for the tool parser; content leaves them out (ToolPlan.hidden)
                own = self.engine.chat_template if template is None else template
                steps = show_controls(steps, self.engine.tokenizer, tool_call_format(self.engine.tokenizer, own))
            if kwargs.get("reuse_prefix") and limits[0] != 0:
                steps = self._telling_reuse(steps, jobs[0])
        except AmphistaError as e:
            if len(jobs) > 1 or len(prompts) == 1 or not isinstance(getattr(e, "prompt_index", None), int):
                raise
            # One request's n rows, all its prompt, refused by one of them: the error it gets with n=1 (the
            # engine's, without "prompt 0: "), from the same checks on one row; they refuse it again
            self._decode(prompts[:1], max_new, cut[0], kwargs).close()
            raise
        try:
            for job in jobs:
                if echo and kwargs.get("logprobs"):
                    job.prompt_scores = self.engine.prompt_logprobs(job.prompt, kwargs.get("top_logprobs", 0))
                if plp is not None:
                    job.prompt_ranked = self.ranked_prompt_scores(job, plp)
        except BaseException:
            steps.close()
            raise
        return steps

    def ranked_prompt_scores(self, job: Job, top: int) -> tuple:
        """vLLM's prompt_logprobs of a job's prompt as its run prefills it (a chat's rendered template, a
        truncate_prompt_tokens request's last tokens): (ids, logprobs, top, ranks), Engine.prompt_logprobs' with
        ranks (vLLM lists each token's rank in the vocabulary, which a top list cannot tell for a token outside it).
        Run in the thread that owns the engine, after the run's checks."""
        ids = list(self._encode(job))
        cut = job.options.get("truncate_prompt_tokens")
        if isinstance(cut, int) and not isinstance(cut, bool) and cut >= 1:
            ids = ids[-cut:]                    # as the run keeps them (engine.check_truncate_prompt_tokens)
        return (ids, *self.engine.prompt_logprobs(ids, top, ranks=True))

    def prompt_logprobs(self, job: Job) -> list | None:
        """vLLM's prompt_logprobs for a reply (a completion's choices, a chat completion's top level): one entry per
        prompt token, null for the first, else {token id: {"logprob", "rank", "decoded_token"}} of the prompt's
        token (first; its rank among the whole vocabulary, 1 the likeliest) and the request's N most likely there
        (ranks 1 to N; the prompt's token among them keeps its place first). None where not asked for."""
        ranked = getattr(job, "prompt_ranked", None)
        if ranked is None:
            return None
        ids, lps, tops, ranks = ranked
        tok = self.engine.tokenizer
        out: list = [None]
        for i in range(1, len(ids)):
            entry = {str(ids[i]): {"logprob": _finite(lps[i]), "rank": ranks[i],
                                   "decoded_token": _token_text(tok, ids, i)[0]}}
            for rank, (alt, alt_lp) in enumerate(tops[i] if tops is not None else (), 1):
                entry[str(alt)] = {"logprob": _finite(alt_lp), "rank": rank,
                                   "decoded_token": _alt_text(tok, ids, i, alt)[0]}
            out.append(entry)
        return out

    def _telling_reuse(self, steps, job: Job):
        """A reuse_prefix run's steps, its job given the prompt tokens the cache held (job.prompt_tokens_reused)
        before the first item goes to the scheduler, which sends "start" then: the engine knows them once the run
        has begun, and only this thread reads them there (a handler's read raced the next run). Return value and
        close() pass through."""
        try:
            try:
                first = next(steps)
            except StopIteration as stop:
                return stop.value
            job.prompt_tokens_reused = self.engine.prompt_tokens_reused
            yield first
            return (yield from steps)
        finally:
            steps.close()

    def _decode(self, prompts: list, max_new: int | list[int], cut: bool, kwargs: dict):
        """max_new: the one request's max_tokens, or a list of each one's in a batch; cut: the one request's
        max_tokens was the default cut to its prompt's room (a batch refused runs its requests alone, then this)."""
        try:
            return self.engine.stream_batch(prompts, max_new, row_results=True, **kwargs)
        except CacheFullError as e:
            # A default cut to the cache's room leaves none for an explicit speculative method's tree (under
            # "auto" the engine decodes plainly there by itself): cut it by the tree's room too, rather than
            # refuse a request that never set max_tokens. (A batch refused runs its requests alone: this then.)
            # (one request's n choices: one max_new for its rows, cut alike)
            if isinstance(max_new, list) or not cut or not e.tree_room or max_new - e.tree_room < 1:
                raise
            return self.engine.stream_batch(prompts, max_new - e.tree_room, row_results=True, **kwargs)

    def _prompts_only(self, prompts: list, kwargs: dict):
        """A run of max_tokens 0 (echo: the prompts' logprobs only): no decoding, a result of no tokens per prompt
        (finish_reason "length", as OpenAI gives it). The prompts and sampling values are checked as a run checks
        them, and a prompt past the cache is refused as one."""
        from ..engine import GenerationResult, check_stop
        from ..generation import GenerationStats
        from ..sampling import SamplingParams
        engine = self.engine
        # allowed_token_ids and bad_words too: a bad one is refused by name as a decoding run refuses it
        SamplingParams(kwargs["temperature"], kwargs["top_k"], kwargs["top_p"], kwargs["repetition_penalty"],
                       kwargs["seed"], kwargs.get("presence_penalty", 0.0), kwargs.get("frequency_penalty", 0.0),
                       kwargs.get("logit_bias"), kwargs.get("min_p", 0.0),
                       allowed_token_ids=kwargs.get("allowed_token_ids"),
                       bad_words_ids=engine._bad_words_ids(kwargs.get("bad_words"))).bias_tensor(
            engine.config.vocab_size, "cpu")
        check_stop(kwargs["stop"])
        ids = []
        for i, p in enumerate(prompts):
            ids.append(engine.encode_prompt(p, chat=False))
            if len(ids[-1]) > engine.max_seq_len:
                raise CacheFullError(f"prompt is {len(ids[-1])} tokens, longer than the cache (max_seq_len="
                                     f"{engine.max_seq_len}): shorten it or raise max_seq_len")
        lp, top = kwargs.get("logprobs", False), kwargs.get("top_logprobs", 0)

        def steps():
            return [GenerationResult("", [], x, "length", GenerationStats(prompt_tokens=len(x)),
                                     [] if lp else None, [] if top else None) for x in ids]
            yield       # a generator, as stream_batch's: the scheduler relays it alike
        return steps()

    def method(self, result) -> str | None:
        from ..cli import _method
        return _method(self.engine, result)

    def extra(self, result) -> dict:
        """The non-standard "amphista" key: how the answer was decoded, and the engine's stats (tau, timings)."""
        return {"speculative": self.method(result), "engine_finish_reason": result.finish_reason,
                **result.stats.to_dict()}

    def logprobs(self, result, job: Job | None = None) -> dict | None:
        """OpenAI's choices[].logprobs for a chat answer decoded with logprobs=True: each token's text, bytes and
        log-probability under the target, and its top_logprobs (the request's top_logprobs most likely tokens at
        its position, each with its text and bytes read as the token's own are; empty lists without). None
        otherwise. A continue_final_message job's tokens are read after the prompt's last ones, as its text is (a
        Llama 2 first token keeps its space)."""
        if result.token_logprobs is None:
            return None
        tok = self.engine.tokenizer
        ctx = list(result.prompt_token_ids[-4:]) if job is not None and job.options.get("continue_final_message") \
            else []
        ids = ctx + list(result.token_ids)
        tops = getattr(result, "top_logprobs", None)
        content = []
        for i, lp in enumerate(result.token_logprobs):
            text, data = _token_text(tok, ids, len(ctx) + i)
            alts = []
            for alt, alt_lp in (tops[i] if tops is not None else ()):
                alt_text, alt_data = _alt_text(tok, ids, len(ctx) + i, alt)
                alts.append({"token": alt_text, "logprob": _finite(alt_lp), "bytes": list(alt_data)})
            content.append({"token": text, "logprob": _finite(lp), "bytes": list(data), "top_logprobs": alts})
        return {"content": content, "refusal": None}

    def prompt_text(self, job: Job) -> str:
        """What echo puts before a completion: the prompt as given, or its token ids decoded."""
        return job.prompt if isinstance(job.prompt, str) else self.engine.tokenizer.decode(job.prompt)

    def completion_logprobs(self, job: Job, result) -> dict | None:
        """OpenAI's legacy choices[].logprobs of a completion decoded with "logprobs": N: tokens (each token's text as
        chat's logprobs give it; a token holding part of a character as OpenAI names it, "bytes:\\xe6\\x97"),
        token_logprobs, top_logprobs (a {token text: logprob} dict of the N most likely tokens at each position, and
        the token given there, which OpenAI always lists) and text_offset (where each token's text starts in the
        choice's text, in characters). With echo, the prompt's tokens come first (job.prompt_scores), the first
        one's logprob and top_logprobs null as OpenAI's are. An EOS that ended the answer comes last (OpenAI and
        vLLM list it; its text is no part of the choice's). None where the request asked for no logprobs."""
        if result.token_logprobs is None:
            return None
        import codecs
        tok = self.engine.tokenizer
        echo = bool(job.options.get("echo"))
        n_prompt, n_answer = len(result.prompt_token_ids), len(result.token_ids)
        ids = list(result.prompt_token_ids) + list(result.token_ids)     # the prompt: context for the texts
        n_top = job.options.get("top_logprobs", 0)
        lps, tops = list(result.token_logprobs), list(result.top_logprobs or [[]] * n_answer)
        eos = getattr(result, "eos_logprob", None)
        if eos is not None:
            ids.append(eos[0])
            lps.append(eos[1])
            tops.append(eos[2] or [])
        if echo:
            p_lps, p_tops = job.prompt_scores
            lps, tops = list(p_lps) + lps, list(p_tops or [None] + [[]] * (n_prompt - 1)) + tops
        skipped = set(getattr(tok, "special_ids", ()))
        out = {"tokens": [], "token_logprobs": [_finite(lp) for lp in lps], "top_logprobs": [], "text_offset": []}
        base, end, chars, utf8 = 0, 0, 0, None
        for k, i in enumerate(range(0 if echo else n_prompt, len(ids))):
            if utf8 is None or i == n_prompt:   # the answer's text starts after the echoed prompt's (or at 0)
                base = len(self.prompt_text(job)) if echo and i == n_prompt else 0
                end = len(self.prompt_text(job)) if i < n_prompt else base + len(result.text)
                chars, utf8 = 0, codecs.getincrementaldecoder("utf-8")("replace")
            text, data = _token_text(tok, ids, i)
            out["tokens"].append(_legacy_token(text, data))
            # OpenAI counts characters of the text returned (not of the tokens' texts: a token holding part of a
            # character is one U+FFFD, and one character's three such tokens moved every later offset by two): a
            # token starts at the character its first byte belongs to
            out["text_offset"].append(min(base + chars, end))
            # The final EOS and a special token the answer skips are no part of the text, nor one a string prompt's
            # encoding added (its BOS); one the string holds ("<|im_start|>" written out) is (counted as skipped, it
            # put every later offset of the prompt back by its length)
            if i < n_prompt + n_answer and (ids[i] not in skipped or i < n_prompt and (
                    not isinstance(job.prompt, str) or job.prompt.startswith(text, base + chars))):
                chars += len(utf8.decode(data))
            top = tops[k]
            if top is None:
                out["top_logprobs"].append(None)
                continue
            alts: dict[str, float] = {}
            for alt, alt_lp in top[:n_top]:
                alt_text, alt_data = _alt_text(tok, ids, i, alt)
                alts.setdefault(_legacy_token(alt_text, alt_data), _finite(alt_lp))    # one text: the likelier one
            # OpenAI's "logprobs": N lists up to N + 1: the given token too (with 0, it alone: {} gave a client's
            # max(top.values()) nothing to read)
            alts.setdefault(out["tokens"][-1], out["token_logprobs"][k])
            out["top_logprobs"].append(alts)
        return out

    @staticmethod
    def usage_of(results: list[list], prediction: list[int] | None = None) -> dict:
        """A request's usage: each prompt's results (one per choice), its prompt counted once, every choice's
        tokens summed (as OpenAI counts n), each with the EOS or stop_token_ids token it ended on, which token_ids
        leave out (metrics.completion_tokens: OpenAI's and vLLM's count). /metrics' amphista_generation_tokens_total
        sums the same counts. prediction: the ids of the request's predicted output (predicted_ids), whose tokens
        each choice's token_ids have in order are OpenAI's accepted_prediction_tokens, the rest rejected, summed
        alike; None (no prediction): no completion_tokens_details, as OpenAI's."""
        p = sum(len(rs[0].prompt_token_ids) for rs in results)
        c = sum(completion_tokens(r) for rs in results for r in rs)
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if prediction:
            counts = [prediction_counts(prediction, r.token_ids) for rs in results for r in rs]
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": sum(a for a, _ in counts),
                "rejected_prediction_tokens": sum(rejected for _, rejected in counts)}
        return usage

    def predicted_ids(self, job) -> list[int] | None:
        """A request's whole prediction's ids (prediction_ids), for its usage; None where it sent none (or an empty
        one: _prediction)."""
        text = job.options.get("prediction")
        return prediction_ids(self.engine.tokenizer, text) if text else None


class _HeadTimeout(Exception):
    """A request's line or headers did not all come within HEADER_TIMEOUT_S (not a TimeoutError, which
    http.server takes for a silent close: this one is answered with a 408)."""


class _HeadReader:
    """The connection's rfile while a request's line and headers are read (http.server reads both with readline,
    under the handler's 300 s socket timeout per recv: a client that sent them a byte every few seconds, slowloris,
    held a handler thread for hours). The wait for the request line's first byte has its own limit (`wait`:
    FIRST_BYTE_TIMEOUT_S on a new connection, IDLE_TIMEOUT_S between requests), past which the connection is closed
    quietly; from that byte on, every line must end by one deadline."""

    def __init__(self, rfile, connection, socket_timeout, wait):
        self.rfile, self.connection, self.socket_timeout, self.wait = rfile, connection, socket_timeout, wait
        self.deadline = None
        self.lines = 0              # lines read whole (none: the request line is what did not come)

    def __getattr__(self, name):
        return getattr(self.rfile, name)

    def readline(self, limit=-1):
        if self.deadline is None:
            try:
                self.connection.settimeout(self.wait)
                if not self.rfile.peek(1):      # b"": closed
                    return b""
            except TimeoutError:
                return b""          # http.server closes on b"" with no reply and no log line (not "Request timed out")
            finally:
                with contextlib.suppress(OSError):
                    self.connection.settimeout(self.socket_timeout)
            self.deadline = time.monotonic() + HEADER_TIMEOUT_S
        out = bytearray()
        try:
            while limit < 0 or len(out) < limit:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)    # each wait cut to the time left: a trickle is held to it too
                ahead = self.rfile.peek(1)          # what is buffered, or one read's worth
                if not ahead:
                    break
                end = ahead.find(b"\n")
                take = end + 1 if end >= 0 else len(ahead)
                out += self.rfile.read(take if limit < 0 else min(take, limit - len(out)))
                if out.endswith(b"\n"):
                    break
        except TimeoutError:
            raise _HeadTimeout from None
        finally:
            with contextlib.suppress(OSError):
                self.connection.settimeout(self.socket_timeout)
        self.lines += 1
        return bytes(out)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive for JSON replies (Content-Length); SSE replies close instead
    timeout = 300                      # s: a client that stops reading must not hold the engine for ever
    # TCP_NODELAY: a reply goes out as headers, then body (and a stream as one write per event). With Nagle's
    # algorithm on, the second small write waited for the client's delayed ACK: every request after the first on a
    # keep-alive connection (httpx's pool, openai-python's) took 40 ms more, and stream events were held back.
    disable_nagle_algorithm = True
    server: "AmphistaHTTPServer"

    @property
    def app(self) -> OpenAIApp:
        return self.server.app

    # ---- plumbing -------------------------------------------------------------------------------------------
    def version_string(self):
        from .. import __version__
        return f"amphista-engine/{__version__}"

    def log_message(self, format, *args):      # noqa: A002 -- BaseHTTPRequestHandler's signature
        app = self.server.app
        if app is not None and not app.quiet:
            app.log(f"{self.address_string()} - {format % args}")

    def log_request(self, code="-", size="-"):
        pass                     # one line per request, written once it is done (_done), with its token counts

    @property
    def request_id(self) -> str:
        """This request's id (request_id()), made once it is first asked for: its reply's x-request-id header and
        its log line's. A keep-alive connection's handler serves several requests: the headers the previous one
        left (a request refused before its own headers are read keeps them) are never read for it."""
        if getattr(self, "_request_id", None) is None:
            headers = getattr(self, "headers", None)
            fresh = headers is not None and headers is not getattr(self, "_stale_headers", None)
            self._request_id = request_id(headers.get("X-Request-Id") if fresh else None)
        return self._request_id

    def handle_one_request(self):
        self._request_id = None
        self._logged = False           # this request's line is not written yet (_done)
        self._stale_headers = getattr(self, "headers", None)
        # A client that resets its keep-alive connection (closed with a reply unread, or SO_LINGER 0 as aborting
        # clients and proxies do) raised here, reading the next request line, outside _serve: socketserver
        # printed a traceback per such client on stderr, as if the server had a bug. It is a client leaving.
        wait = IDLE_TIMEOUT_S if getattr(self, "_kept_alive", False) else FIRST_BYTE_TIMEOUT_S
        self._kept_alive = True        # this handler's next request line is one on a kept-alive connection
        self.rfile = head = _HeadReader(self.rfile, self.connection, self.timeout, wait)
        try:
            super().handle_one_request()
        except ConnectionError:       # reset, broken pipe, aborted (Windows' WSAECONNABORTED)
            self.close_connection = True
        except _HeadTimeout:
            self.close_connection = True      # the rest of its headers may still come: not a next request
            if not head.lines:        # no request line: what an earlier request on this connection left is not its
                self.command, self.path, self.request_version, self.requestline = None, "", "", ""
            with contextlib.suppress(OSError):
                self._json(408, ApiError(408, f"the request line and headers did not all come within "
                                              f"{HEADER_TIMEOUT_S:g} s", code="request_timeout").body())
        finally:
            self.rfile = head.rfile

    def parse_request(self):
        try:
            return super().parse_request()
        finally:
            if isinstance(self.rfile, _HeadReader):     # the headers are read: the body has its own deadline
                self.rfile = self.rfile.rfile

    def _done(self, status: int, note: str = ""):
        self._logged = True
        self._count(status)
        self.log_message('"%s %s" %s%s | request_id: %s', getattr(self, "command", None) or "-",
                         getattr(self, "path", ""), status, note, self.request_id)

    def _count(self, status: int):
        """Counts this reply in /metrics, once, under its final status: a JSON reply before its body goes out (a
        client that scrapes once it has its answer sees it counted), a stream once it ends (its status may change
        mid-stream), the others at _done."""
        app = self.server.app
        if app is None or getattr(self, "_counted", False):
            return
        self._counted = True
        try:
            route = self._route() if getattr(self, "command", None) else None   # none: a malformed request line
        except (ApiError, AttributeError):
            route = None
        app.metrics.reply(route, status)

    def send_response(self, code, message=None):
        self._counted = False        # a new reply (_count)
        super().send_response(code, message)
        # A browser frontend on another origin (a chat UI on localhost:3000) may read the replies, as vLLM's and
        # llama.cpp's servers allow by default: without it the browser hid every reply from the page.
        self.send_header("Access-Control-Allow-Origin", "*")
        # the id the server's log line for this request carries: OpenAI's SDKs read it as `_request_id` and an
        # error's `request_id`, Anthropic's as `request-id`; a browser page may read them too
        self.send_header("x-request-id", self.request_id)
        if self._anthropic():
            self.send_header("request-id", self.request_id)
        self.send_header("Access-Control-Expose-Headers", "x-request-id, request-id")

    def _anthropic(self) -> bool:
        """Whether this is a request to Anthropic's Messages API routes (anthropic_messages.py)."""
        try:
            route = self._route() if getattr(self, "command", None) else ""
        except (ApiError, AttributeError):
            return False
        return route == "/messages" or route.startswith("/messages/")

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, an unsupported method) as OpenAI's JSON, not HTML."""
        self.close_connection = True
        try:
            kind = "server_error" if code >= 500 and code != 501 else "invalid_request_error"   # 501: a method
            self._json(code, ApiError(code, message or self.responses.get(code, ("error",))[0], kind=kind).body())
        except OSError:
            pass

    def _json(self, status: int, obj: dict, note: str = ""):
        data = _json_bytes(obj)
        if not getattr(self, "_body_read", True):
            self.close_connection = True     # its unread body would be taken for the connection's next request
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="amphista"')     # RFC 6750's challenge
        if status >= 500 and status != 503:
            # a bug, or the model's own failure (non-finite logits), answers the same request alike again: OpenAI's
            # SDKs retry every 5xx twice (a failing run decoded three times) unless told not to. 503 (the server
            # stopping) may be served by the next one
            self.send_header("x-should-retry", "false")
        if self.close_connection:
            self.send_header("Connection", "close")
        # counted and logged before the headers go out: a HEAD's client has its whole answer with them, and a
        # keep-alive client has its reply without the connection closing. Logged after it, the line came at any
        # time later (after the next request's, after a caller that stopped the server went on)
        self._done(status, note)
        self.end_headers()
        if self.command != "HEAD":           # HEAD: GET's status and headers (Content-Length too), no body
            self.wfile.write(data)

    def _metrics(self):
        """GET /metrics: the counters in Prometheus's text format (metrics.py)."""
        data = self.app.metrics.render().encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", METRICS_TYPE)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        # counted (a HEAD's client, which reads no body, scraped it uncounted) and logged before the headers go out,
        # as _json's replies
        self._done(200)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (a stream's reader went away, a non-streamed request's client
        gave up): its answer is no longer decoded for nobody.

        The end of what the client sends is not its leaving: a client may half-close (curl, some proxies: shutdown
        of its sending side once the request is out) and still read the reply, and a closed client's FIN reads
        alike. Where that end comes, the reply's writing tells them apart: data that reaches a closed socket is
        answered with a reset (POLLHUP/POLLERR here, or ECONNRESET), a half-closed one's is read. A reply not
        begun sends an interim 100 Continue (RFC 9110: an HTTP/1.1 client parses 1xx it did not ask for) as that
        write; a stream's own events are it. An HTTP/1.0 client, which may take no 1xx, is gone at its EOF."""
        try:
            if hasattr(select, "poll"):
                # not select(): it refuses descriptors >= FD_SETSIZE (1024) with a ValueError, taken for "gone",
                # so with a thousand connections open every request was dropped unanswered after its first step
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                events = poller.poll(0)
                if events and events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    return True         # reset (a write reached a closed client), or both sides shut
                readable = bool(events)
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            if not readable or self.connection.recv(1, socket.MSG_PEEK) != b"":
                return False
        except (OSError, ValueError):
            return True
        # EOF: closed, or half-closed
        if self.request_version == "HTTP/1.0" or not hasattr(select, "poll"):
            return True
        if self._started or getattr(self, "_probed", False):
            return False        # written to since: a closed client's reset shows above, at a later look
        try:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        except OSError:
            return True
        self._probed = True
        return False

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = self._chunked()
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "Content-Length is not a number") from None
            if length > MAX_BODY:
                self.close_connection = True       # the body is not read: the connection cannot be reused
                raise ApiError(413, f"the request body is {length} bytes, more than this server takes "
                               f"({MAX_BODY >> 20} MiB)", code="request_too_large")
            data = self._take(length) if length > 0 else b""
        self._body_read = True
        if not data.strip():
            raise ApiError(400, "the request has no body: send a JSON object (Content-Type: application/json)")
        numbers = _BodyNumbers()
        try:
            body = json.loads(data, parse_float=numbers.number, parse_constant=numbers.constant)
        except (ValueError, RecursionError) as e:       # UnicodeDecodeError is a ValueError
            raise _long_int_field(data, e) or ApiError(400, f"the request body is not valid JSON: {e}") from None
        numbers.check(body)
        return body

    def _take(self, n: int, line: bool = False) -> bytes:
        """Up to n bytes of the request body (up to its first b"\\n" where line), fewer where the client closed,
        within BODY_TIMEOUT_S of the body's first read (a 408 after it): each wait for the socket is cut to the
        time left, so a client that trickles its bytes is held to the deadline too."""
        if getattr(self, "_body_deadline", None) is None:
            self._body_deadline = time.monotonic() + BODY_TIMEOUT_S
        out = bytearray()
        try:
            while len(out) < n:
                left = self._body_deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                if line:
                    ahead = self.rfile.peek(1)      # what is buffered, or one read's worth
                    end = ahead.find(b"\n")
                    piece = self.rfile.read(min(n - len(out), end + 1 if end >= 0 else len(ahead)))
                else:
                    piece = self.rfile.read1(n - len(out))
                if not piece:
                    break
                out += piece
                if line and out.endswith(b"\n"):
                    break
        except TimeoutError:
            self.close_connection = True        # the rest of the body may still come: not a next request
            got = "a chunked body's line never ended" if line else f"{len(out)} of the {n} bytes awaited came"
            raise ApiError(408, f"the request body did not all come within {BODY_TIMEOUT_S:g} s ({got}): send as "
                           f"many bytes as its Content-Length says (or whole chunks)", code="request_timeout") from None
        finally:
            with contextlib.suppress(OSError):
                self.connection.settimeout(self.timeout)
        return bytes(out)

    def _chunked(self) -> bytes:
        data = bytearray()      # not bytes: `+=` on bytes copied the whole body per chunk (quadratic)
        while True:
            line = self._take(1024, line=True)
            try:
                size = int(line.split(b";")[0].strip() or b"x", 16)
                if size < 0:        # int("-5", 16) parses; rfile.read(-5) raised a ValueError: a 500
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "malformed chunked request body") from None
            if size == 0:
                while self._take(1024, line=True).strip():      # trailers
                    pass
                return bytes(data)
            if len(data) + size > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, f"the request body is more than this server takes ({MAX_BODY >> 20} MiB)",
                               code="request_too_large")
            data += self._take(size)
            self._take(1024, line=True)

    # ---- routes ---------------------------------------------------------------------------------------------
    def _path(self) -> str:
        try:
            return urlsplit(self.path).path
        except ValueError:      # an absolute-form target with a bad host ("http://[::1/x"): was a 500 and a traceback
            self.close_connection = True
            raise ApiError(400, f"malformed request target {self.path[:100]!r}") from None

    def _route(self) -> str:
        path = self._path().rstrip("/") or "/"
        return path[3:] if path.startswith("/v1/") else path     # /v1/models and /models alike (base_url either way)

    def do_GET(self):
        self._serve(self._get)

    def do_HEAD(self):
        # curl -I, load balancers' and uptime checks: GET's answer without its body (was a 501)
        self._serve(self._get)

    def do_OPTIONS(self):
        """A browser's CORS preflight before its POST with Content-Type: application/json (was a 501, so a web
        frontend on another origin could not call the server at all)."""
        asked = self.headers.get("Access-Control-Request-Headers") or ""
        # the headers the page asked for (Authorization is never covered by "*"), as tokens only: nothing else of
        # the request is written back into a header
        allowed = ", ".join(re.findall(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", asked)) or "Authorization, Content-Type"
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() not in ("", "0"):
            self.close_connection = True        # a body is not read here: it must not be taken for a request
        self.send_response(204)
        self.send_header("Allow", "GET, HEAD, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", allowed)
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        self._done(204)          # logged before its reply goes out, as _json's
        self.end_headers()

    def do_POST(self):
        self._serve(self._post)

    def do_PUT(self):
        # PUT, PATCH, DELETE: a 405 (a route's) or a 404, not http.server's 501 "Unsupported method" for them
        self._serve(self._other)

    do_PATCH = do_DELETE = do_PUT

    def _other(self, route: str):
        if route in ("/chat/completions", "/completions", "/responses", "/messages", "/messages/count_tokens",
                     "/tokenize", "/detokenize"):
            raise ApiError(405, f"{self.path} takes POST, not {self.command}", code="method_not_allowed")
        if route in ("/models", "/health", "/metrics") or route.startswith("/models/"):
            raise ApiError(405, f"{self.path} takes GET, not {self.command}", code="method_not_allowed")
        raise ApiError(404, f"unknown path {self._path()!r}: this server answers GET /v1/models, GET /health, GET "
                       f"/metrics, POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, POST "
                       f"/v1/messages, POST /tokenize and POST /detokenize", code="not_found")

    def _get(self, route: str):
        app = self.app
        model = {"id": app.model_id, "object": "model", "created": app.created, "owned_by": "amphista-engine",
                 "max_model_len": app.engine.max_seq_len}     # vLLM's: the context a prompt + answer fit in
        if route == "/metrics":
            return self._metrics()
        if route == "/health":
            return self._json(200, {"status": "ok", "model": app.model_id, "busy": app.lock.locked()})
        if route == "/models":      # each --served-model-name, as vLLM lists them
            return self._json(200, {"object": "list", "data": [{**model, "id": n} for n in app.model_ids]})
        if route.startswith("/models/"):
            name = unquote(route[len("/models/"):])      # a client percent-encodes an id's "/" (a path --model)
            if name in app.model_ids:
                return self._json(200, {**model, "id": name})
            raise ApiError(404, f"model {name!r} is not served here; this server serves "
                           f"{', '.join(map(repr, app.model_ids))}", "model", "model_not_found")
        if route in ("/chat/completions", "/completions", "/responses", "/messages", "/messages/count_tokens",
                     "/tokenize", "/detokenize"):
            raise ApiError(405, f"{self.path} takes POST, not GET", code="method_not_allowed")
        raise ApiError(404, f"unknown path {self._path()!r}: this server answers GET /v1/models, GET "
                       f"/health, GET /metrics, POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, "
                       f"POST /v1/messages, POST /tokenize and POST /detokenize", code="not_found")

    def _post(self, route: str):
        if route in ("/tokenize", "/detokenize"):
            body = self._request = self._body()
            return self._json(200, self.app.tokenize(body) if route == "/tokenize" else self.app.detokenize(body))
        if route == "/responses":       # OpenAI's Responses API, mapped onto a chat completion (responses.py)
            from .responses import respond
            body = self._request = self._body()
            return respond(self, body)
        if route in ("/messages", "/messages/count_tokens"):     # Anthropic's Messages API (anthropic_messages.py)
            from .anthropic_messages import count_tokens, messages
            body = self._request = self._body()
            return messages(self, body) if route == "/messages" else self._json(200, count_tokens(self.app, body))
        if route not in ("/chat/completions", "/completions"):
            if route in ("/models", "/health", "/metrics") or route.startswith("/models/"):
                raise ApiError(405, f"{self.path} takes GET, not POST", code="method_not_allowed")
            raise ApiError(404, f"unknown path {self._path()!r}: this server answers POST "
                           f"/v1/chat/completions, POST /v1/completions, POST /v1/responses, POST /v1/messages, POST "
                           f"/tokenize and POST /detokenize (and GET /v1/models, GET /health, GET /metrics)",
                           code="not_found")
        body = self._request = self._body()
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
        chat = route == "/chat/completions"
        warning = ignored_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
        if warning is not None:     # answered all the same (vLLM's too): not held to --quiet, which is per reply
            self.app.log(f"{self.address_string()} - \"{self.command} {self.path[:200]}\" {warning} | request_id: "
                         f"{self.request_id}")
        _unsupported(body, CHAT_ONLY if chat else COMPLETION_ONLY)
        _hints(body)
        plan = self.app.tool_plan(body) if chat else None
        prompts = [self.app.chat_messages(body, plan)] if chat else self.app.check_prompts(_prompts(body))
        self._complete(body, prompts, chat, plan)

    def _serve(self, route_fn):
        self._started = False          # whether a reply's headers went out (an error then cannot be a status)
        self._body_read = self.command not in ("POST", "PUT", "PATCH", "DELETE")   # the others' bodies: none
        self._request = None           # the parsed body, once read
        self._counted = False          # this request's reply is not in /metrics yet (_count)
        self._probed = False           # whether a 100 Continue went out to tell a half-close from a close
        self._body_deadline = None     # BODY_TIMEOUT_S from the body's first read (_take)
        try:
            route = self._route()
            self._check_key(route)      # before the body is read: an unauthenticated client costs no parsing
            route_fn(route)
        except ApiError as e:
            self._fail(e)
        except AmphistaError as e:
            body = getattr(self, "_request", None) or {}
            self._fail(_engine_error(e, "prompt" if self._route() == "/completions" else "messages",
                                     body.get("tree") is not None, _constraint_field(body)))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True        # the client went away: nothing to answer
            if not getattr(self, "_logged", False):
                # gone before its reply was counted (a stream whose client reset the connection as its headers
                # went out): it was neither in /metrics nor in the log, as if never sent
                self._done(499, " (client closed the connection or timed out)")
        except Exception as e:                  # noqa: BLE001 -- a bug: reported, and the server goes on
            print(f"amphista serve: internal error on {self.command} {self.path} (request_id: {self.request_id}):",
                  file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            self._fail(ApiError(500, f"internal server error ({type(e).__name__}: {str(e)[:200]}); the server's "
                                f"log has the details", kind="server_error", code="internal_error"))

    def _check_key(self, route: str):
        """401 unless the request carries the server's API key (or needs none: /health, /metrics). HEAD takes
        GET's route here too; OPTIONS (a CORS preflight, which browsers send without credentials) answers no
        route's content."""
        app = self.app
        if not app.requires_key or (route in OPEN_ROUTES and not self._path().startswith("/v1/")):
            return
        header = self.headers.get("Authorization")
        key = self.headers.get("x-api-key")     # how Anthropic's clients send it (/v1/messages), taken on every route
        if not app.key_matches(header) and not (key is not None and app.key_matches(f"Bearer {key}")):
            # the key sent is never written back (a reply or log line could hand a near-miss to someone else)
            raise ApiError(401, "this server requires an API key: send it as the header 'Authorization: Bearer "
                           "<key>' (or 'x-api-key: <key>')" if not header and key is None else "invalid API key: the "
                           + ("Authorization header's Bearer token" if header else "x-api-key header") +
                           " is not this server's key", code="invalid_api_key")

    def _fail(self, e: ApiError):
        with contextlib.suppress(ApiError):     # (a malformed request target: no route)
            route = self._route()
            if route == "/messages" or route.startswith("/messages/"):      # Anthropic's error shape
                from .anthropic_messages import fail
                return fail(self, e)
        try:
            if self._started:      # mid-stream: an SSE error event (OpenAI's clients raise it), then the end
                self.close_connection = True
                # logged before its error event, on which the openai SDK raises and stops reading (_stream)
                self._done(e.status, f" (mid-stream: {e.message[:120]})")
                self._event(e.body())
                # then [DONE], as vLLM ends every stream: clients that read up to it (not to the socket's close)
                # would otherwise wait
                self._event("[DONE]")
            else:
                self._json(e.status, e.body())
        except OSError:
            self.close_connection = True

    # ---- completions ----------------------------------------------------------------------------------------
    def _complete(self, body: dict, prompts: list, chat: bool, plan: ToolPlan | None = None):
        """plan: a chat request's tools (tools.py): its answers are read for tool calls where plan.parse."""
        app = self.app
        stream = bool(body.get("stream"))
        if stream and len(prompts) > 1:
            raise ApiError(400, f"stream takes one prompt, got {len(prompts)}: send one streamed request per prompt, "
                           f"or these without stream", "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, f"stream_options must be an object ({{\"include_usage\": true}}), got "
                           f"{_json_type(options)}", "stream_options")
        usage = (options or {}).get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise ApiError(400, f"stream_options.include_usage must be true or false, got {_json_type(usage)}",
                           "stream_options.include_usage")
        include_usage = stream and usage is True
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if stream else "chat.completion", "created": created,
                "model": app.model_id, "system_fingerprint": None}
        if not chat:
            head["object"] = "text_completion"
        jobs = app.submit_all(body, prompts, chat, stream, plan)     # a bad request is a 400 here, before it waits
        job, results = jobs[0], []

        def note_of(results: list) -> str:
            result = results[-1][-1]            # the log line's and the "amphista" key's: the last choice
            note = f" | {app.method(result) or 'plain'} | {result.stats.summary()} | finish: {result.finish_reason}"
            if len(results) > 1:
                note += f" | {len(results)} prompts"
            if job.n > 1:
                note += f" | n={job.n}"
            if job.rows > 1:
                note += f" | batch of {job.rows}"
            return note

        def ending(choices: list):
            # A stream is counted and logged before its last event ([DONE]): a client that stops reading there
            # (the openai SDK does) and then reads the log or /metrics found it not there yet. An answer of tool
            # calls counts as "tool_calls", as its finish_reason says (_stream); its e2e latency ends here.
            app.metrics.answered(choices, [self._tool_finish.get(c) for c in range(len(choices))],
                                 request_latency(jobs, [choices], time.perf_counter()))
            self._done(200, note_of([choices]))

        try:
            for one in jobs:        # several prompts: n choices each, in order
                results.append(self._stream(one, head, chat, include_usage, plan, ending) if stream else
                               self._drain(one))
                if results[-1] is None:
                    break
        finally:
            # Nobody reads its rows any more (answered, or its client left): the scheduler drops the rows' output,
            # and ends the run once no request of it is left.
            for one in jobs:
                one.gone.set()
        if stream and getattr(self, "_logged", False):
            return          # its line written before its last event (ending), even where that event found no client
        if results[-1] is None:
            self.close_connection = True
            # alone, its run was closed; in a batch, the others' rows go on and its own output is dropped
            rows = "its row" if job.n == 1 else f"its {job.n} rows"
            self._done(499, " (client closed the connection; decoding stopped)" if job.rows == job.n else
                       " (client closed the connection while its request waited; it was not decoded)" if not job.rows
                       else f" (client closed the connection; {rows} of a batch of {job.rows} dropped)")
            return
        result = results[-1][-1]            # the "amphista" key's: the last choice
        everyone = [r for rs in results for r in rs]
        note = note_of(results)
        choices, reasons = [], []
        for i, (one, rs) in enumerate(zip(jobs, results)):
            plp = None if chat else app.prompt_logprobs(one)    # each prompt's own, alike for its n choices
            for c, r in enumerate(rs):      # OpenAI's order: prompt-major, index = prompt * n + choice
                finish = FINISH.get(r.finish_reason, r.finish_reason)
                if chat:
                    text, thought = r.text, None
                    if (splitter := app.reasoning_splitter(one, plan)) is not None:
                        # its reasoning apart (read as its stream is); tool calls are read in its content only
                        splitter.end(r.text)
                        text, thought = splitter.content, splitter.reasoning or None
                    message = {"role": "assistant", "content": r.text if splitter is None else text or None}
                    if plan is not None and (plan.parse or plan.shows):      # each choice read on its own
                        # with stops, as the stream's ToolCallFilter(whole=...) reads the answer (_stream)
                        content, calls, whole = plan.answer(text, bool(one.options.get("stop") or
                                                                       one.options.get("stop_token_ids")))
                        message["content"] = content
                        if calls:
                            message = {"role": "assistant", "content": content,
                                       "tool_calls": openai_tool_calls(calls, plan.fmt)}
                            # cut by max_tokens: "length" (as OpenAI), or a client took the calls before the cut
                            # for the whole answer (a parallel call after them lost with no word of it). Not whole
                            # (its stream sent a call by name that broke or was cut, after these, or a Llama 3 or
                            # Mistral answer broke after them): the run's finish, as the stream's, which cannot
                            # claim that call whole (ToolCallFilter.end)
                            finish = "length" if finish == "length" else "tool_calls" if whole else finish
                    if app.reasoning_parser is not None:        # vLLM's field, null where there is none
                        message["reasoning_content"] = thought
                    reasons.append("tool_calls" if finish == "tool_calls" else None)
                    choices.append({"index": i * one.n + c, "message": message,
                                    "logprobs": app.logprobs(r, one), "finish_reason": finish,
                                    "stop_reason": r.stop_reason})
                else:
                    reasons.append(None)
                    choices.append({"index": i * one.n + c,
                                    "text": (app.prompt_text(one) if one.options.get("echo") else "") + r.text,
                                    "logprobs": app.completion_logprobs(one, r), "finish_reason": finish,
                                    "stop_reason": r.stop_reason})
                    if plp is not None:         # vLLM's, on each choice of a completion
                        choices[-1]["prompt_logprobs"] = plp
        extra = app.extra(result)
        if len(everyone) > 1:               # each choice's own stats too, in the choices' order (the last's above)
            extra["choices"] = [app.extra(r) for r in everyone]
        reply = {**head, "choices": choices, "usage": app.usage_of(results, app.predicted_ids(job)),
                 "amphista": extra}
        if chat and (plp := app.prompt_logprobs(job)) is not None:
            reply["prompt_logprobs"] = plp      # vLLM's, on a chat completion's top level (its one prompt)
        # before the reply goes out (a client that scrapes once it has its answer sees it); tool calls as
        # "tool_calls"; its e2e latency ends with its reply built
        app.metrics.answered(everyone, reasons, request_latency(jobs, results, time.perf_counter()))
        self._json(200, reply, note)

    def _next_event(self, job):
        """What the scheduler sends next for this request, ("start", None), ("delta", (choice, text)) or ("end",
        (choice, result)); an error it sends is raised here. None where the client left while it waited."""
        while True:
            try:
                kind, value = job.events.get(timeout=WAIT_POLL_S)
            except queue.Empty:
                if self._client_gone():     # a client that gives up while its request waits or decodes
                    return None
                continue
            if kind == "error":
                raise value
            return kind, value

    def _drain(self, job):
        """The run's results, one per choice, or None where the client left before they all came."""
        results: list = [None] * job.n
        while any(r is None for r in results):
            event = self._next_event(job)
            if event is None:
                return None
            kind, value = event
            if kind == "end":
                # a run again after an error mid-run sends its rows' results again: the later one is as good
                results[value[0]] = value[1]
                continue
            if self._client_gone():
                return None
        return results

    def _event(self, obj):
        payload = obj if isinstance(obj, str) else _json_bytes(obj).decode("utf-8")
        # U+2028, U+2029 and U+0085 are line breaks to str.splitlines, which httpx's iter_lines (httpx-sse, and the
        # clients built on it) splits SSE on: raw in a delta, they cut the data line in two and the client's JSON
        # parse failed. Escaped, the JSON decodes to the same text (they only occur inside its strings).
        payload = payload.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
        self.wfile.write(f"data: {payload}\n\n".encode("utf-8"))

    def _start_events(self):
        """A Server-Sent Events reply's status and headers (200): after them, an error can only be an event."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")       # the stream's end is the connection's (no Content-Length)
        self.end_headers()
        self.close_connection = True
        self._started = True

    def _stream(self, job, head: dict, chat: bool, include_usage: bool, plan: ToolPlan | None = None, ending=None):
        """Sends the run as Server-Sent Events, each chunk's choice with its index (n choices: their chunks
        interleaved as their rows decode, each ended by its own finish chunk); the results (one per choice), or
        None where the client left. ending(results): called before the last event ([DONE]) goes out."""
        app = self.app
        # The headers wait for the run to start: a request the engine refuses is still answered with a status
        event = self._next_event(job)
        if event is None:
            return None

        def chunk(index: int, delta: str | None = None, finish=None, role: bool = False, logprobs=None,
                  tool_calls=None, reasoning=None, stop_reason=None, **more):
            if chat:
                d = {"role": "assistant", "content": ""} if role else {} if delta is None else {"content": delta}
                if tool_calls is not None:
                    d = {"tool_calls": tool_calls}
                if reasoning is not None:
                    d = {"reasoning_content": reasoning}
                choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:      # vLLM's, with the finish: the stop string or stop token id that ended it
                choice["stop_reason"] = stop_reason
            out = {**head, "choices": [choice], **more}
            if include_usage:
                out["usage"] = None
            return out

        self._start_events()
        results: list = [None] * job.n
        self._tool_finish: dict = {}
        # a choice's text from its first <tool_call> on is held back: its calls go out as they decode (hermes) or
        # at its end (ToolCallFilter.stream, .end)
        # a request with stops: calls go out whole (ToolCallFilter: a stop that cuts one leaves it content, both
        # ways)
        stops = bool(job.options.get("stop") or job.options.get("stop_token_ids"))
        # "required" or a named function: no content, as the non-streamed reply (ToolPlan.read)
        filters = [ToolCallFilter(plan.parallel, plan.fmt, v11=plan.v11, hidden=plan.hidden, parse=plan.parse,
                                  whole=stops, calls_only=plan.calls_only) for _ in range(job.n)] \
            if chat and plan is not None and (plan.parse or plan.shows) else None
        # --reasoning-parser: each choice's <think> text goes out as reasoning_content, the rest (read for tool calls
        # alone) as content
        splitters = [app.reasoning_splitter(job, plan) for _ in range(job.n)] if chat else None
        try:
            for c in range(job.n):        # each choice opens as OpenAI's do: its role (chat), its echo (completions)
                if chat:
                    self._event(chunk(c, role=True))
                elif job.options.get("echo"):
                    self._event(chunk(c, app.prompt_text(job)))
            while True:
                kind, value = event
                if kind == "end":
                    c, result = value
                    if results[c] is None:
                        results[c] = result
                        finish = FINISH.get(result.finish_reason, result.finish_reason)
                        answer = result.text
                        if splitters is not None and splitters[c] is not None:
                            # what it held back (a tag's beginning; cut before </think>: reasoning), and the
                            # content whole for the tool calls' reading
                            thought, rest = splitters[c].end(result.text)
                            if thought:
                                self._event(chunk(c, reasoning=thought))
                            if rest and filters is None:
                                self._event(chunk(c, rest))
                            answer = splitters[c].content
                        if filters is not None:
                            # the whole answer read as _complete reads it: the calls' arguments not sent yet, the
                            # calls that could not stream, the content held back
                            rest, deltas, whole = filters[c].end(answer)
                            if rest:
                                self._event(chunk(c, rest))
                            for d in deltas:
                                self._event(chunk(c, tool_calls=[d]))
                            # cut by max_tokens: said so (_complete); a call that went out but is not the reply's
                            # (cut, or JSON that broke after its name) is never claimed whole
                            if whole and filters[c].calls_sent and finish != "length":
                                finish = "tool_calls"
                                self._tool_finish[c] = finish       # /metrics counts it so (_complete)
                        # a delta's text is not a whole number of tokens (text is held back around stops and split
                        # characters): the answer's token logprobs come together, with the choice's final chunk,
                        # where a client concatenates them
                        self._event(chunk(c, None, finish, logprobs=app.logprobs(result, job) if chat else
                                          app.completion_logprobs(job, result), stop_reason=result.stop_reason,
                                          amphista=app.extra(result)))
                    if all(r is not None for r in results):
                        break
                elif self._client_gone():
                    return None
                elif kind == "delta" and value[1]:
                    text = value[1]
                    if splitters is not None and splitters[value[0]] is not None:
                        thought, text = splitters[value[0]].feed(text)
                        if thought:
                            self._event(chunk(value[0], reasoning=thought))
                    text, deltas = (text, ()) if filters is None or not text else filters[value[0]].stream(text)
                    if text:
                        self._event(chunk(value[0], text))
                    for d in deltas:        # a call's name, then its arguments as they decode (tools.py)
                        self._event(chunk(value[0], tool_calls=[d]))
                event = self._next_event(job)
                if event is None:
                    return None
            if include_usage:
                self._event({**head, "choices": [], "usage": app.usage_of([results], app.predicted_ids(job))})
            if ending is not None:
                ending(results)
            self._event("[DONE]")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            return None
        return results


class AmphistaHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server whose handlers serve `app` (set once the model is loaded: the port is bound first,
    so that a port in use is named before seconds of loading)."""
    daemon_threads = True              # Ctrl-C does not wait for a client that keeps its connection open
    # The listen backlog (socketserver's default: 5). `amphista serve` binds before loading the model so that
    # clients wait in this queue meanwhile; with 5, the 7th client's connect() stalled in SYN retries (1 s, 3 s,
    # 7 s, ...: still waiting long after the model was up), and so did bursts of clients once serving.
    request_queue_size = 128
    app: OpenAIApp | None = None

    def server_close(self):
        super().server_close()
        if self.app is not None:
            self.app.close()        # its scheduler thread ends; requests still waiting are answered

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"


def bind(host: str = "127.0.0.1", port: int = 8000) -> AmphistaHTTPServer:
    """A server listening on host:port (port 0: a free one; see .url), its app not yet set."""
    refuse_huge_ints({"port": port})        # the message below quotes it: 10**5000 raised Python's ValueError
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InputError(f"port must be an integer in [0, 65535] (0: any free port), got {port!r}")

    class Server(AmphistaHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        return Server((host, port), _Handler)
    except OSError as e:
        hint = (": another server listens there; pick another --port (0: any free one)"
                if getattr(e, "errno", None) in (98, 48, 10048) else "")
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, **app_options) -> AmphistaHTTPServer:
    """An HTTP server serving `engine` on host:port (OpenAIApp's options: model_id, speculative, tree, defaults,
    quiet, max_batch). Run it with .serve_forever() (in a thread: .shutdown() stops it; .server_close() frees the
    port and ends its scheduler thread)."""
    httpd = bind(host, port)
    httpd.app = OpenAIApp(engine, **app_options)
    return httpd

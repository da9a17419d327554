"""Anthropic's Messages API, POST /v1/messages and POST /v1/messages/count_tokens, as vLLM serves it
(vllm/entrypoints/anthropic): a request is mapped onto the chat-completions machinery (server.py), as /v1/responses
maps its own (responses.py, whose answer reading and stream this module reuses), and its answer written back as a
Message object, or streamed as Anthropic's named Server-Sent Events. Errors are Anthropic's
{"type": "error", "error": {"type", "message"}} (server._Handler._fail writes them on these routes), on which the
anthropic SDK raises its typed exceptions.

Server tools, images and documents, containers, MCP servers and output_config are refused by name; extended
thinking is served only where the server reads reasoning (--reasoning-parser). Hints that change no answer (a service
tier, cache_control, an inference region, diagnostics, account attribution: HINTS) are taken and ignored.
"""
from __future__ import annotations

import json
import re

from ..engine import check_truncate_prompt_tokens
from ..errors import AmphistaError
from ..structured import _lone_surrogate
from .responses import EXTRAS as CHAT_EXTRAS, Reply, Stream, answer, check_names, naming
from .server import ApiError, _constraint_field, _engine_error, _json_type, _text

ROUTES = ("/messages", "/messages/count_tokens")
# The Messages API's fields served (mapped onto a chat completion), and those taken as hints and ignored: a service
# tier, a prompt-caching breakpoint (cache_control: this server caches by --cache-prompt, not by marker) and an
# inference region change nothing an answer holds. diagnostics asks for a prompt-cache miss reason, which this server
# does not diagnose: the answer has none (the SDK's Message reads diagnostics as None), as where it was not asked.
SERVED = ("model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k", "stream",
          "tools", "tool_choice", "metadata", "thinking")
# Account attribution, of which a local server has none: the anthropic SDK sends these as its
# anthropic-user-profile-id and anthropic-workspace-id headers (unread here); a body carrying them is taken alike
ACCOUNT = ("user_profile_id", "workspace_id")
HINTS = ("service_tier", "cache_control", "inference_geo", "diagnostics", *ACCOUNT)
# The chat route's non-OpenAI fields, as /v1/chat/completions takes them (responses.EXTRAS); its "stop" is
# stop_sequences here
EXTRAS = tuple(name for name in CHAT_EXTRAS if name not in SERVED and name != "stop")
# What count_tokens reads (the anthropic SDK's messages.count_tokens sends these, and no sampling field: Anthropic's
# API refuses max_tokens, temperature and the like there), and the chat route's fields that shape the prompt; the
# IDLE fields are taken there as on /v1/messages (refused where they ask for something)
COUNTED = ("model", "messages", "system", "tools", "tool_choice", "thinking", "cache_control",
           "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "truncate_prompt_tokens",
           *ACCOUNT)
# Messages fields this server does not implement: refused where they ask for something.
# name -> (the values that ask for nothing, what to say)
IDLE = {
    "container": ((None,), "containers (the code execution tool's) are not supported: this server runs no tools of "
                  "its own"),
    "mcp_servers": ((None, []), "mcp_servers is not supported: this server connects to no MCP server (send the "
                    "tools as client tools, and run them yourself)"),
    "context_management": ((None,), "context_management is not supported: send the conversation as it should be "
                           "read"),
    "output_config": ((None, {}), "output_config (effort, an output format) is not supported: for a JSON answer send "
                      "structured_outputs or guided_json (the chat route's fields)"),
    "output_format": ((None,), "output_format is not supported: for a JSON answer send structured_outputs or "
                      "guided_json (the chat route's fields)"),
}
# another API's field sent here: what the Messages API calls it
OTHER_NAMES = {
    "max_completion_tokens": "send max_tokens", "max_output_tokens": "send max_tokens",
    "stop": "send stop_sequences (a list of strings)",
    "n": "a message has one answer (/v1/chat/completions serves n)",
    "logprobs": "/v1/chat/completions serves logprobs", "top_logprobs": "/v1/chat/completions serves logprobs",
    "response_format": "send structured_outputs or guided_json (the chat route's fields)",
    "parallel_tool_calls": "send tool_choice: {\"type\": \"auto\", \"disable_parallel_tool_use\": true}",
    "user": "send metadata: {\"user_id\": ...}",
    "input": "send messages", "instructions": "send system",
}
# content blocks of Anthropic's this text-only server cannot read, or whose tools it does not run
NOT_TEXT = ("image", "document", "search_result", "container_upload")
SERVER_BLOCKS = ("server_tool_use", "web_search_tool_result", "web_fetch_tool_result", "code_execution_tool_result",
                 "bash_code_execution_tool_result", "text_editor_code_execution_tool_result", "tool_search_tool_result",
                 "mcp_tool_use", "mcp_tool_result")
THINKING = ("enabled", "adaptive")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 529: "overloaded_error"}
# Errors the chat machinery raises in its own field names, said in the Messages API's
_RENAMES = ((re.compile(r"\b(tools\[\d+\])\.function\.parameters\b"), r"\1.input_schema"),
            (re.compile(r"\b(tools\[\d+\])\.function\."), r"\1."),
            (re.compile(r"tool_choice 'required'"), "tool_choice {\"type\": \"any\"}"),
            (re.compile(r"tool_choice names the function"), "tool_choice names the tool"),
            (re.compile(r"^stop string (\d+)"), r"stop_sequences[\1]"),
            (re.compile(r"^stop(?: strings)?\b"), "stop_sequences"))
_PARAMS = {"stop": "stop_sequences", "parallel_tool_calls": "tool_choice"}


def error_body(e: ApiError) -> dict:
    """An error as Anthropic's API writes it (its type by status, as the SDK reads it)."""
    kind = ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def fail(handler, e: ApiError):
    """server._Handler._fail on these routes: the error in Anthropic's shape, or once a stream began, its error
    event (which the SDK raises), then the stream's end."""
    try:
        if handler._started:
            handler.close_connection = True
            # logged before the error event, the stream's last (server._Handler._stream)
            handler._done(e.status, f" (mid-stream: {e.message[:120]})")
            handler.wfile.write(b"event: error\n")
            handler._event(error_body(e))
        else:
            handler._json(e.status, error_body(e))
    except OSError:
        handler.close_connection = True


def _renamed(e: ApiError) -> ApiError:
    message = e.message
    for pattern, name in _RENAMES:
        message = pattern.sub(name, message)
    return ApiError(e.status, message, _PARAMS.get(e.param, e.param), e.code, e.kind)


def _api_error(e: AmphistaError, chat: dict) -> ApiError:
    return _renamed(_engine_error(e, "messages", chat.get("tree") is not None, _constraint_field(chat)))


def _named(chat: dict):
    """The chat machinery's errors within, in the Messages API's field names."""
    return naming(chat, _renamed, _api_error)


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


# ---- the request ----------------------------------------------------------------------------------------------

def _check_fields(body: dict, counting: bool):
    check_names(body, "/v1/messages", SERVED + HINTS + EXTRAS, IDLE, OTHER_NAMES,
                f"Anthropic's Messages fields, and {', '.join(EXTRAS[:4])}")
    value = body.get("max_tokens")
    if value is None and not counting:
        raise _bad("'max_tokens' is a required field: the most tokens the answer may have (a positive integer)",
                   "max_tokens")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _bad(f"max_tokens must be a positive integer, got {_json_type(value)}", "max_tokens")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise _bad(f"stream must be true or false, got {_json_type(body['stream'])}", "stream")
    for name in ("model", "service_tier", "inference_geo", *ACCOUNT):
        if body.get(name) is not None:
            _text(body[name], name)
    diagnostics = body.get("diagnostics")
    if diagnostics is not None and not isinstance(diagnostics, dict):
        raise _bad(f"diagnostics must be an object ({{\"previous_message_id\": a string or null}}), got "
                   f"{_json_type(diagnostics)}", "diagnostics")
    # its one key, as metadata's: another (a typo) would be taken silently
    for key in diagnostics or ():
        if key != "previous_message_id":
            raise _bad(f"diagnostics has no key {json.dumps(key)[:60]} (its one key: previous_message_id)",
                       "diagnostics")
    # a hint, but Anthropic's shape: a malformed one (a string, a typo'd ttl) is no breakpoint Anthropic would take
    cache = body.get("cache_control")
    if cache is not None and not (isinstance(cache, dict) and cache.get("type") == "ephemeral" and
                                  set(cache) <= {"type", "ttl"} and cache.get("ttl", "5m") in ("5m", "1h")):
        raise _bad(f"cache_control must be {{\"type\": \"ephemeral\"}}, with an optional \"ttl\": \"5m\" or "
                   f"\"1h\", got {_json_type(cache)}", "cache_control")
    if (diagnostics or {}).get("previous_message_id") is not None:
        _text(diagnostics["previous_message_id"], "diagnostics.previous_message_id")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and
                                     isinstance(metadata.get("user_id"), (str, type(None)))):
        raise _bad(f"metadata must be an object ({{\"user_id\": a string or null}}), got {_json_type(metadata)}",
                   "metadata")
    # Anthropic's metadata holds user_id only: another key (a typo, OpenAI's free-form metadata) was taken silently
    for key in metadata or ():
        if key != "user_id":
            raise _bad(f"metadata has no key {json.dumps(key)[:60]} (its one key: user_id)", "metadata")
    if (metadata or {}).get("user_id") is not None:
        _text(metadata["user_id"], "metadata.user_id")
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list):
            raise _bad(f"stop_sequences must be a list of strings, got {_json_type(stops)}", "stop_sequences")
        for i, s in enumerate(stops):
            _text(s, f"stop_sequences[{i}]")


def _text_blocks(content, where: str) -> str:
    """A string, or a list of text blocks (joined by newlines, as the chat route joins its text parts)."""
    if isinstance(content, str):
        return _text(content, where)
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of text blocks, got {_json_type(content)}", where)
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise _bad(f"{where}[{j}] must be a text block ({{\"type\": \"text\", \"text\": ...}})" + (
                f": {kind!r} blocks are not supported by this text-only model" if kind in NOT_TEXT else
                f", got {_json_type(block)}"), f"{where}[{j}]")
        texts.append(_text(block.get("text"), f"{where}[{j}].text"))
    return "\n".join(texts)


def _tool_result(block: dict, where: str) -> dict:
    """A tool_result block as the chat route's tool message; an error result is said to be one in its text (a chat
    tool message has no flag for it)."""
    call_id = _text(block.get("tool_use_id"), f"{where}.tool_use_id")
    content = block.get("content")
    text = "" if content is None else _text_blocks(content, f"{where}.content")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise _bad(f"{where}.is_error must be true or false, got {_json_type(is_error)}", f"{where}.is_error")
    return {"role": "tool", "tool_call_id": _chat_id(call_id), "content": f"Error: {text}" if is_error else text}


def _tool_use(block: dict, where: str) -> dict:
    """A tool_use block sent back as the chat route's assistant tool call."""
    call_id = _text(block.get("id"), f"{where}.id")
    name = _text(block.get("name"), f"{where}.name")
    args = block.get("input")
    if not isinstance(args, dict):
        raise _bad(f"{where}.input must be an object (the tool's arguments), got {_json_type(args)}",
                   f"{where}.input")
    if (at := _lone_surrogate(args)) is not None:
        # the template writes the arguments into the prompt, where the tokenizer refused them naming no field
        raise _bad(f"{where}.input{at} is not valid Unicode (a lone surrogate escape such as \\ud800)",
                   f"{where}.input")
    return {"id": _chat_id(call_id), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _messages(body: dict) -> list[dict]:
    """The chat messages of a request's system and messages: a user turn's tool_result blocks as tool messages (its
    text before and after them as user messages), an assistant turn's tool_use blocks as its tool_calls and its
    thinking blocks as its reasoning_content."""
    out = []
    if body.get("system") is not None:
        out.append({"role": "system", "content": _text_blocks(body["system"], "system")})
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is a required field: a list of {\"role\": \"user\" | \"assistant\", \"content\": ...}",
                   "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad(f"messages must be a non-empty list of messages, got {_json_type(messages)}", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content', got {_json_type(m)}", where)
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise _bad(f"{where}.role must be 'user' or 'assistant', got {json.dumps(role)[:60]}" + (
                " (send the system prompt as the top-level system field)" if role == "system" else ""),
                f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": _text(content, f"{where}.content")})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or a list of content blocks, got {_json_type(content)}",
                       f"{where}.content")
        texts, calls, thoughts, results = [], [], [], 0
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(_text(block.get("text"), f"{at}.text"))
            elif kind == "tool_result" and role == "user":
                if texts:       # text before a result: a user turn of its own, in the order sent
                    out.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                out.append(_tool_result(block, at))
                results += 1
            elif kind == "tool_use" and role == "assistant":
                calls.append(_tool_use(block, at))
            elif kind == "thinking" and role == "assistant":
                thoughts.append(_text(block.get("thinking"), f"{at}.thinking"))
                if block.get("signature") is not None:      # opaque, and unread, but a string as Anthropic's
                    _text(block["signature"], f"{at}.signature")
            elif kind == "redacted_thinking" and role == "assistant":
                # opaque (Anthropic's encrypted reasoning): nothing a template can read, but a string
                _text(block.get("data"), f"{at}.data")
            elif kind in ("tool_result", "tool_use", "thinking", "redacted_thinking"):
                raise _bad(f"{at}: {kind} blocks belong in {'a user' if kind == 'tool_result' else 'an assistant'} "
                           f"message, not a {role} one", f"{at}.type")
            elif kind in NOT_TEXT:
                raise _bad(f"{at}: {kind!r} blocks are not supported by this text-only model", f"{at}.type")
            elif kind in SERVER_BLOCKS:
                raise _bad(f"{at}: {kind!r} blocks are not supported: this server runs no tools of its own",
                           f"{at}.type")
            else:
                raise _bad(f"{at}.type must be 'text', 'tool_use', 'tool_result' or 'thinking', got "
                           f"{json.dumps(kind)[:60]}", f"{at}.type")
        if role == "user":
            if texts or not results:
                out.append({"role": "user", "content": "\n".join(texts)})
            continue
        one = {"role": "assistant", "content": "\n".join(texts)}
        if calls:
            one["tool_calls"] = calls
        if thoughts:
            one["reasoning_content"] = "\n".join(thoughts)
        out.append(one)
    return out


def _tools(tools) -> list | None:
    """Client tools in the chat route's shape (tools.check_tools checks their names and schemas)."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise _bad(f"tools must be a list of {{\"name\": ..., \"description\": ..., \"input_schema\": ...}} objects, "
                   f"got {_json_type(tools)}", "tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"{where} must be {{\"name\": ..., \"input_schema\": ...}}, got {_json_type(tool)}", "tools")
        if "function" in tool or "parameters" in tool:
            raise _bad(f"{where} is in OpenAI's shape: the Messages API takes {{\"name\": ..., \"description\": ..., "
                       f"\"input_schema\": ...}}", "tools")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _bad(f"{where}: type {json.dumps(kind)[:60]} is not supported: this server runs no tools of its "
                       f"own (Anthropic's server tools); send client tools, {{\"name\": ..., \"input_schema\": ...}}",
                       "tools")
        if not isinstance(tool.get("input_schema"), dict):
            raise _bad(f"{where}.input_schema must be the tool's JSON schema object, got "
                       f"{_json_type(tool.get('input_schema'))}", "tools")
        # in OpenAI's order (name, description, parameters): a template without tools prints them as JSON
        f = {"name": tool.get("name"), "description": tool.get("description"), "parameters": tool["input_schema"],
             "strict": tool.get("strict")}
        out.append({"type": "function", "function": f})
    return out


def _tool_choice(choice, chat: dict):
    """tool_choice in the chat route's terms (its tool_choice and parallel_tool_calls)."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    mapped = {"auto": "auto", "any": "required", "none": "none"}
    if kind not in (*mapped, "tool"):
        raise _bad(f"tool_choice must be {{\"type\": \"auto\" | \"any\" | \"none\"}} or {{\"type\": \"tool\", "
                   f"\"name\": ...}}, got {_json_type(choice)}", "tool_choice")
    if kind == "tool":
        chat["tool_choice"] = {"type": "function", "function": {"name": _text(choice.get("name"), "tool_choice.name")}}
    else:
        chat["tool_choice"] = mapped[kind]
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad(f"tool_choice.disable_parallel_tool_use must be true or false, got {_json_type(parallel)}",
                   "tool_choice")
    if parallel:
        chat["parallel_tool_calls"] = False


def _thinking(app, thinking, chat: dict):
    """Extended thinking: served where the server reads reasoning (--reasoning-parser), whose text is then thinking
    blocks; "disabled" turns a thinking template's reasoning off (enable_thinking, as Qwen3's reads it)."""
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("disabled", *THINKING):
        raise _bad(f"thinking must be {{\"type\": \"enabled\", \"budget_tokens\": N}}, {{\"type\": \"adaptive\"}} or "
                   f"{{\"type\": \"disabled\"}}, got {_json_type(thinking)}", "thinking")
    budget = thinking.get("budget_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise _bad(f"thinking.budget_tokens must be a positive integer, got {_json_type(budget)}",
                   "thinking.budget_tokens")
    if kind in THINKING and app.reasoning_parser is None:
        raise _bad(f"thinking {json.dumps(kind)}: this server does not read the model's reasoning; start it with "
                   f"--reasoning-parser (qwen3 or deepseek_r1) for thinking blocks, or send thinking {{\"type\": "
                   f"\"disabled\"}}", "thinking")
    if kind == "disabled" and app.reasoning_parser is not None:
        variables = chat.get("chat_template_kwargs")
        if variables is None or isinstance(variables, dict) and "enable_thinking" not in variables:
            chat["chat_template_kwargs"] = {**(variables or {}), "enable_thinking": False}


def chat_request(app, body, counting: bool = False) -> dict:
    """A Messages request as the chat completion it asks for (ApiError, naming the Messages field, for a bad one).
    counting: for count_tokens, which takes the prompt's fields only (COUNTED)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    _check_fields(body, counting)
    chat = {k: body[k] for k in EXTRAS if k in body}
    chat["messages"] = _messages(body)
    chat["stream"] = bool(body.get("stream")) and not counting
    if body.get("max_tokens") is not None:
        chat["max_tokens"] = body["max_tokens"]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    tools = _tools(body.get("tools"))
    if tools is not None:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    if body.get("thinking") is not None:
        _thinking(app, body["thinking"], chat)
    last = chat["messages"][-1]
    if last["role"] == "assistant" and "continue_final_message" not in chat and "add_generation_prompt" not in chat:
        if last.get("tool_calls"):
            raise _bad(f"messages[{len(body['messages']) - 1}] is an assistant turn with tool_use blocks: send their "
                       f"tool_result blocks in a user message after it", f"messages[{len(body['messages']) - 1}]")
        # Anthropic's prefill: the answer goes on from the last assistant turn's text
        chat["continue_final_message"] = True
    return chat


# ---- the reply ------------------------------------------------------------------------------------------------

def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _chat_id(tool_id: str) -> str:
    """A tool_use id as the chat route's call id: without "toolu_", which _tool_id added (Mistral's templates
    take back only their own 9-character ids)."""
    return tool_id.removeprefix("toolu_")


_CUT = object()     # a scalar the text ends inside (or that is no JSON): left out, with its key
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_TOKEN = re.compile(r"[-+0-9.eEa-zA-Z]+")
_LITERALS = {"true": True, "false": False, "null": None, "NaN": float("nan"), "Infinity": float("inf"),
             "-Infinity": float("-inf")}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def _partial(text: str, i: int) -> tuple:
    """(the JSON value at text[i:], where it ends, whether it is whole) of text that may end anywhere: an object or
    array the text ends inside holds the items before the cut, a string, number or literal it ends inside is _CUT.
    Text that is no JSON reads as cut there (the longest prefix that reads)."""
    i = _skip(text, i)
    if i == len(text):
        return _CUT, i, False
    ch = text[i]
    if ch == '"':
        m = _STRING.match(text, i)
        if m is None:
            return _CUT, i, False
        try:
            return json.loads(m.group()), m.end(), True
        except ValueError:
            return _CUT, i, False
    if ch not in "{[":
        m = _TOKEN.match(text, i)
        token = m.group() if m else ""
        if token in _LITERALS:
            return _LITERALS[token], m.end(), True
        if token and _NUMBER.fullmatch(token):
            return json.loads(token), m.end(), True
        return _CUT, i, False
    close, out = ("}", {}) if ch == "{" else ("]", [])
    i = _skip(text, i + 1)
    if text.startswith(close, i):
        return out, i + 1, True
    while True:
        if close == "}":
            key, i, whole = _partial(text, i)
            if not isinstance(key, str):
                return out, i, False
            i = _skip(text, i)
            if not text.startswith(":", i):
                return out, i, False
            value, i, whole = _partial(text, i + 1)
            if value is not _CUT:
                out[key] = value
        else:
            value, i, whole = _partial(text, i)
            if value is not _CUT:
                out.append(value)
        i = _skip(text, i)
        if not whole or i == len(text):
            return out, i, False
        if text[i] == close:
            return out, i + 1, True
        if text[i] != ",":
            return out, i, False
        i += 1


def _input(arguments: str) -> dict:
    """A tool_use block's input: its arguments, or where those of a call cut by max_tokens (or broken) end short of
    JSON, the object the anthropic SDK's stream builds of the same text (its jiter.from_json(..., partial_mode=True)):
    the members before the cut, a string, number or literal the text ends inside left out with its key. (A reader
    of our own: jiter is no dependency of the server, and the arguments streamed are always a prefix of
    json.dumps' text (tools._Canon), which a small reader reads as jiter does.)"""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        try:
            value = _partial(arguments, 0)[0]
        except RecursionError:      # (nested past Python's stack: no input read)
            value = {}
    return value if isinstance(value, dict) else {}


def _block(item: dict) -> dict:
    """A Responses output item (responses.Stream's) as the Messages API's content block."""
    parts = item.get("content") or [{}]
    if item["type"] == "reasoning":
        return {"type": "thinking", "thinking": parts[0].get("text", ""), "signature": ""}
    if item["type"] == "function_call":
        return {"type": "tool_use", "id": _tool_id(item["call_id"]), "name": item["name"],
                "input": _input(item["arguments"])}
    return {"type": "text", "text": parts[0].get("text", "")}


def _stop(reason: str | None, result) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of an answer read as the chat route reads it (reason: "tool_calls" where its
    finish_reason is)."""
    if reason == "tool_calls":
        return "tool_use", None
    if result.finish_reason == "length":
        return "max_tokens", None
    if result.finish_reason == "stop" and isinstance(result.stop_reason, str):
        return "stop_sequence", result.stop_reason
    return "end_turn", None


class _Message(Reply):
    """A Message object of an answer (what Stream asks its reply for: response(), final()). A tool_use block its
    stream began stays in it where the call was cut (stop_reason max_tokens, as Anthropic's API keeps it: the client
    retries with more max_tokens) or its JSON broke (the answer's stop_reason is then not tool_use: the block is no
    call to run), so that create() and stream() hold the same blocks at the same indexes."""
    prefix = "msg_"

    def holds(self, name: str) -> bool:
        return False        # a tool_use block goes out as it decodes, and stays where it broke or was cut

    def __init__(self, app, body: dict, job):
        super().__init__(app, body, job)
        self.prompt_tokens = None

    def response(self, status: str, output: list, results=None, thought: str | None = None, finish=None,
                 reason: str | None = None) -> dict:
        stop, sequence = (None, None) if results is None else _stop(reason, results[-1])
        out = {"id": self.id, "type": "message", "role": "assistant", "model": self.app.model_id,
               "content": [_block(item) for item in output], "stop_reason": stop, "stop_sequence": sequence,
               "usage": self.tokens(results)}
        if results is not None:
            out["amphista"] = self.app.extra(results[-1])
        return out

    def final(self, output: list, results: list, thought: str | None, finish: str, reason: str | None) -> dict:
        return self.response("completed", output, results, thought, finish, reason)

    def tokens(self, results) -> dict:
        """Anthropic's usage: input_tokens less those read from the prompt cache (cache_read_input_tokens;
        --cache-prompt), as Anthropic counts them. Before the answer (message_start, sent once the run started):
        the prompt's length, split alike (the final usage's split, which message_start said all as input_tokens)."""
        if results is None:
            if self.prompt_tokens is None:
                count = len(self.app._encode(self.job))
                # the run keeps the prompt's last N tokens (checked by now: the run started), and the final usage
                # counts those: message_start said the whole prompt's count, which a client reading it there took
                keep = self.job.options.get("truncate_prompt_tokens")
                if isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1:
                    count = min(count, keep)
                self.prompt_tokens = count
            cached = self.job.prompt_tokens_reused
            return {"input_tokens": self.prompt_tokens - cached, "output_tokens": 0, "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": cached}
        u = self.usage(results, None)
        cached = u["input_tokens_details"]["cached_tokens"]
        return {"input_tokens": u["input_tokens"] - cached, "output_tokens": u["output_tokens"],
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


# an output item's deltas as the Messages API's content_block_delta: (delta type, its text's key)
_DELTAS = {"message": ("text_delta", "text"), "reasoning": ("thinking_delta", "thinking"),
           "function_call": ("input_json_delta", "partial_json")}


class _Events(Stream):
    """A message streamed as Anthropic's events: Stream reads the answer as the chat route's stream does (reasoning,
    text, tool calls as they decode); each output item it adds is a content block (its index the item's), its
    deltas the block's, its done the block's stop. message_delta (stop_reason, usage) and message_stop end it."""

    def send(self, kind: str, **fields):
        self.h.wfile.write(f"event: {kind}\n".encode("utf-8"))
        self.h._event({"type": kind, **fields})

    def begin(self):
        self.send("message_start", message=self.reply.response("in_progress", []))

    def added(self, index: int):
        self.send("content_block_start", index=index, content_block=_block(self.items[index]))

    def delta(self, index: int, delta: str):
        name, key = _DELTAS[self.items[index]["type"]]
        self.send("content_block_delta", index=index, delta={"type": name, key: delta})

    def closed(self, index: int):
        self.send("content_block_stop", index=index)

    def completed(self, response: dict):
        self.send("message_delta", delta={"stop_reason": response["stop_reason"],
                                          "stop_sequence": response["stop_sequence"]},
                  usage=response["usage"], amphista=response.get("amphista"))
        self.ended()        # logged before message_stop, where the anthropic SDK stops reading (Stream.ended)
        self.send("message_stop")

    def fail(self, e: ApiError):
        self.send("error", error=error_body(e)["error"])


def messages(handler, body) -> None:
    """POST /v1/messages on a server handler (server._Handler): the answer as a Message object, or streamed."""
    answer(handler, body, chat_request(handler.app, body), _Message, _Events, _named)


def count_tokens(app, body) -> dict:
    """POST /v1/messages/count_tokens: the prompt's tokens as /v1/messages would prefill it (vLLM's /tokenize of
    the mapped chat request: its template, tools and thinking setting alike), nothing decoded. vLLM's
    truncate_prompt_tokens N counts as there: the prompt keeps its last N tokens, so the count is min(count, N),
    the input_tokens /v1/messages reports for the same body (a bad N is the same 400 naming it)."""
    chat = chat_request(app, body, counting=True)
    keep = ("messages", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "add_generation_prompt",
            "continue_final_message")
    with _named(chat):
        count = app.tokenize({k: chat[k] for k in keep if k in chat})["count"]
        # was refused as "not a field" here (send it to /v1/messages), whose usage counts the kept tokens
        keep_last = check_truncate_prompt_tokens(chat.get("truncate_prompt_tokens"))
    if keep_last is not None:
        count = min(count, keep_last)
    # after the checks of /v1/messages (the tools' too, which tokenize makes), so that a bad value is named as there
    # all of them named at once: a client that sends a /v1/messages body here learns what to drop in one go
    unread = [name for name in body if name not in COUNTED and name not in IDLE]
    if unread:
        names = ", ".join(map(repr, unread))
        raise _bad(f"{names} {'is not a field' if len(unread) == 1 else 'are not fields'} of /v1/messages/"
                   f"count_tokens: it counts the prompt, and takes {', '.join(COUNTED[:6])} (send "
                   f"{'it' if len(unread) == 1 else 'them'} to /v1/messages)", unread[0])
    return {"input_tokens": count}

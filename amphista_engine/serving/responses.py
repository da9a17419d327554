"""OpenAI's Responses API, POST /v1/responses, as vLLM serves it without a response store: a request is mapped onto
the chat-completions machinery (server.py: messages, sampling options, tools, structured output, usage) and its
answer written back as a Response object, or streamed as the Responses API's typed Server-Sent Events.

Nothing is stored: previous_response_id, background runs, conversations and item references are refused by name;
store=true is answered as vLLM answers it without a store (served, nothing kept, "store": false in the reply).
"""
from __future__ import annotations

import contextlib
import json
import re
import secrets
import time

from ..errors import AmphistaError
from ..structured import _lone_surrogate
from ..tools import ToolCallFilter, openai_tool_calls
from .metrics import request_latency
from .server import (FINISH, REASONING_EFFORTS, ROLES, SERVICE_TIERS, VERBOSITY, ApiError,
                     _constraint_field, _engine_error, _json_bytes, _json_type, _text, check_cache_options,
                     check_hint_values, check_metadata)

# The Responses API fields served (mapped onto a chat completion), and those taken as hints and ignored: a cache
# key and its options, an end-user id, a service tier, stream_options (its include_obfuscation pads events against
# side channels; this server sends none) and a top-level verbosity (the openai SDK's responses.parse sends it
# there; text.verbosity is the same hint) change nothing an answer holds.
SERVED = ("input", "instructions", "model", "max_output_tokens", "temperature", "top_p", "stream", "tools",
          "tool_choice", "parallel_tool_calls", "text", "metadata", "user", "store", "reasoning",
          "previous_response_id")
HINTS = ("prompt_cache_key", "prompt_cache_retention", "safety_identifier", "service_tier", "stream_options",
         "prompt_cache_options", "verbosity")
# Responses fields this server does not implement: refused where they ask for something.
# name -> (the values that ask for nothing, what to say)
IDLE = {
    "background": ((None, False), "background responses need a response store, and this server keeps none: send "
                   "the request without background"),
    "conversation": ((None,), "conversations need a response store, and this server keeps none: send the whole "
                     "conversation in input"),
    "include": ((None, []), "include (extra output: logprobs, encrypted reasoning, tool sources) is not supported"),
    "truncation": ((None, "disabled"), "truncation 'auto' (dropping input to fit the context) is not supported: a "
                   "prompt past the context is refused"),
    "max_tool_calls": ((None,), "max_tool_calls is not supported (this server runs no built-in tools)"),
    "top_logprobs": ((None, 0), "top_logprobs is not supported on /v1/responses (/v1/chat/completions serves "
                     "logprobs)"),
    "prompt": ((None,), "prompt (a stored prompt template) is not supported: send instructions and input"),
    "context_management": ((None, []), "context_management is not supported"),
    "moderation": ((None,), "moderation is not supported"),
    "image": ((None,), "image generation is not supported by this text-only model"),
    "access_programs": ((None,), "access_programs is not supported"),
    "background_options": ((None,), "background_options is not supported (no background responses)"),
}
# The chat route's non-OpenAI fields (README's Serving section), taken as /v1/chat/completions takes them
EXTRAS = ("speculative", "tree", "top_k", "min_p", "repetition_penalty", "seed", "stop", "chat_template_kwargs",
          "presence_penalty", "frequency_penalty", "logit_bias", "ignore_eos", "min_tokens", "stop_token_ids",
          "include_stop_str_in_output", "truncate_prompt_tokens", "allowed_token_ids", "bad_words", "cache_prompt",
          "add_generation_prompt", "continue_final_message", "guided_json", "guided_regex", "guided_choice",
          "guided_grammar", "guided_whitespace_pattern", "guided_decoding_backend", "structured_outputs")
# a chat completion's field sent here: what the Responses API calls it
CHAT_NAMES = {
    "messages": "send the conversation as input (a string, or a list of message, function_call and "
                "function_call_output items)",
    "max_tokens": "send max_output_tokens", "max_completion_tokens": "send max_output_tokens",
    "response_format": "send text: {\"format\": {\"type\": \"json_schema\", \"name\": ..., \"schema\": ...}}",
    "n": "a response has one answer (/v1/chat/completions serves n)",
    "logprobs": "/v1/chat/completions serves logprobs",
    "functions": "send tools: [{\"type\": \"function\", \"name\": ..., \"parameters\": ...}]",
    "function_call": "send tool_choice with tools",
}
TEXT_PARTS = ("input_text", "output_text")
# the values the reply echoes, which the openai client types as enums; context (which reasoning items a later turn
# sees: the chat template's to say here) and mode (an execution mode, any string) are taken and ignored
REASONING = {"effort": REASONING_EFFORTS, "summary": ("auto", "concise", "detailed"),
             "generate_summary": ("auto", "concise", "detailed"), "context": ("auto", "current_turn", "all_turns"),
             "mode": None}
# Errors the chat machinery raises in its own field names, said in the Responses API's
_RENAMES = ((re.compile(r"\bresponse_format json_schema\.schema\b"), "text.format.schema"),
            (re.compile(r"\bresponse_format(?: json_schema)?\b"), "text.format"),
            (re.compile(r"(?<= at )\.json_schema\.schema\b"), ".schema"),
            (re.compile(r"\bmax_(?:completion_)?tokens\b"), "max_output_tokens"),
            (re.compile(r"\b(tools\[\d+\])\.function\."), r"\1."))
# OpenAI's rule for text.format's name (its length is said apart)
_FORMAT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
           "response_format": "text.format"}


def _renamed(e: ApiError) -> ApiError:
    message = e.message
    for pattern, name in _RENAMES:
        message = pattern.sub(name, message)
    param = _PARAMS.get(e.param, e.param)
    if isinstance(param, str) and param.startswith("response_format"):
        param = "text.format"
    return ApiError(e.status, message, param, e.code, e.kind)


def _api_error(e: AmphistaError, chat: dict) -> ApiError:
    constraint = _constraint_field(chat)
    error = _engine_error(e, "input", chat.get("tree") is not None, constraint)
    if constraint is None and chat.get("tool_choice") not in (None, "none", "auto"):
        # the grammar the engine calls response_format is tool_choice's: it was said to be text.format, unsent
        error.message = re.sub(r"\bresponse_format\b", "tool_choice", error.message)
    if error.param is None and error.status == 400 and error.message.startswith("chat template"):
        error.param = "input"       # the template refused the conversation (two system messages, say)
    return _renamed(error)


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param)


def check_names(body: dict, path: str, known: tuple, idle: dict, names: dict, fields: str):
    """Each of a request's fields one the route takes (known), or an unimplemented one (idle: name -> (the values
    that ask for nothing, what to say)) that asks for nothing; another is refused, with what to send instead where
    names has it (another API's field), else naming the fields the route takes."""
    for name in body:
        if name in known:
            continue
        if name in idle:
            allowed, why = idle[name]
            # of the same type too: `in` took false for 0 and 0 for false
            if not any(type(body[name]) is type(a) and body[name] == a for a in allowed):
                raise ApiError(400, f"{why} (got {name}={json.dumps(body[name])[:80]})", name)
            continue
        hint = names.get(name)
        raise ApiError(400, f"{name!r} is not a field of {path}" + (
            f": {hint}" if hint else f" ({fields} ... as /v1/chat/completions takes them)"), name)


def _check_fields(body: dict):
    check_names(body, "/v1/responses", SERVED + HINTS + EXTRAS, IDLE, CHAT_NAMES,
                f"OpenAI's Responses fields, and {', '.join(EXTRAS[:5])}")
    previous = body.get("previous_response_id")
    if previous is not None:
        raise _bad("previous_response_id: this server stores no responses, so it cannot continue one; send the "
                   "whole conversation in input (the earlier input items, then the response's output items)",
                   "previous_response_id")
    for name in ("store", "stream", "parallel_tool_calls"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise _bad(f"{name} must be true or false, got {_json_type(body[name])}", name)
    for name in ("user", "instructions", "model", *HINTS[:4]):
        if body.get(name) is not None:
            _text(body[name], name)
    check_metadata(body.get("metadata"))      # echoed in the reply
    check_cache_options(body.get("prompt_cache_options"))
    check_hint_values(body, ("prompt_cache_retention", "verbosity"))
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise _bad(f"reasoning must be an object ({{\"effort\": ..., \"summary\": ...}}), got "
                   f"{_json_type(body['reasoning'])}", "reasoning")
    for key, value in (reasoning or {}).items():
        # echoed in the reply, where the openai client reads them as its enums
        if key not in REASONING:
            raise _bad(f"reasoning has no key {json.dumps(key)[:60]} (its keys: {', '.join(REASONING)})",
                       f"reasoning.{key}")
        allowed = REASONING[key]
        if allowed is None:
            if value is not None:
                _text(value, f"reasoning.{key}")
            continue
        if value is not None and value not in allowed:
            raise _bad(f"reasoning.{key} must be one of {', '.join(map(repr, allowed))} or null, got "
                       f"{_json_type(value)}", f"reasoning.{key}")
    if body.get("service_tier") is not None and body["service_tier"] not in SERVICE_TIERS:
        raise _bad(f"service_tier must be one of {', '.join(map(repr, SERVICE_TIERS))}, got "
                   f"{_json_type(body['service_tier'])}", "service_tier")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad(f"stream_options must be an object, got {_json_type(body['stream_options'])}", "stream_options")
    if (options or {}).get("include_obfuscation") is not None and not isinstance(options["include_obfuscation"],
                                                                                 bool):
        raise _bad(f"stream_options.include_obfuscation must be true or false, got "
                   f"{_json_type(options['include_obfuscation'])}", "stream_options.include_obfuscation")
    value = body.get("max_output_tokens")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _bad(f"max_output_tokens must be a positive integer, got {_json_type(value)}", "max_output_tokens")


def _parts_text(content, where: str) -> str:
    """A message's content (a string, or a list of input_text / output_text parts, joined by newlines as the chat
    route joins its text parts)."""
    if isinstance(content, str):
        return _text(content, where)
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of input_text / output_text parts, got "
                   f"{_json_type(content)}", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise _bad(f"{where}[{j}] must be {{\"type\": \"input_text\" or \"output_text\", \"text\": ...}}" + (
                f": {kind!r} parts are not supported by this text-only model" if isinstance(kind, str) else
                f", got {_json_type(part)}"), where)
        texts.append(_text(part.get("text"), f"{where}[{j}].text"))
    return "\n".join(texts)


def _messages(body: dict) -> list[dict]:
    """The chat messages of a request's instructions and input: messages as they are (developer: system), a
    function_call as an assistant turn's tool call (consecutive calls, and a call right after an assistant message,
    in that one turn, as a chat client sends an answer of content and calls), a function_call_output as a tool
    message, and a reasoning item's text as the next assistant turn's reasoning_content."""
    items = body.get("input")
    if items is None:
        raise _bad("'input' is a required field: a string, or a list of message, function_call and "
                   "function_call_output items", "input")
    out = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") is not None else []
    if isinstance(items, str):
        return out + [{"role": "user", "content": _text(items, "input")}]
    if not isinstance(items, list) or not items:
        raise _bad(f"input must be a string or a non-empty list of items, got {_json_type(items)}", "input")
    thought = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an item object (a message, function_call or function_call_output), got "
                       f"{_json_type(item)}", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"{where}.role must be one of 'user', 'assistant', 'system', 'developer', got "
                           f"{json.dumps(role)[:60]}", f"{where}.role")
            content = item.get("content")
            one = {"role": ROLES[role], "content": "" if content is None and role == "assistant" else
                   _parts_text(content, f"{where}.content")}
            if role == "assistant" and thought is not None:
                one["reasoning_content"], thought = thought, None
            out.append(one)
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                _text(item.get(name), f"{where}.{name}")
            try:
                args = json.loads(item["arguments"]) if item["arguments"].strip() else {}
            except ValueError as e:
                raise _bad(f"{where}.arguments is not valid JSON: {e}", f"{where}.arguments") from None
            if not isinstance(args, dict):
                raise _bad(f"{where}.arguments must be a JSON object (as a string), got {_json_type(args)}",
                           f"{where}.arguments")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if thought is not None:
                out[-1]["reasoning_content"], thought = thought, None
        elif kind == "function_call_output":
            call_id, output = _text(item.get("call_id"), f"{where}.call_id"), item.get("output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _parts_text(output, f"{where}.output")})
        elif kind == "reasoning":
            if item.get("encrypted_content") is not None:
                raise _bad(f"{where}.encrypted_content: encrypted reasoning (another server's) cannot be read "
                           f"here; send the item's reasoning_text content, or leave the item out",
                           f"{where}.encrypted_content")
            texts = {}
            for name, part_type in (("content", "reasoning_text"), ("summary", "summary_text")):
                parts = item.get(name)
                if parts is not None and not isinstance(parts, list):
                    raise _bad(f"{where}.{name} must be a list of {part_type} parts, got {_json_type(parts)}",
                               f"{where}.{name}")
                for j, part in enumerate(parts or ()):
                    if not isinstance(part, dict) or part.get("type") != part_type:
                        # a part of another type was dropped without a word
                        raise _bad(f"{where}.{name}[{j}] must be {{\"type\": \"{part_type}\", \"text\": ...}}, got "
                                   f"{_json_type(part)}", f"{where}.{name}[{j}]")
                    texts.setdefault(name, []).append(_text(part.get("text"), f"{where}.{name}[{j}].text"))
            # the summary is no part of what the model wrote: the reasoning text is what a template may render
            thought = "\n".join(texts.get("content", ())) or None
        elif kind == "item_reference":
            raise _bad(f"{where}: item references need a response store, and this server keeps none: send the item "
                       f"itself", f"{where}.type")
        else:
            raise _bad(f"{where}.type must be 'message', 'function_call', 'function_call_output' or 'reasoning', "
                       f"got {json.dumps(kind)[:60]}" + (" (built-in tools' items are not supported)"
                                                         if isinstance(kind, str) else ""), f"{where}.type")
    return out


def _tools(tools) -> list | None:
    """Responses' flat function tools in the chat route's shape (tools.check_tools checks their fields)."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise _bad(f"tools must be an array of {{\"type\": \"function\", \"name\": ..., \"parameters\": ...}} "
                   f"objects, got {_json_type(tools)}", "tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _bad(f"tools[{i}] must be {{\"type\": \"function\", \"name\": ..., \"parameters\": ...}}" + (
                f": type {kind!r} is not supported (this server runs no built-in tools; only functions)"
                if isinstance(kind, str) else f", got {_json_type(tool)}"), "tools")
        if "function" in tool:
            raise _bad(f"tools[{i}] is in /v1/chat/completions' shape ({{\"function\": {{...}}}}): /v1/responses "
                       f"takes the function's fields flat, {{\"type\": \"function\", \"name\": ..., \"parameters\": "
                       f"...}}", "tools")
        if (at := _lone_surrogate(tool)) is not None:
            # the template writes the tool into the prompt, where the tokenizer refused it naming no field
            raise _bad(f"tools[{i}]{at} is not valid Unicode (a lone surrogate escape such as \\ud800)", "tools")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                            "strict") if k in tool}})
    return out


def _tool_choice(choice):
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    name = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if isinstance(name, str):
        return {"type": "function", "function": {"name": name}}
    kind = choice.get("type") if isinstance(choice, dict) else None
    raise _bad("tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}" + (
        f": type {kind!r} is not supported (only functions)" if isinstance(kind, str) and kind != "function" else
        f", got {_json_type(choice)}"), "tool_choice")


def _text_format(text) -> dict | None:
    """text.format as the chat route's response_format (None: free text); text.verbosity is taken and ignored."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad(f"text must be an object ({{\"format\": {{\"type\": ...}}}}), got {_json_type(text)}", "text")
    for key in text:
        if key not in ("format", "verbosity"):
            raise _bad(f"text has no key {key!r} (its keys: format, verbosity)", f"text.{key}")
    verbosity = text.get("verbosity")
    if verbosity is not None and verbosity not in VERBOSITY:
        raise _bad(f"text.verbosity must be one of {', '.join(map(repr, VERBOSITY))} or null, got "
                   f"{_json_type(verbosity)}", "text.verbosity")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise _bad(f"text.format must be {{\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}}, got "
                   f"{_json_type(fmt)}", "text.format")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if not isinstance(fmt.get("schema"), dict):
        raise _bad(f"text.format of type 'json_schema' needs its JSON schema object under 'schema', got "
                   f"{_json_type(fmt.get('schema'))}", "text.format.schema")
    name = fmt.get("name")
    if name is None:
        raise _bad("text.format of type 'json_schema': 'name' is required (the format's name: letters, digits, "
                   "underscores and dashes, at most 64 characters)", "text.format.name")
    _text(name, "text.format.name")
    if len(name) > 64:
        raise _bad(f"text.format.name must be at most 64 characters, got {len(name)}", "text.format.name")
    if not _FORMAT_NAME.fullmatch(name):
        raise _bad(f"text.format.name must be letters, digits, underscores and dashes (a-z, A-Z, 0-9, _, -), got "
                   f"{json.dumps(name)[:80]}", "text.format.name")
    if fmt.get("description") is not None:
        _text(fmt["description"], "text.format.description")
    if fmt.get("strict") is not None and not isinstance(fmt["strict"], bool):
        raise _bad(f"text.format.strict must be true or false, got {_json_type(fmt['strict'])}", "text.format.strict")
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema", "strict")
                                                   if fmt.get(k) is not None}}


def chat_request(body) -> dict:
    """A Responses request as the chat completion it asks for (ApiError, naming the Responses field, for a bad
    one)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    _check_fields(body)
    chat = {k: body[k] for k in EXTRAS if k in body}
    chat["messages"] = _messages(body)
    chat["stream"] = bool(body.get("stream"))
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if body.get(name) is not None:
            chat[name] = body[name]
    tools = _tools(body.get("tools"))
    if tools is not None:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    rf = _text_format(body.get("text"))
    if rf is not None:
        chat["response_format"] = rf
    return chat


# ---- the reply ------------------------------------------------------------------------------------------------

def _id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _message_item(text: str, status: str, item_id: str | None = None) -> dict:
    return {"type": "message", "id": item_id or _id("msg_"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(text: str, status: str, item_id: str | None = None) -> dict:
    return {"type": "reasoning", "id": item_id or _id("rs_"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "encrypted_content": None, "status": status}


def _call_item(call_id: str, name: str, arguments: str, status: str, item_id: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id or _id("fc_"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class Reply:
    """What a response object echoes of its request, and how it is written."""
    prefix = "resp_"        # its id's

    def __init__(self, app, body: dict, job):
        self.app, self.body, self.job = app, body, job
        self.id, self.created = _id(self.prefix), int(time.time())
        tools = body.get("tools") if isinstance(body.get("tools"), list) else ()
        self._strict = {t.get("name") for t in tools if isinstance(t, dict) and t.get("strict") is True}

    def holds(self, name: str) -> bool:
        """Whether a call of the function `name` goes out only once it is whole (Stream.call). The openai client
        parses a strict tool's calls in the final response (json.loads of the arguments, in responses.stream()'s
        response.completed and parse()): a call that broke or was cut cannot be in it, so it is never announced, and
        the stream's output_index values stay the final output's positions. Another call goes out as it decodes,
        and one that breaks stays in the output as incomplete (the client parses no non-strict call). A stream under
        the calls' grammar (Stream.hold_strict) sends a strict call as it decodes too."""
        return name in self._strict

    def response(self, status: str, output: list, results=None, thought: str | None = None, finish=None) -> dict:
        body, options = self.body, self.job.options
        text = {"format": (body.get("text") or {}).get("format") or {"type": "text"}}
        verbosity = (body.get("text") or {}).get("verbosity") or body.get("verbosity")
        if verbosity is not None:
            text["verbosity"] = verbosity
        reasoning = body.get("reasoning") or {}
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status, "background": False,
               "error": None, "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
               "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
               "max_tool_calls": None, "model": self.app.model_id, "output": output,
               "parallel_tool_calls": body.get("parallel_tool_calls") is not False, "previous_response_id": None,
               "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
               "service_tier": body.get("service_tier") or "auto", "store": False,
               # the sampling the answer was decoded with: the request's, else the server's defaults
               "temperature": float(options["temperature"]), "text": text,
               "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
               "top_logprobs": 0, "top_p": float(options["top_p"]), "truncation": "disabled",
               "usage": None if results is None else self.usage(results, thought), "user": body.get("user"),
               "metadata": body.get("metadata") or {}}
        if status in ("completed", "incomplete"):
            out["completed_at"] = int(time.time())
        if results is not None:
            out["amphista"] = self.app.extra(results[-1])
        return out

    def usage(self, results: list, thought: str | None) -> dict:
        """The chat route's usage in the Responses API's names. reasoning_tokens: the reasoning text's tokens
        encoded again (the answer's own split at </think> is not kept)."""
        u = self.app.usage_of([results])
        cached = int(results[0].stats.extra.get("prompt_tokens_reused") or 0)
        reasoning = len(self.app.engine.tokenizer.encode(thought, add_bos=False)) if thought else 0
        return {"input_tokens": u["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": u["total_tokens"]}

    def final(self, output: list, results: list, thought: str | None, finish: str, reason: str | None) -> dict:
        """The whole answer's object: the non-streamed reply, and the stream's last event (reason: /metrics')."""
        return self.response("incomplete" if finish == "length" else "completed", output, results, thought, finish)


def _output(reply: Reply, plan, job, result) -> tuple[list, str | None, str, str | None]:
    """A whole answer's (output items, reasoning text, finish, /metrics' reason): the answer read as its stream
    reads it (Stream, as one delta, writing nothing), so that the two replies hold the same items in the same order
    (a message whose first text comes after a call is after it in both)."""
    out = Stream(None, reply, plan, job)
    out.feed(result.text)
    return out.finish(result)


class Stream:
    """A response streamed as the Responses API's events: each output item added, its text (or a call's arguments)
    as it decodes, then done, and the whole response last (response.completed, or response.incomplete where cut).
    The answer is read as the chat route's stream reads it (server._Handler._stream: the reasoning splitter, then
    ToolCallFilter), so the deltas joined are the chat route's text and arguments; the non-streamed reply is this
    reading of the whole answer as one delta (_output). The events are written by its hooks (begin, added, delta,
    closed, completed, fail), which a stream of another API's events overrides (anthropic_messages._Events)."""

    def __init__(self, handler, reply: Reply, plan, job):
        """handler None: nothing is written (_output reads a whole answer so)."""
        self.h, self.reply, self.plan = handler, reply, plan
        self.seq = 0
        self.items: list[dict] = []         # the output so far, by output_index
        self.texts: dict[int, str] = {}     # a reasoning or message item's text so far
        self.open: set[int] = set()         # the items not done yet
        self.thinking = self.message = None     # the reasoning item's and the message's output_index
        self.calls: dict[int, int] = {}     # a chat tool call's index -> its item's output_index
        self.held: dict[int, dict] = {}     # a chat tool call's index -> its item, not sent yet (Reply.holds)
        self.ending = False                 # the answer's end is read: which calls are the reply's is not known yet
        self.splitter = reply.app.reasoning_splitter(job, plan)
        self.stops = bool(job.options.get("stop") or job.options.get("stop_token_ids"))
        # Under the calls' grammar (tool_choice "required" or a named function) a call cannot break, only be cut by
        # max_output_tokens, and such a stream ends with response.incomplete, which the openai client does not
        # parse: there a strict call streams as it decodes (Reply.holds), and stays as incomplete where it was cut.
        # The non-streamed reply still drops a cut one (parse() reads whatever response it gets).
        self.hold_strict = handler is None or plan is None or not plan.calls_only
        self.filt = ToolCallFilter(plan.parallel, plan.fmt, v11=plan.v11, hidden=plan.hidden, parse=plan.parse,
                                   whole=self.stops, calls_only=plan.calls_only) \
            if plan is not None and (plan.parse or plan.shows) else None

    def emit(self, kind: str, **fields):
        if self.h is None:
            return
        payload = _json_bytes({"type": kind, "sequence_number": self.seq, **fields}).decode("utf-8")
        self.seq += 1
        # line breaks to str.splitlines, which SSE clients split on (server._Handler._event)
        payload = payload.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
        self.h.wfile.write(f"event: {kind}\ndata: {payload}\n\n".encode("utf-8"))

    # ---- the events: hooks ------------------------------------------------------------------------------------
    def begin(self):
        """The stream's start, before the answer."""
        self.emit("response.created", response=self.reply.response("in_progress", []))
        self.emit("response.in_progress", response=self.reply.response("in_progress", []))

    def added(self, index: int):
        """Output item `index` begun: a reasoning item or message with no text yet, or a call with its name."""
        item = self.items[index]
        self.emit("response.output_item.added", output_index=index, item=item)
        if item["type"] != "function_call":
            part = {"type": "reasoning_text", "text": ""} if item["type"] == "reasoning" else \
                {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            self.emit("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                      part=part)

    def delta(self, index: int, delta: str):
        """Item `index`'s text (a call's arguments) goes on by `delta`."""
        item = self.items[index]
        if item["type"] == "reasoning":
            self.emit("response.reasoning_text.delta", item_id=item["id"], output_index=index, content_index=0,
                      delta=delta)
        elif item["type"] == "message":
            self.emit("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                      delta=delta, logprobs=[])
        else:
            self.emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=delta)

    def closed(self, index: int):
        """Item `index` is done (self.items[index]: as the output holds it, with its status)."""
        item = self.items[index]
        if item["type"] == "reasoning":
            self.emit("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=item["content"][0]["text"])
        elif item["type"] == "message":
            self.emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=item["content"][0]["text"], logprobs=[])
        else:
            self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                      arguments=item["arguments"])
        if item["type"] != "function_call":
            self.emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=item["content"][0])
        self.emit("response.output_item.done", output_index=index, item=item)

    def completed(self, response: dict):
        """The stream's end: the whole answer's object (Reply.final), in response.incomplete where
        max_output_tokens cut it (as OpenAI ends such a stream; its SDKs tell the two apart by the event's type)."""
        self.ended()
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        self.emit(kind, response=response)

    def fail(self, e: ApiError):
        """An error after the stream began: the Responses API's error event (its fields, and OpenAI's error object
        under "error", on which the openai client raises), then the stream's end."""
        self.emit("error", code=e.code or e.kind, message=e.message, param=e.param, error=e.body()["error"])

    log_end = None      # log_end(results, reasoning, reason): the request logged (answer, _streamed)
    end = None          # run's (results, reasoning, reason), once the answer is read

    def ended(self):
        """Called by completed() before the stream's last event goes out: a client that stops reading at that
        event (the openai and anthropic SDKs do) finds the request logged and in /metrics."""
        if self.log_end is not None and self.end is not None:
            self.log_end(*self.end)

    # ---- the answer, read -------------------------------------------------------------------------------------
    def _add(self, item: dict) -> int:
        index = len(self.items)
        self.items.append(item)
        self.open.add(index)
        if item["type"] != "function_call":
            self.texts[index] = ""
        self.added(index)
        return index

    def think(self, delta: str):
        if self.thinking is None:
            self.thinking = self._add({**_reasoning_item("", "in_progress"), "content": []})
        self.texts[self.thinking] += delta
        self.delta(self.thinking, delta)

    def say(self, delta: str):
        if self.thinking is not None and self.thinking in self.open:
            self._done(self.thinking, "completed")
        if self.message is None:
            self.message = self._add({**_message_item("", "in_progress"), "content": []})
        if delta:
            self.texts[self.message] += delta
            self.delta(self.message, delta)

    def call(self, delta: dict):
        """One of the chat stream's delta.tool_calls entries (tools.ToolCallFilter): a call's first one (its id and
        name) adds a function_call item; its arguments go out as they come."""
        if self.thinking is not None and self.thinking in self.open:
            self._done(self.thinking, "completed")
        f = delta.get("function") or {}
        if delta.get("id") is not None:
            # the calls before it are whole: only the last one streamed may break or be cut. Not so where the
            # answer's end sends it (ToolCallFilter.end): it may come after one that broke, which finish() finds
            if not self.ending:
                for index in sorted(self.calls.values()):
                    if index in self.open:
                        self._done(index, "completed")
                for k in sorted(self.held):
                    if _json_object(self.held[k]["arguments"]):     # else finish() finds whether it is whole
                        self._send_held(k)
            item = _call_item(delta["id"], f.get("name", ""), "", "in_progress")
            if self.hold_strict and self.reply.holds(item["name"]):
                self.held[delta["index"]] = item
            else:
                self.calls[delta["index"]] = self._add(item)
        held = self.held.get(delta.get("index"))
        if held is not None:
            held["arguments"] += f.get("arguments") or ""
            return
        index = self.calls.get(delta.get("index"))
        if index is not None and f.get("arguments"):
            self.items[index]["arguments"] += f["arguments"]
            self.delta(index, f["arguments"])

    def _send_held(self, k: int):
        """A held call (Reply.holds), whole: added, its arguments in one delta, done."""
        item = self.held.pop(k)
        arguments, item["arguments"] = item["arguments"], ""
        index = self.calls[k] = self._add(item)
        if arguments:
            item["arguments"] = arguments
            self.delta(index, arguments)
        self._done(index, "completed")

    def _done(self, index: int, status: str):
        item = self.items[index]
        self.open.discard(index)
        if item["type"] == "reasoning":
            self.items[index] = _reasoning_item(self.texts[index], status, item["id"])
        elif item["type"] == "message":
            self.items[index] = _message_item(self.texts[index], status, item["id"])
        else:
            item["status"] = status
        self.closed(index)

    def feed(self, text: str):
        """One delta of the answer's text: its reasoning, content and calls as they can go out."""
        if self.splitter is not None:
            thought, text = self.splitter.feed(text)
            if thought:
                self.think(thought)
        text, deltas = (text, ()) if self.filt is None or not text else self.filt.stream(text)
        if text:
            self.say(text)
        for d in deltas:
            self.call(d)

    def finish(self, result) -> tuple[list, str | None, str, str | None]:
        """The answer's end: what it had left sent, each item done; (the output, the reasoning text, the finish,
        /metrics' reason)."""
        plan, finish = self.plan, FINISH.get(result.finish_reason, result.finish_reason)
        answer = result.text
        if self.splitter is not None:
            thought, rest = self.splitter.end(result.text)
            if thought:
                self.think(thought)
            if rest and self.filt is None:
                self.say(rest)
            answer = self.splitter.content
        reason, calls = None, []
        if self.filt is not None:
            self.ending = True
            rest, deltas, whole = self.filt.end(answer)
            if rest:
                self.say(rest)
            for d in deltas:
                self.call(d)
            if whole and self.filt.calls_sent and finish != "length":
                reason = "tool_calls"
            calls = openai_tool_calls(plan.answer(answer or "", self.stops)[1], plan.fmt)
        # A call that went out by name but is no call of the reply's (cut by max_output_tokens, or its JSON broke),
        # wherever it is among them, stays in the output where the stream announced it, done as incomplete; a held
        # one (Reply.holds) was never announced, and is dropped. The reply's calls are the others, in their order.
        broken, kept = set(), 0
        for k in sorted({*self.calls, *self.held}):
            item = self.held[k] if k in self.held else self.items[self.calls[k]]
            want = calls[kept]["function"] if kept < len(calls) else {}
            if (item["name"], item["arguments"]) == (want.get("name"), want.get("arguments")):
                kept += 1
                if k in self.held:
                    self._send_held(k)
            elif k in self.held:
                del self.held[k]
            else:
                broken.add(self.calls[k])
        if not self.items:
            self.say("")        # an empty answer is an empty message
        for index in sorted(self.open):
            cut = index == len(self.items) - 1 and finish == "length" and self.items[index]["type"] != "function_call"
            self._done(index, "incomplete" if index in broken or cut else "completed")
        thought = self.texts.get(self.thinking) if self.thinking is not None else None
        return list(self.items), thought, finish, reason

    def run(self, event, job):
        """Sends the run's events (event: its first, which the caller waited for before the headers); (the
        results, the reasoning text, /metrics' reason), or None where the client left."""
        h = self.h
        self.begin()
        while True:
            kind, value = event
            if kind == "end":
                result = value[1]
                break
            if h._client_gone():
                return None
            if kind == "delta" and value[1]:
                self.feed(value[1])
            event = h._next_event(job)
            if event is None:
                return None
        output, thought, finish, reason = self.finish(result)
        self.end = [result], thought, reason
        self.completed(self.reply.final(output, [result], thought, finish, reason))
        return self.end


def respond(handler, body) -> None:
    """POST /v1/responses on a server handler (server._Handler): the answer as a Response object, or streamed."""
    answer(handler, body, chat_request(body), Reply, Stream, naming)


@contextlib.contextmanager
def naming(chat: dict, renamed=_renamed, api_error=_api_error):
    """The chat machinery's errors within, in a route's field names: renamed(an ApiError), api_error(an
    AmphistaError, chat); the Responses API's by default."""
    try:
        yield
    except ApiError as e:
        raise renamed(e) from None
    except AmphistaError as e:
        raise api_error(e, chat) from None


def answer(handler, body: dict, chat: dict, reply_type: type[Reply], stream_type: type[Stream], named) -> None:
    """A request of an API mapped onto the chat machinery (/v1/responses, /v1/messages), served on a server handler
    (server._Handler): chat, the chat completion it asks for, decoded; the answer written whole (reply_type's
    final()), or streamed (stream_type's events). named(chat): a context in which the chat machinery's errors are
    said in the API's field names (naming)."""
    app = handler.app
    stream = chat["stream"]
    with named(chat):
        plan = app.tool_plan(chat)
        jobs = app.submit_all(chat, [app.chat_messages(chat, plan)], True, stream, plan)
    job = jobs[0]
    reply = reply_type(app, body, job)

    def counted_note(results: list, reason: str | None) -> str:
        """Counts the answer in /metrics (its e2e latency ending here) and returns the log line's note."""
        result = results[-1]
        note = f" | {app.method(result) or 'plain'} | {result.stats.summary()} | finish: {result.finish_reason}"
        if job.rows > 1:
            note += f" | batch of {job.rows}"
        app.metrics.answered(results, [reason], request_latency(jobs, [results], time.perf_counter()))
        return note

    try:
        if stream:
            done = _streamed(handler, reply, stream_type, plan, job, chat, named,
                             lambda results, thought, reason: handler._done(200, counted_note(results, reason)))
        else:
            done = None
            with named(chat):
                results = handler._drain(job)
                if results is not None:     # (read as the stream reads it, which may refuse it alike)
                    items, thought, finish, reason = _output(reply, plan, job, results[0])
                    done = results, thought, reason
    finally:
        job.gone.set()      # nobody reads its rows any more: the scheduler drops them (server._complete)
    if done is False or stream and getattr(handler, "_logged", False):
        return      # logged: before its error event, or before its last event (Stream.ended), sent or not
    if done is None:
        handler.close_connection = True
        handler._done(499, " (client closed the connection; decoding stopped)")
        return
    results, thought, reason = done
    note = counted_note(results, reason)
    handler._json(200, reply.final(items, results, thought, finish, reason), note)


def _streamed(handler, reply: Reply, stream_type: type[Stream], plan, job, chat: dict, named, log_end):
    """The stream's (results, reasoning, reason); None where the client left, False where it ended with an error
    event (logged). Its headers wait for the run to start: a request the run refuses is still answered with a
    status. log_end(results, reasoning, reason): logs it, before its last event (Stream.ended)."""
    with named(chat):
        event = handler._next_event(job)
        out = stream_type(handler, reply, plan, job)
    out.log_end = log_end
    if event is None:
        return None
    handler._start_events()
    try:
        with named(chat):
            return out.run(event, job)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        return None
    except ApiError as error:
        # logged before the error event, the stream's last: a client that has it finds the line written
        handler._done(error.status, f" (mid-stream: {error.message[:120]})")
        try:
            out.fail(error)
        except OSError:
            pass
        return False

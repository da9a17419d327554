"""Tool calling (OpenAI's `tools` / `tool_choice`) for Hermes-style models, as vLLM's `hermes` parser serves them,
Llama 3.1/3.2/3.3's JSON calls, as its `llama3_json` parser does, and Mistral's `[TOOL_CALLS] [...]` (its
`mistral` parser); the format is read off the chat template (tool_call_format).

A Hermes model answers a call with `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks (Qwen2.5,
Qwen3, SmolLM3, Hermes 2/3); a Llama 3 model with its whole answer `{"name": ..., "parameters": {...}}` (after an
optional `<|python_tag|>`; several calls separated by ";"); a Mistral model with `[TOOL_CALLS] [{"name": ...,
"arguments": {...}}, ...]`. Here: the checks of `tools` and `tool_choice`; the messages a template reads (an
assistant turn's `tool_calls[].function.arguments` as dicts, `tool` results passed through, or, for a template that
never mentions tools, the tools in the system message and the calls and results written out as Hermes text, so any
model can be offered tools); the grammar (a response_format of type "grammar") that holds the answer to calls of
the listed functions for tool_choice "required" or a named function; parse_tool_calls for the answer; and
ToolCallFilter, which holds a stream's text back from the first `<tool_call>` on (a Llama 3 or Mistral answer while
it may be calls) and streams the calls' arguments as they decode.

No torch here: `from amphista_engine import parse_tool_calls` stays cheap.
"""
from __future__ import annotations

import json
import re
import secrets
from contextlib import nullcontext
from functools import lru_cache
from typing import NamedTuple

from .errors import InputError

__all__ = ["ToolCallFilter", "ToolError", "ToolPlan", "TOOL_CALL_START", "control_tokens", "generate_with_tools",
           "mistral_v11", "openai_tool_calls", "parse_tool_calls", "plan_for", "plan_tools", "prepare_messages",
           "show_controls", "showing_controls", "template_supports_tools", "tool_call_format", "tool_format",
           "tools_system_prompt"]

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"          # what Llama 3.1's template writes before a tool call
MISTRAL_CALLS = "[TOOL_CALLS]"          # Mistral's control token before its JSON array of calls (or before each call)
MISTRAL_ARGS = "[ARGS]"                 # Mistral's (tokenizer v11+) control token between a call's name and arguments
# Mistral's (tokenizer v11's template: name[CALL_ID]id[ARGS]{...}) control token before a call's id. Skipped in the
# text, the id ran into the name: "get_weather" + "a1B2c3D4e" was read as a call of "get_weathera1B2c3D4e"
MISTRAL_CALL_ID = "[CALL_ID]"
FORMATS = ("hermes", "llama3_json", "mistral")
# The control tokens each format's calls are written with: special tokens, which an answer's text leaves out unless
# its run shows them (showing_controls), and which content never holds. Hermes' tags are special tokens in
# NousResearch's Hermes 3 and Hermes-2-Pro (Llama 3) tokenizers, not in Qwen's: skipped, the blocks were lost and
# their JSON came back as content
CONTROLS = {"hermes": (TOOL_CALL_START, TOOL_CALL_END), "llama3_json": (PYTHON_TAG,),
            "mistral": (MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID)}
# Formats whose whole answer is the calls, or is content (decided by its first characters)
_WHOLE = {"llama3_json": ("{", PYTHON_TAG), "mistral": ("[", MISTRAL_CALLS)}
CHOICES = ("none", "auto", "required")
# OpenAI's rule for a function's name
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_-]*")
_CALL_ID_CHARS = re.compile(r"[A-Za-z0-9]*")


class ToolError(InputError):
    """A malformed tools, tool_choice or tool message; param: the request field it is about (OpenAI's error
    object names it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ToolPlan(NamedTuple):
    """A request's checked tools (OpenAI's format, or None) and tool_choice ("none", "auto", "required" or
    {"name": ...}), and the response_format that holds the answer to calls (None: the answer is free); parallel:
    OpenAI's parallel_tool_calls (false: at most one call per answer)."""
    tools: list | None
    choice: str | dict
    response_format: dict | None
    parallel: bool = True
    fmt: str = "hermes"         # how the model writes calls (FORMATS; tool_call_format)
    v11: bool = False           # mistral: the template writes calls as [TOOL_CALLS]name[ARGS]{...} (mistral_v11)
    # the control tokens a run with these tools shows in the answer's text (showing_controls): content leaves them out
    hidden: tuple = ()

    @property
    def parse(self) -> bool:
        """Whether the answer is read for tool calls (tools offered, and not tool_choice "none")."""
        return bool(self.tools) and self.choice != "none"

    @property
    def calls_only(self) -> bool:
        """Whether the answer is calls by construction (tool_choice "required" or a named function: a grammar holds
        it to them): no content, and text that is no whole call (a call cut by max_tokens or a stop) is dropped."""
        return bool(self.tools) and self.choice not in ("none", "auto")

    @property
    def shows(self) -> bool:
        """Whether the answer's text holds control tokens that content leaves out: those of a run with tools
        (tool_choice "none" too: such a run may decode another request's calls)."""
        return bool(self.tools) and bool(self.hidden)

    def read(self, text: str, stops: bool = False) -> tuple[str | None, list[dict]]:
        """parse_tool_calls(text), keeping only the first call where parallel_tool_calls is false (the grammar
        already allows one under "required"; under "auto" the model may still write more, which are dropped, as
        vLLM drops them). Not parse (tool_choice "none"): the text as content, less the control tokens shown. A
        Llama 3 or Mistral answer that does not read as calls after a call went out (cut, or broken after it):
        the whole calls its stream sent, and only what it sent as content (_whole_reading), but for a request with
        stops (stop strings or stop_token_ids), whose stream sends calls whole at the end (ToolCallFilter's whole):
        only a whole answer is calls, both ways. A Hermes answer (not with stops): read as
        its stream sends it (_hermes_reading): a block whose call went out by name but that is no call (cut, or its
        JSON broke after the name) is neither a call nor content."""
        return self.answer(text, stops)[:2]

    def answer(self, text: str, stops: bool = False) -> tuple[str | None, list[dict], bool]:
        """read(text, stops), and whether the answer's calls are whole as its stream sent them: False where the
        stream sent a call by name that is not among the reply's (cut, or broken after its name), so the finish is
        not "tool_calls" either way (ToolCallFilter.end says the same of the stream)."""
        if not self.parse:
            return _visible(text, self.hidden), [], True
        content, calls, whole = _read_answer(text, self.fmt, self.v11, self.hidden, cut=not stops,
                                             parallel=self.parallel)
        # "required", a named function: the grammar allows nothing but calls, so what is left (the unfinished next
        # block of an answer cut by max_tokens: '\n<tool_call>\n{"name":') is part of a call, never content
        return (None if self.calls_only else content), (calls if self.parallel else calls[:1]), whole


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__) + \
        f" ({json.dumps(value, default=str)[:60]})"


def check_tools(tools) -> list | None:
    """OpenAI's tools, checked: a list of {"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}; None or [] (many clients send the empty list): no tools."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise ToolError(f"tools must be an array of {{\"type\": \"function\", \"function\": {{...}}}} objects, got "
                        f"{_json_type(tools)}", "tools")
    names = set()
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                            f"\"parameters\": ...}}}}" + (f": type {kind!r} is not supported (only functions)"
                                                          if isinstance(kind, str) and kind != "function" else
                                                          f", got {_json_type(tool)}"), "tools")
        f = tool["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {_json_type(name)}",
                            "tools")
        if name in names:
            raise ToolError(f"{where}.function.name {name!r} is given twice: tool names must be unique", "tools")
        names.add(name)
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ToolError(f"{where}.function.description must be a string, got {_json_type(f['description'])}",
                            "tools")
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object, got {_json_type(params)}",
                            "tools")
        if f.get("strict") not in (None, True, False):
            raise ToolError(f"{where}.function.strict must be true or false, got {_json_type(f['strict'])}", "tools")
        # only the fields a template reads, None values dropped (templates print None as "None")
        out.append({"type": "function", "function": {k: v for k, v in f.items() if v is not None}})
    return out


def check_tool_choice(choice, tools: list | None) -> str | dict:
    """tool_choice, checked against the tools: "none", "auto" (the default with tools), "required" or
    {"name": ...} (OpenAI's {"type": "function", "function": {"name": ...}})."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ...}}}}, got {json.dumps(choice)[:60]}", "tool_choice")
        if choice == "required" and not tools:
            raise ToolError("tool_choice 'required' needs tools: the request lists none", "tool_choice")
        return choice if tools else "none"
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
        choice.get("type") == "function" and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or {{\"type\": \"function\", \"function\": "
                        f"{{\"name\": ...}}}}, got {_json_type(choice)}", "tool_choice")
    listed = [t["function"]["name"] for t in tools or []]
    if name not in listed:
        raise ToolError(f"tool_choice names the function {name!r}, which is not in tools (" +
                        (", ".join(map(repr, listed)) if listed else "the request lists none") + ")", "tool_choice")
    return {"name": name}


def tool_format(tools: list | None, choice, parallel: bool = True, fmt: str = "hermes",
                v11: bool = False, controls: dict | None = None) -> dict | None:
    """The response_format (a Lark grammar as llguidance reads it) that holds the answer to tool calls in the model's
    format (fmt: Hermes blocks, or Llama 3's bare JSON with "parameters", several separated by "; "): one or more
    (tool_choice "required"; exactly one where parallel is false), or exactly one of the named function; each call's
    name one of the tools' and its arguments valid under that function's parameters schema. None for "none" and
    "auto" (a free answer)."""
    if not tools or choice in ("none", "auto"):
        return None
    from .structured import grammar_source, without_no_ops     # llguidance (and torch) only for a constrained request
    named = choice["name"] if isinstance(choice, dict) else None
    # a control token that is a special token: written as that token (llguidance's <[id]>), which the model was
    # trained to write; as its text, the special token still matched it and the matcher lost its place
    mark = {t: (f"<[{i}]>" if i is not None else f'"{t}"') for t, i in
            {MISTRAL_CALLS: None, MISTRAL_ARGS: None, TOOL_CALL_START: None, TOOL_CALL_END: None,
             **(controls or {})}.items()}
    chosen = [t["function"] for t in tools if named is None or t["function"]["name"] == named]
    call_id = (f' ({mark[MISTRAL_CALL_ID]} /[A-Za-z0-9]{{9}}/)?' if MISTRAL_CALL_ID in (controls or {})
               else "")
    rules = []
    for i, f in enumerate(chosen):
        # The call's JSON written out literally ("name" before "arguments", spaced as Hermes models write it) and
        # the parameters schema its own %json, so that it stays the root its "$ref"s point into: nested in a
        # wrapper object's "arguments", a pydantic schema's "#/$defs/..." (what the openai client's
        # pydantic_function_tool and LangChain send) named nothing and the request was refused. Compact JSON:
        # with llguidance's default flexible whitespace a random (or unsure) model could pad a call with
        # whitespace until max_tokens ran out. Names are [A-Za-z0-9_-] (check_tools): safe in a Lark string.
        # (less the no-op keywords llguidance refuses, such as "uniqueItems": false, as a json_schema's)
        schema = {**without_no_ops(f.get("parameters") or {"type": "object"}),
                  "x-guidance": {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}}
        key = "parameters" if fmt == "llama3_json" else "arguments"
        if fmt == "mistral" and v11:        # [TOOL_CALLS]name[ARGS]{...}, as its template writes calls
            # name[CALL_ID]id[ARGS] where the tokenizer has the token (the templates that write ids write 9 letters
            # and digits): held to name[ARGS], such a model was pushed off the form it was trained on
            rules.append(f'call_{i}: {mark[MISTRAL_CALLS]} "{f["name"]}"{call_id} {mark[MISTRAL_ARGS]} args_{i}')
        else:
            rules.append(f'call_{i}: "{{\\"name\\": \\"{f["name"]}\\", \\"{key}\\": " args_{i} "}}"')
        rules.append(f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    several = named is None and parallel
    if fmt == "llama3_json":                     # the answer is the calls (vLLM's llama3_json splits them at ";")
        start = 'start: call ("; " call)*' if several else "start: call"
        wrapper = []
    elif fmt == "mistral" and v11:              # each call its own [TOOL_CALLS]...
        start = "start: call+" if several else "start: call"
        wrapper = []
    elif fmt == "mistral":                      # as Mistral's template writes them: the token, then a JSON array
        start = f'start: {mark[MISTRAL_CALLS]} " [" call (", " call)* "]"' if several else \
            f'start: {mark[MISTRAL_CALLS]} " [" call "]"'
        wrapper = []
    else:
        start = 'start: tool_call ("\\n" tool_call)*' if several else "start: tool_call"
        wrapper = [f'tool_call: "{TOOL_CALL_START}\\n" call "\\n{TOOL_CALL_END}"'
                   if TOOL_CALL_START not in (controls or {}) and TOOL_CALL_END not in (controls or {}) else
                   f'tool_call: {mark[TOOL_CALL_START]} "\\n" call "\\n" {mark[TOOL_CALL_END]}']
    grammar = "\n".join([start, *wrapper, "call: " + " | ".join(f"call_{i}" for i in range(len(chosen))), *rules])
    rf = {"type": "grammar", "grammar": grammar}
    try:
        grammar_source(rf)
    except InputError as e:
        raise ToolError(f"tools: the functions' parameters schemas do not compile to a grammar "
                        f"({str(e).removeprefix('response_format: ')})", "tools") from None
    return rf


def plan_tools(tools, tool_choice, parallel_tool_calls=None, fmt: str = "hermes", v11: bool = False,
               controls: dict | None = None) -> ToolPlan:
    """A request's tools, tool_choice and parallel_tool_calls (OpenAI's: true, the default, or false: at most one
    call), checked (ToolError naming the field), with the grammar they need; fmt: the model's (tool_call_format),
    v11: Mistral's [ARGS] form (mistral_v11), controls: the control tokens that are special tokens, which the
    answer's text shows and content leaves out ({text: id}: control_tokens)."""
    if fmt not in FORMATS:
        raise ToolError(f"tool call format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    checked = check_tools(tools)
    choice = check_tool_choice(tool_choice, checked)
    # a bool itself: `not in (None, True, False)` took 1 and 0.0 (equal to True and False) as a setting
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError(f"parallel_tool_calls must be true or false, got {_json_type(parallel_tool_calls)}",
                        "parallel_tool_calls")
    parallel = parallel_tool_calls is not False
    v11 = v11 and fmt == "mistral"
    return ToolPlan(checked, choice, tool_format(checked, choice, parallel, fmt, v11, controls), parallel, fmt, v11,
                    tuple(controls or ()))


def plan_for(tokenizer, tools, tool_choice, parallel_tool_calls=None, template: str | None = None) -> ToolPlan:
    """plan_tools for a model: its format, Mistral's form and the control tokens a run shows, read off its
    tokenizer and chat template (the server's and generate_with_tools' plans). template: one that overrides the
    model's own (Engine.chat_template, a request's chat_template)."""
    fmt = tool_call_format(tokenizer, template)
    return plan_tools(tools, tool_choice, parallel_tool_calls, fmt, mistral_v11(tokenizer, template),
                      control_tokens(tokenizer, fmt))


# ---- messages --------------------------------------------------------------------------------------------------

def tool_call_format(tokenizer, template: str | None = None) -> str:
    """How the chat template has the model write calls: "mistral" where it writes [TOOL_CALLS]; "llama3_json" where
    it reads tools and writes calls as `{"name": ..., "parameters": ...}` with Llama 3's tool roles (ipython,
    <|python_tag|>); else "hermes" (Hermes templates, and templates without tools, which get the Hermes instructions:
    prepare_messages)."""
    from .chat import resolve_template
    return _format_of(resolve_template(tokenizer, template, tools=True)[1])


@lru_cache(maxsize=16)
def _format_of(source: str) -> str:
    if MISTRAL_CALLS in source and TOOL_CALL_START not in source:
        return "mistral"
    if _reads_tools(source) and TOOL_CALL_START not in source and '"parameters"' in source \
            and ("ipython" in source or PYTHON_TAG in source):
        return "llama3_json"
    return "hermes"


def mistral_v11(tokenizer, template: str | None = None) -> bool:
    """Whether a Mistral template writes calls in tokenizer v11's form, `[TOOL_CALLS]name[ARGS]{...}` (Mistral
    Small 3.1/3.2, Devstral, Magistral), not v3's `[TOOL_CALLS] [{...}]`: its calls are read and held (grammar)
    so."""
    from .chat import resolve_template
    source = resolve_template(tokenizer, template, tools=True)[1]
    return _format_of(source) == "mistral" and MISTRAL_ARGS in source


def control_tokens(tokenizer, fmt: str) -> dict[str, int]:
    """The format's control tokens (CONTROLS) that are special tokens of this tokenizer, {text: id}: an answer's
    text leaves them out, unless its run shows them (showing_controls)."""
    special = getattr(tokenizer, "special_ids", frozenset())
    found = {t: getattr(tokenizer, "token_to_id", lambda _: None)(t) for t in CONTROLS.get(fmt, ())}
    return {t: i for t, i in found.items() if i is not None and i in special}


def showing_controls(tokenizer, fmt: str):
    """A context in which the engine's decoding keeps the format's control tokens in the answer's text (which
    otherwise leaves special tokens out), so that the tool parser sees where calls and their arguments begin;
    content leaves them out again (ToolPlan.hidden). Nothing changes for a format without any."""
    ids = control_tokens(tokenizer, fmt).values()
    return tokenizer.showing(ids) if ids else nullcontext()


def show_controls(steps, tokenizer, fmt: str):
    """A run's steps (engine.stream_batch's generator) decoded within showing_controls: each step in it, never
    across a yield (the caller's code between steps decodes as it would); its return value and close() pass
    through."""
    try:
        while True:
            with showing_controls(tokenizer, fmt):
                try:
                    item = next(steps)
                except StopIteration as stop:
                    return stop.value
            yield item
    finally:
        steps.close()


def template_supports_tools(tokenizer, template: str | None = None) -> bool:
    """Whether the chat template reads `tools` (one that never does gets prepare_messages' fallback)."""
    from .chat import resolve_template
    return _reads_tools(resolve_template(tokenizer, template, tools=True)[1])


@lru_cache(maxsize=16)
def _reads_tools(source: str) -> bool:
    """Whether the template reads the variable `tools`, not only says the word: SmolLM3's reads `xml_tools` (and
    writes "<tools>" in its text) but never `tools`, so a substring test took it for a tools template: the tools
    it was offered were never shown to the model, and past calls were dropped from the prompt."""
    if "tools" not in source:
        return False
    import jinja2
    from jinja2 import meta
    from jinja2.ext import loopcontrols

    from .chat import _Generation
    try:
        ast = jinja2.Environment(extensions=[_Generation, loopcontrols]).parse(source)
    except jinja2.TemplateSyntaxError:
        return True         # render_chat names the template's error
    return "tools" in meta.find_undeclared_variables(ast)


def tools_system_prompt(tools: list) -> str:
    """Hermes' (and Qwen2.5's template's) tool instructions: each function as one JSON object in <tools></tools>,
    and how to answer with <tool_call> blocks."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            f"function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\nFor each function "
            "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


def check_tool_calls(calls, i: int) -> list[dict]:
    """An assistant message's tool_calls (OpenAI's format: arguments a JSON string), with the arguments as dicts,
    as templates read them (vLLM does the same)."""
    param = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ToolError(f"{param} must be an array of tool calls, got {_json_type(calls)}", param)
    out = []
    for j, call in enumerate(calls):
        where = f"{param}[{j}]"
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or call.get("type", "function") != "function" or not isinstance(f.get("name"), str):
            raise ToolError(f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": ..., "
                            f"\"arguments\": \"<JSON>\"}}}}, got {_json_type(call)}", param)
        args = f.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise ToolError(f"{where}.function.arguments is not valid JSON: {e}", param) from None
        if not isinstance(args, dict):
            raise ToolError(f"{where}.function.arguments must be a JSON object (as a string), got "
                            f"{_json_type(args)}", param)
        one = {"type": "function", "function": {"name": f["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            one["id"] = call["id"]
        out.append(one)
    return out


def _calls_text(calls: list[dict]) -> str:
    return "\n".join(f"{TOOL_CALL_START}\n" + json.dumps({"name": c["function"]["name"],
                                                          "arguments": c["function"]["arguments"]},
                                                         ensure_ascii=False) + f"\n{TOOL_CALL_END}" for c in calls)


def prepare_messages(messages: list[dict], tools: list | None = None, native: bool = True) -> list[dict]:
    """Messages for the chat template: native (the template reads tools): as given (assistant tool_calls checked by
    check_tool_calls, tool results with their tool_call_id); otherwise Hermes' text: the tools' instructions in the
    system message (a new first one where there is none), an assistant's calls as <tool_call> blocks after its
    content, and each run of tool results as one user turn of <tool_response> blocks."""
    if native:
        return messages
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_results"):        # consecutive results: one user turn, as Qwen's template
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            content = m.get("content") or ""
            out.append({"role": "assistant", "content": (content + "\n" if content else "") +
                        _calls_text(m["tool_calls"])})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = (out[0]["content"] + "\n\n" if out[0]["content"] else "") + prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# ---- answers ---------------------------------------------------------------------------------------------------

class _Closer:
    """Where a Hermes block whose text begins at `body` closes: at its first </tool_call> that is not text of a
    string of the block's JSON (read as _Canon reads it, from the "{" it begins with). Qwen's template writes a
    call's arguments with tojson, which leaves "</tool_call>" in a string as it is: cut at the first tag (as vLLM's
    regex cuts), `{"path": "a</tool_call>b"}` was no call, and the block's tail came back as content. A tag is the
    string's text only where the string then closes as JSON: a body that is no JSON, whose JSON broke or ended
    before the tag, or whose string breaks after it (a raw newline: `{"a": "x</tool_call>\n<tool_call>...`) or never
    closes, closes at the tag, as before. Read as the text grows (a stream's state kept here), so that a stream and
    the whole answer's parse cut every block at the same place."""

    def __init__(self, body: int):
        self.body = body
        self.lex: _Canon | None = None
        self.at = body              # the text up to here was fed to lex
        self.scan = body            # where the next </tool_call> is looked for

    def find(self, text: str, final: bool = True) -> tuple[int, int]:
        """(where the block closes in text: its </tool_call>, or -1; how far its text reaches for now: the tag
        that may still be a string's text, which waits for the string's end, or the end of the text). final: the
        text is the whole answer (a string that never closes leaves its tag closing the block)."""
        while True:
            j = text.find(TOOL_CALL_END, self.scan)
            if j < 0:
                return -1, len(text)
            if self.lex is None:
                k = self.body
                while k < j and text[k] in _WS:
                    k += 1
                if text[k] != "{":
                    return j, j
                self.lex, self.at = _Canon(lenient=True), k
            lex = self.lex
            if self.at <= j:
                lex.feed(text[self.at:j])
                self.at = j
                if lex.bad or lex.done or lex.raw is None or lex.esc:
                    return j, j
            while lex.raw is not None and not lex.bad:
                q = text.find('"', self.at)
                if q < 0:
                    return (j, j) if final else (-1, j)
                lex.feed(text[self.at:q + 1])
                self.at = q + 1
            if lex.bad:
                return j, j
            self.scan = j + 1       # the tag was the string's text: the block goes on


class _Block(NamedTuple):
    """A Hermes block as _blocks finds it: its text from body to close (the end of the text where it is unclosed:
    an answer cut by max_tokens or a stop string), its <tool_call> at tag, what follows its </tool_call> at after."""
    tag: int
    body: int
    close: int
    after: int
    closed: bool


def _blocks(text: str) -> list[_Block]:
    """The Hermes blocks of text, as vLLM's hermes parser finds them (each from a <tool_call> to the next
    </tool_call>, an unclosed last one to the end), but closed where _Closer closes them."""
    out, pos = [], 0
    while (i := text.find(TOOL_CALL_START, pos)) >= 0:
        body = i + len(TOOL_CALL_START)
        j = _Closer(body).find(text)[0]
        if j < 0:
            out.append(_Block(i, body, len(text), len(text), False))
            break
        pos = j + len(TOOL_CALL_END)
        out.append(_Block(i, body, j, pos, True))
    return out


def _call(body: str) -> dict | None:
    try:
        obj = json.loads(body.strip())
    except ValueError:
        return None
    return _call_of(obj)


def _call_of(obj, keyed: bool = False) -> dict | None:
    """obj as a call {"name", "arguments": dict}, or None. keyed (Llama 3, Mistral): its arguments must be given
    ("arguments" or "parameters", as vLLM's parsers need them): their bare JSON answer may be a JSON-mode reply,
    and `{"name": "Alice", "age": 30}` was read as a call to a function "Alice" that no request offered."""
    # a lone surrogate (a model that wrote "\ud83d" alone) names no function, and no reply could carry it: raw,
    # it is no UTF-8 character, and the server's encode raised UnicodeEncodeError (a 500, or a stream cut off)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or _LONE_SURROGATE.search(obj["name"]):
        return None
    if keyed and "arguments" not in obj and "parameters" not in obj:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):                    # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": args}


def _parse_llama3(text: str, hidden: tuple = ()) -> tuple[str | None, list[dict]]:
    """Llama 3's calls: the whole answer (after an optional <|python_tag|>) one JSON object {"name", "parameters"}
    or several separated by ";", as vLLM's llama3_json parser reads them; anything else is content (less the
    control tokens shown: hidden)."""
    calls = _llama3_calls(text)
    return (None, calls) if calls else (_visible(text, hidden), [])


def _llama3_calls(text: str) -> list[dict]:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return []
    calls, pos, dec = [], 0, json.JSONDecoder()
    while pos < len(body):
        try:
            obj, pos = dec.raw_decode(body, pos)
        except ValueError:
            return []
        call = _call_of(obj, keyed=True)
        if call is None:
            return []
        calls.append(call)
        rest = body[pos:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return []                   # text after the JSON: not an answer of calls
        pos = len(body) - len(rest)
    return calls


def _parse_mistral(text: str, v11: bool = False, hidden: tuple = ()) -> tuple[str | None, list[dict]]:
    """Mistral's calls, as vLLM's mistral parser reads them: after the first [TOOL_CALLS] (a control token), the
    rest of the answer a JSON array of {"name", "arguments"}, or (v11: the template's form) one or more
    `name[ARGS]{...}` each after its own [TOOL_CALLS] (`name[CALL_ID]id[ARGS]{...}` too, and `name{...}`: [ARGS]
    is a control token, which the text may leave out); the text before the token is content. An answer that
    begins with the array is calls without the token. Anything else is content; content leaves out the control
    tokens shown (hidden)."""
    body = text.strip()
    if body.startswith("[") and not body.startswith(MISTRAL_CALLS):
        calls = _mistral_array(body)
        if calls:
            return None, calls
    at = text.find(MISTRAL_CALLS)
    if at >= 0:
        rest = text[at + len(MISTRAL_CALLS):].strip()
        calls = _mistral_array(rest) if rest.startswith("[") or not v11 else \
            _mistral_v11(text, at + len(MISTRAL_CALLS))
        if calls:
            content = _visible(text[:at], hidden)
            return (content if content.strip() else None), calls
    return _visible(text, hidden), []


def _mistral_array(body: str) -> list[dict]:
    """The calls of a whole JSON array of calls (none where body is anything else)."""
    try:
        listed = json.loads(body)
    except ValueError:
        return []
    calls = [_call_of(c, keyed=True) for c in listed] if isinstance(listed, list) and listed else [None]
    return [] if any(c is None for c in calls) else calls


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _past_call_id(text: str, q: int) -> int:
    """Where a `[CALL_ID]id` at q ends (the spaces after it too), q where none begins there. The id is the
    model's own; a reply's calls get ids of their own (as the other formats' do)."""
    if not text.startswith(MISTRAL_CALL_ID, q):
        return q
    q = _skip_space(text, q + len(MISTRAL_CALL_ID))
    return _skip_space(text, q + len(_CALL_ID_CHARS.match(text, q).group()))


def _mistral_v11(text: str, pos: int) -> list[dict]:
    """The calls `name[ARGS]{...}` from pos (just after a [TOOL_CALLS]) to the end of the text, each after its
    own [TOOL_CALLS] (none where the text is anything else), read as ToolCallFilter streams them."""
    calls, dec = [], json.JSONDecoder()
    while True:
        pos = _skip_space(text, pos)
        name = _NAME_CHARS.match(text, pos).group()
        q = _past_call_id(text, _skip_space(text, pos + len(name)))
        if text.startswith(MISTRAL_ARGS, q):
            q = _skip_space(text, q + len(MISTRAL_ARGS))
        if not _NAME.fullmatch(name) or not text.startswith("{", q):
            return []
        try:
            args, pos = dec.raw_decode(text, q)
        except ValueError:
            return []
        call = _call_of({"name": name, "arguments": args}, keyed=True)
        if call is None:
            return []
        calls.append(call)
        pos = _skip_space(text, pos)
        if pos == len(text):
            return calls
        if not text.startswith(MISTRAL_CALLS, pos):
            return []                   # text after the calls: not an answer of calls
        pos += len(MISTRAL_CALLS)


@lru_cache(maxsize=16)
def _hider(hidden: tuple) -> re.Pattern:
    return re.compile("|".join(map(re.escape, sorted(hidden, key=len, reverse=True))))


def _visible(text: str | None, hidden: tuple) -> str | None:
    """text less the control tokens shown (hidden), as content goes out: one pass, so that text cut anywhere but
    inside a token gives the same pieces."""
    return _hider(hidden).sub("", text) if hidden and text else text


def _partial(text: str, marks: tuple) -> int:
    """The length of the longest end of text that is the beginning (not all) of one of marks: text that may
    still become one."""
    return max((k for m in marks for k in range(min(len(m) - 1, len(text)), 0, -1) if text.endswith(m[:k])),
               default=0)


def parse_tool_calls(text: str, fmt: str = "hermes", *, v11: bool = False,
                     hidden: tuple = ()) -> tuple[str | None, list[dict]]:
    """(content, calls) of an answer. Hermes (the default): each `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>` block (whitespace around the JSON allowed; an unclosed last block too) whose JSON parses is a call
    {"name", "arguments": dict}; content is the rest (the text before the calls, and any block that does not
    parse, kept as written), None where only whitespace is left. "llama3_json": the whole answer is the calls, or
    it is content. "mistral": the calls after [TOOL_CALLS] (v11: Mistral's [ARGS] form too), content before
    them. No calls: (text, []). hidden: the control tokens the text shows (a run's: ToolPlan.hidden), which
    content leaves out."""
    if fmt == "llama3_json":
        return _parse_llama3(text, hidden)
    if fmt == "mistral":
        return _parse_mistral(text, v11, hidden)
    calls, parts, pos = [], [], 0
    for m in _blocks(text):
        body = text[m.body:m.close]
        call = _call(body if m.closed else _unclosed(body))
        if call is None:
            continue
        between = text[pos:m.tag]
        # the text before the first call as written; later only what is not the whitespace between blocks
        if not calls or between.strip():
            parts.append(between)
        pos = m.after
        calls.append(call)
    if not calls:
        return _visible(text, hidden), []
    if text[pos:].strip():
        parts.append(text[pos:])
    # a block that is no call stays content, as written but for its tags where they are shown special tokens
    content = _visible("".join(parts), hidden)
    return (content if content and content.strip() else None), calls


def _read_answer(text: str, fmt: str, v11: bool, hidden: tuple, cut: bool = True,
                 parallel: bool = True) -> tuple[str | None, list[dict], bool]:
    """parse_tool_calls(text), read as the answer's stream sends it, and whether its calls are whole as the stream
    sent them (False where the stream sent a call by name that is not among these: the finish is not "tool_calls",
    both ways). cut False: the parse alone (a request with stops, whose stream sends calls only whole, as the parse
    reads them). Hermes: _hermes_reading. Llama 3, Mistral: _whole_reading. parallel: parallel_tool_calls, whose
    false has the stream begin only a first call."""
    if fmt == "hermes" and cut:
        content, calls, whole = _hermes_reading(text, hidden, parallel)
        return content, [call for _, call in calls], whole
    if cut and fmt in _WHOLE:
        return _whole_reading(text, fmt, v11, hidden, parallel)
    return (*parse_tool_calls(text, fmt, v11=v11, hidden=hidden), True)


def _whole_reading(text: str, fmt: str, v11: bool, hidden: tuple,
                   parallel: bool = True) -> tuple[str | None, list[dict], bool]:
    """A Llama 3 or Mistral answer (no stops) read as its stream sends it (ToolCallFilter.stream, _advance_whole):
    (content, calls, whole). Where no call went out, the parse (all of it content unless it is an answer of calls,
    whose calls then go out whole at the end). Where the whole answer parses as calls that begin with those that
    went out (each the same name, its arguments what went out and more), those calls. Else the stream committed the
    answer to calls, then the answer did not read as them: ended (max_tokens, a stop, the model's end) inside its
    array or after a call, ended inside a call, or broke (text after the calls, a stray `[...]`, JSON that breaks
    in a call, a call whose arguments are given twice): the reply's calls are those that went out whole, content
    is what the stream sent as content (Mistral's text before [TOOL_CALLS]) and never the answer's JSON, which the
    stream never sent and cannot take back its calls for, as _hermes_reading does with a Hermes block. Such calls
    are whole only where the answer was cut after them with no other call begun: a call begun (its name sent, its
    object unfinished or no call) is not, and neither is an answer that broke after them, which the stream already
    says is no answer of calls (_not_calls); either way the finish is not "tool_calls", both ways. (Read as the
    parse, the reply gave the whole JSON as content and no calls, "required" nothing at all, while its stream had
    sent the calls and no content.) parallel_tool_calls false: the stream reads only the first call (later ones are
    dropped, as vLLM drops them), so what follows it never makes it not whole, as in _hermes_reading."""
    content, calls = parse_tool_calls(text, fmt, v11=v11, hidden=hidden)
    f = ToolCallFilter(parallel, fmt, v11=v11, hidden=hidden)
    lead, _ = f.stream(text)
    if not f.calls:
        return content, calls, True
    reply = []
    for k, sent in enumerate(f.calls):
        call = calls[k] if k < len(calls) else None if calls else sent.call
        if call is None or call["name"] != sent.name or not _args_json(call["arguments"]).startswith(sent.args):
            break
        reply.append(call)
    if calls and len(reply) == len(f.calls):
        return content, calls, True
    return (lead if lead.strip() else None), reply, len(reply) == len(f.calls) and not f.broke


def _hermes_reading(text: str, hidden: tuple = (), parallel: bool = True) -> tuple[str | None, list, bool]:
    """A Hermes answer (no stops) read as its stream sends it (ToolCallFilter.stream: a block's call goes out by
    name once its JSON has reached `{"name": "...", "arguments": {`, then its arguments as they decode): (content,
    [(where the block's text begins, call)], whole). A block whose call went out so is the reply's call only where
    its whole JSON reads as that call, arguments that begin with what went out; else (the answer cut inside it, or
    its JSON broke after the name: `{"name": "f", "arguments": {"city": "Paris"</tool_call>`, text after the
    arguments, the arguments given twice) it is neither a call nor content, and whole is False.

    Why so: the stream cannot take back the name and arguments it sent, and never sends the block's markup as
    content. Keeping the block as content (as parse_tool_calls does; vLLM's non-streamed hermes parser even makes
    the whole answer content once a block's JSON fails, while its stream has sent that call) gave the non-streamed
    reply markup its stream never sent; giving it the call would hand a client arguments that are no JSON, which
    OpenAI's shape has no way to flag. Dropped, both replies have the same content and the same whole calls, and
    neither says "tool_calls": the streaming client holds the begun call, whose arguments are no JSON, and
    "tool_calls" would tell it to run every call it got, so both give the run's own finish ("stop", "length").

    A block whose call never went out (the stream stopped streaming at an earlier block that cannot be a call, or
    its JSON does not begin a call) stays content as written unless it parses, as in parse_tool_calls, but for an
    unclosed last one that could still become a call (its JSON so far may begin one and has not ended): the answer
    was cut in it, and it is dropped too; so is a cut `<tool_call>` tag (2 or more of its characters: a lone "<"
    may be the answer's own text) after a closed last block."""
    blocks = _blocks(text)
    end = len(text)
    if blocks and blocks[-1].closed:
        end -= next((k for k in range(len(TOOL_CALL_START) - 1, 1, -1)
                     if end - blocks[-1].after >= k and text.endswith(TOOL_CALL_START[:k])), 0)
    calls, parts, pos, placed = [], [], 0, False
    frozen, begun, whole = False, 0, True       # as ToolCallFilter._advance: frozen, no block begins after it
    for m in blocks:
        closed = m.closed
        body = text[m.body:m.close] if closed else _unclosed(text[m.body:m.close])
        call, name = _call(body), None
        if not frozen:
            state, at, values = _header(body, 0)
            if state == "ok":
                name = values[0]
                sent, canon = _streamed_args(body[at - 1:])
                args = None if call is None else _args_json(call["arguments"])
                frozen = canon.bad or closed and (not canon.done or args != sent + "}" or call["name"] != name)
                if call is not None and (call["name"] != name or not args.startswith(sent)):
                    call = None
                begun += 1
                if call is None and (parallel or begun == 1):
                    whole = False
            else:
                frozen = state == "no" or closed
        if call is None and name is None and (closed or not _may_become_call(body)):
            continue                # no call, and nothing of it went out: content, as written
        between = text[pos:m.tag]
        # the text before the first block read as a call as written; later only what is not the whitespace between
        if not placed or between.strip():
            parts.append(between)
        pos, placed = m.after, True
        if call is not None:
            calls.append((m.body, call))
    if not placed:
        content = _visible(text[:end], hidden)
        return (content if end == len(text) or content and content.strip() else None), [], True
    if text[pos:end].strip():
        parts.append(text[pos:end])
    content = _visible("".join(parts), hidden)
    return (content if content and content.strip() else None), calls, whole


def _streamed_args(args: str) -> tuple[str, _Canon]:
    """What a stream sends of a block's call's arguments (args: their text from the "{" to the block's end), and
    the _Canon that read them: their canonical text, less a closing "}" (it waits for the block to read as a
    call). A feed that turns out not to be JSON as it comes (NaN) gives nothing: the characters before went out
    with the deltas before, so such arguments are read again a character at a time."""
    canon = _Canon()
    sent = canon.feed(args)
    if canon.bad:
        canon, pieces = _Canon(), []
        for ch in args:
            pieces.append(canon.feed(ch))
            if canon.bad or canon.done:
                break
        sent = "".join(pieces)
    return (sent[:-1] if canon.done else sent), canon


def _may_become_call(body: str) -> bool:
    """Whether an unclosed last block's text could still become a call its stream reads: its JSON so far begins a
    call's header (_header) and has not ended (Python's json: NaN too, as the whole answer's parse reads it)."""
    if _header(body, 0)[0] == "no":
        return False
    json_so_far = _Canon(lenient=True)
    json_so_far.feed(body)
    return not (json_so_far.bad or json_so_far.done)


def _unclosed(body: str) -> str:
    """An unclosed last block's body less a partial </tool_call> it ends with (an answer cut by max_tokens inside
    the closing tag): its call parsed as where the cut fell just before the tag, not kept as content."""
    k = next((k for k in range(len(TOOL_CALL_END) - 1, 0, -1) if body.endswith(TOOL_CALL_END[:k])), 0)
    return body[:len(body) - k]


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _call_id(fmt: str) -> str:
    if fmt == "mistral":   # Mistral's template refuses a later turn's call ids of other than 9 letters and digits
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + secrets.token_hex(12)


# A lone UTF-16 surrogate: what json.loads makes of an escape like "\\ud83d" that no low surrogate follows
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _args_json(value) -> str:
    """A call's arguments as their JSON text: json.dumps(value, ensure_ascii=False), but a lone surrogate (a model
    that wrote "\\ud83d" alone) written as its \\u escape, as json.dumps(ensure_ascii=True) writes it: raw, it is
    no UTF-8 character, and the reply's encode raised UnicodeEncodeError (a 500, or a stream cut off mid-answer)."""
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))


def openai_tool_calls(calls: list[dict], fmt: str = "hermes") -> list[dict]:
    """Parsed calls in OpenAI's reply format, each with a fresh id (9 letters and digits for Mistral, as its
    template wants them back) and its arguments as a JSON string."""
    return [{"id": _call_id(fmt), "type": "function",
             "function": {"name": c["name"], "arguments": _args_json(c["arguments"])}}
            for c in calls]


class ToolCallFilter:
    """A streamed answer's content, held back from the first `<tool_call>` on (and a partial `<tool_call` at the
    end of the text so far, which may become one): feed() gives the text a client may see now; finish() reads the
    whole answer for calls once it has ended. The server's stream uses stream() and end() instead, which also
    send the calls' arguments as they decode. Mistral: content goes out up to the first [TOOL_CALLS] (v11: its
    calls may be `name[ARGS]{...}`). hidden: the control tokens the text shows (ToolPlan.hidden), which content
    leaves out (a partial one at the end of the text so far waits); parse False (tool_choice "none" in a run that
    shows them): the text is all content. whole (a request with stop strings or stop_token_ids): each Hermes call
    goes out whole once its block closes (Llama 3's and Mistral's at the end), and end() gives the rest as the
    non-streamed reply reads it. calls_only (ToolPlan.calls_only: tool_choice "required" or a named function): no
    content at all, as the non-streamed reply has none."""

    def __init__(self, parallel: bool = True, fmt: str = "hermes", *, v11: bool = False, hidden: tuple = (),
                 parse: bool = True, whole: bool = False, calls_only: bool = False):
        self.calls_only = calls_only and parse
        self.parallel = parallel    # parallel_tool_calls: false keeps only the first call (ToolPlan.read)
        self.fmt = fmt
        # A stop may cut a Hermes block anywhere, after its arguments began to stream; the non-streamed reply then
        # reads the cut block as content, its markup too (as vLLM's hermes parser does: JSON that does not parse is
        # no call). Streamed as they decode, the fragments that went out could not be taken back, and the two
        # replies disagreed (a half call, finish "stop", against content). So where a stop may cut (the request
        # has one), calls go out whole as their blocks close: a cut block is then content both ways. Llama 3's and
        # Mistral's answers are calls only where all of them parse: there the calls wait for the end. Without
        # stops, arguments stream as they decode (a max_tokens cut says so: finish "length").
        self.whole = whole
        self.v11 = v11 and fmt == "mistral"
        self.hidden = tuple(hidden)
        self.parse = parse
        self.text = ""          # all the text fed
        self.sent = 0           # how much of it went out
        self.holding = False    # a <tool_call> started: nothing more goes out before the end
        self.spoke = False      # hermes: content other than whitespace went out (feed)
        # llama3_json, mistral: the answer began with other than a call (or its calls broke before one went out):
        # all of it content
        self.free = not parse
        self.lead = False       # mistral: content up to a [TOOL_CALLS], where the calls begin
        self.tagged = False     # mistral: the calls began with a [TOOL_CALLS] (not the bare array)
        self.name: str | None = None    # mistral v11: the name of the call whose arguments are read
        # stream(): the calls sent as they decode
        self.calls: list[_Streamed] = []
        self.scan = 0           # where the next <tool_call> is looked for
        self.body: int | None = None    # where the open block's text begins
        self.closer: _Closer | None = None  # ... and where it closes
        self.cur: _Streamed | None = None   # its call, once its name went out
        self.frozen = False     # a block that cannot be streamed: the rest waits for end()
        self.calls_sent = 0     # end(): the calls the answer holds (all sent), where they are whole
        # stream(), llama3_json and mistral (_advance_whole): where the answer's reading is, and what it expects
        # there (start, open, next, obj, sep, tail; done: nothing more is read)
        self.phase, self.pos = "start", 0
        self.obj = 0            # the call object being read: where its "{" is
        self.check: _Canon | None = None    # ... its JSON, read as Python's json reads it (NaN too)
        self.skip = False       # ... not begun {"name": ..., "arguments": {: it goes out whole once read
        self.broke = False      # ... calls went out, then the answer turned out not to be calls (_not_calls)

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.holding:
            return ""
        if self.fmt in _WHOLE or not self.parse:
            # a Llama 3 or Mistral answer is calls from its first character ("{" or <|python_tag|>, "[" or
            # [TOOL_CALLS]) or none: held back until the first non-space characters say which. Mistral's content
            # may go on to a [TOOL_CALLS] later (_lead)
            if not self.free and not self.lead:
                head = self.text.lstrip()
                opener, tag = _WHOLE[self.fmt]
                if not head or tag.startswith(head) and head != tag:
                    return ""
                if head.startswith(opener) or head.startswith(tag):
                    self.holding = True
                    return ""
                self.lead, self.free = self.fmt == "mistral", self.fmt != "mistral"
            return self._lead() if self.lead else self._release(len(self.text))
        i = self.text.find(TOOL_CALL_START, max(0, self.sent - len(TOOL_CALL_START)))
        if i >= 0:
            self.holding = True
            end = i
        elif self.hidden:
            # the tags shown (special tokens): a stray </tool_call> in content is left out too
            end = len(self.text) - _partial(self.text[self.sent:], self.hidden + (TOOL_CALL_START,))
        else:
            keep = next((k for k in range(min(len(TOOL_CALL_START) - 1, len(self.text)), 0, -1)
                         if self.text.endswith(TOOL_CALL_START[:k])), 0)
            end = len(self.text) - keep
        if not self.spoke:
            # Content that is only whitespace waits: the reply's content is None where only whitespace is left
            # around its blocks (_hermes_reading, parse_tool_calls: OpenAI's null content beside tool_calls), and
            # sent at once, " " before a <tool_call> was content the reply did not have (" <tool_call>" then EOS,
            # or "\n\n" before whole calls). The Llama 3 and Mistral streams hold it back too (feed's lstrip); an
            # answer of whitespace alone is content both ways, sent at the end (end, finish)
            if not (_visible(self.text[self.sent:end], self.hidden) or "").strip():
                return ""
            self.spoke = True
        if self.hidden:
            return self._release(end)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _release(self, end: int, marks: tuple = ()) -> str:
        """The text up to end as content, less the control tokens shown (a partial one, or one of marks, at the
        end of the text so far waits)."""
        if end == len(self.text):
            end -= _partial(self.text[self.sent:end], self.hidden + marks)
        out, self.sent = _visible(self.text[self.sent:end], self.hidden), max(self.sent, end)
        return out

    def _lead(self) -> str:
        """Mistral's content before its calls: out up to the first [TOOL_CALLS], from which the text is held."""
        i = self.text.find(MISTRAL_CALLS, self.sent)
        if i < 0:
            return self._release(len(self.text), (MISTRAL_CALLS,))
        out = self._release(i)
        self.lead, self.holding, self.pos, self.phase = False, True, i, "start"
        return out

    def _read(self, text: str) -> tuple[str | None, list[dict]]:
        """The whole answer's (content, calls), as the non-streamed reply reads it (ToolPlan.read)."""
        return self._read_whole(text)[:2]

    def _read_whole(self, text: str) -> tuple[str | None, list[dict], bool]:
        """_read, and whether its calls are whole as the stream sent them (ToolPlan.answer)."""
        if not self.parse:
            return _visible(text, self.hidden), [], True
        content, calls, whole = _read_answer(text, self.fmt, self.v11, self.hidden, cut=not self.whole,
                                             parallel=self.parallel)
        return (None if self.calls_only else content), (calls if self.parallel else calls[:1]), whole

    def finish(self, text: str | None = None) -> tuple[str, list[dict]]:
        """(the content not sent yet, the calls) of the whole answer (`text`, or what was fed)."""
        text = self.text if text is None else text
        content, calls = self._read(text)
        sent = _visible(self.text[:self.sent], self.hidden)
        rest = (content or "")[len(sent):] if (content or "").startswith(sent) else ""
        return rest, calls

    # ---- calls streamed as they decode (the server's stream) ---------------------------------------------------

    def stream(self, delta: str) -> tuple[str, list[dict]]:
        """feed(delta), and the `delta.tool_calls` entries (OpenAI's streamed form) the held text makes certain:
        a call's first one (index, id, type, its name, arguments "") once its JSON has reached its arguments
        object, then that object's text as it decodes, written as openai_tool_calls writes it (json.dumps: a
        fragment goes out once no later character can change it), so that the fragments joined are the
        non-streamed reply's arguments. Hermes: a block that does not begin `{"name": "...", "arguments": {` (a
        "type": "function" before its name or arguments allowed: _HEADERS; or whose arguments are not JSON as they
        come) stops the streaming: it and all later calls wait for end().
        Llama 3 and Mistral (_advance_whole): the same for each call of the answer, as vLLM's parsers stream them."""
        content = self.feed(delta)
        if self.calls_only:
            content = ""                # the grammar's answer is calls from its first character: none is content
        if not self.holding:
            return content, []
        if self.fmt in _WHOLE:
            if self.whole:
                return content, []      # the calls, if the answer is calls, at end() (__init__)
            more, out = self._advance_whole()
            return content + more, out
        return content, self._advance()

    def _advance_whole(self) -> tuple[str, list[dict]]:
        """Llama 3's and Mistral's answer read as it arrives, as _parse_llama3 and _parse_mistral read the whole of
        it: (content, `delta.tool_calls` entries). The text is held back while it may still be calls, and all of it
        goes out as content once it cannot be (no call went out yet: an answer of calls is one from its first
        character). A call streams as a Hermes one does once its object begins `{"name": "...", "arguments": {`
        ("parameters" too, and "type": "function" before either); one written otherwise (its name after its
        arguments, its arguments a JSON string) goes out whole once its object has been read; one with neither
        "arguments" nor "parameters" is no call (_call_of: a JSON-mode answer). A call that went out commits the
        answer to calls: where the rest turns out not to be (text after the calls, JSON that breaks), nothing more
        goes out, and end() says the calls are not whole (as a Hermes block that breaks after its name)."""
        out: list[dict] = []
        text, n = self.text, len(self.text)
        while self.phase != "done":
            if self.phase == "obj":
                got = self._read_object(out)
                if got == "no":
                    return self._not_calls(out)
                if got == "wait":
                    break
                continue
            # str.strip()'s whitespace where the parsers strip the answer or between Llama's calls; JSON's inside
            # Mistral's array, which json.loads reads
            inner = self.fmt == "mistral" and self.phase in ("next", "sep")
            pos = self.pos
            while pos < n and (text[pos] in _WS if inner else text[pos].isspace()):
                pos += 1
            self.pos = pos
            if pos == n:
                break
            ch, phase = text[pos], self.phase
            if phase == "start":
                tag = _WHOLE[self.fmt][1]
                if text.startswith(tag, pos):   # feed() held the text until it was the whole tag or not it
                    self.pos += len(tag)
                    self.tagged = True
                self.phase = "open"
            elif phase == "open":
                if self.fmt == "mistral":
                    if ch != "[":
                        if not (self.v11 and self.tagged):
                            return self._not_calls(out)
                        self.phase = "name"     # [TOOL_CALLS]name[ARGS]{...}
                        continue
                    self.pos += 1
                self.phase = "next"
            elif phase == "name":
                name = _NAME_CHARS.match(text, pos).group()
                q = _skip_space(text, pos + len(name))
                if q < n and text.startswith(MISTRAL_CALL_ID, q):
                    q = _past_call_id(text, q)
                if q == n:
                    break                       # the name, its id (or the space after them) may go on
                if text.startswith(MISTRAL_ARGS, q):
                    q += len(MISTRAL_ARGS)
                elif MISTRAL_ARGS.startswith(text[q:]) or MISTRAL_CALL_ID.startswith(text[q:]):
                    break
                elif text[q] != "{":
                    return self._not_calls(out)
                if not _NAME.fullmatch(name):
                    return self._not_calls(out)
                self.name, self.pos, self.phase = name, q, "args"
            elif phase == "args":
                if ch != "{":
                    return self._not_calls(out)
                self.phase, self.obj, self.check, self.skip = "obj", pos, _Canon(lenient=True), False
            elif phase == "vsep":              # after a v11 call: the next one's [TOOL_CALLS], or the end
                if text.startswith(MISTRAL_CALLS, pos):
                    self.pos, self.phase = pos + len(MISTRAL_CALLS), "name"
                elif not MISTRAL_CALLS.startswith(text[pos:]):
                    return self._not_calls(out)
                else:
                    break
            elif phase == "next":
                if ch != "{":
                    return self._not_calls(out)
                self.phase, self.obj, self.check, self.skip = "obj", pos, _Canon(lenient=True), False
            elif phase == "sep" and ch == (";" if self.fmt == "llama3_json" else ","):
                self.pos, self.phase = pos + 1, "next"
            elif phase == "sep" and ch == "]" and self.fmt == "mistral":
                self.pos, self.phase = pos + 1, "tail"
            else:
                return self._not_calls(out)
        return "", _merged(out)

    def _read_object(self, out: list[dict]) -> str:
        """_advance_whole's call object at self.obj: its name and arguments streamed, or it whole once read:
        "read" (it was), "wait" (the text so far ends inside it, or nothing more is read), "no" (it is no call)."""
        text, n = self.text, len(self.text)
        if self.cur is None and not self.skip and (self.parallel or not self.calls):
            # v11: the object is the arguments, their call's name read before them
            state, at, values = ("ok", self.obj + 1, [self.name]) if self.name is not None else \
                _header(text, self.obj)
            if state == "no":
                self.skip = True
            elif state == "ok":
                self.cur = _Streamed(values[0], self.fmt, at - 1)
                self.calls.append(self.cur)
                out.append({"index": len(self.calls) - 1, "id": self.cur.id, "type": "function",
                            "function": {"name": self.cur.name, "arguments": ""}})
        cur = self.cur
        if cur is not None and not cur.canon.done and n > cur.at:
            part = cur.canon.feed(text[cur.at:])
            cur.at = n
            if cur.canon.done:
                part = part[:-1]        # the arguments' closing "}" waits until the object reads as a call
            if part:
                cur.args += part
                out.append({"index": len(self.calls) - 1, "function": {"arguments": part}})
            if cur.canon.bad:           # arguments only Python's json reads (NaN): end() sends the rest
                self.phase = "done"
                return "wait"
        check = self.check
        check.feed(text[self.obj + check.used:])
        if check.bad:
            return "no"
        if not check.done:
            return "wait"
        end = self.obj + check.used
        try:
            obj = json.loads(text[self.obj:end])
            call = _call_of({"name": self.name, "arguments": obj} if self.name is not None else obj, keyed=True)
        except ValueError:
            call = None
        if call is None:
            return "no"
        if cur is not None:
            if not cur.canon.done or call["name"] != cur.name or _args_json(call["arguments"]) != cur.args + "}":
                self.phase = "done"     # its name or arguments given twice: left to end(), which compares
                return "wait"
            cur.args += "}"
            cur.call = call
            out.append({"index": len(self.calls) - 1, "function": {"arguments": "}"}})
        elif self.parallel or not self.calls:
            whole = _Streamed(call["name"], self.fmt, end)
            whole.args, whole.call = _args_json(call["arguments"]), call
            self.calls.append(whole)
            out.append({"index": len(self.calls) - 1, "id": whole.id, "type": "function",
                        "function": {"name": whole.name, "arguments": whole.args}})
        self.cur, self.pos, self.phase = None, end, "sep" if self.name is None else "vsep"
        self.name = None
        if not self.parallel and self.calls:
            self.phase = "done"         # parallel_tool_calls false: only the first call is answered (read)
        return "read"

    def _not_calls(self, out: list[dict]) -> tuple[str, list[dict]]:
        """_advance_whole's answer that cannot be calls: all of it content from here on where no call went out
        (what the parse of the whole answer will say); else nothing more goes out (end() says not whole)."""
        self.phase = "done"
        if self.calls:
            self.broke = True
            return "", _merged(out)
        self.holding = False
        if self.fmt == "mistral" and not self.tagged:
            # a bare "[" that is no array of calls: Mistral's calls may still follow, after a [TOOL_CALLS]
            self.lead, self.phase, self.name = True, "start", None
            content = self._lead()
            if self.holding:
                more, calls = self._advance_whole()
                return content + more, calls
            return content, []
        self.free = True
        return self._release(len(self.text)), []

    def _advance(self) -> list[dict]:
        out: list[dict] = []
        text = self.text
        while not self.frozen:
            if self.body is None:
                if not self.parallel and self.calls:
                    break               # parallel_tool_calls false: only the first call is answered (read)
                i = text.find(TOOL_CALL_START, self.scan)
                if i < 0:
                    break
                self.body = i + len(TOOL_CALL_START)
                self.closer = _Closer(self.body)
            j, upto = self.closer.find(text, final=False)
            if self.whole:
                if j < 0:
                    break
                call = _call(text[self.body:j])
                if call is None:
                    self.frozen = True  # content, as the whole answer's parse keeps it: left to end()
                    break
                done = _Streamed(call["name"], self.fmt, j)
                done.args, done.call, done.block = _args_json(call["arguments"]), call, self.body
                self.calls.append(done)
                out.append({"index": len(self.calls) - 1, "id": done.id, "type": "function",
                            "function": {"name": done.name, "arguments": done.args}})
                self.scan, self.body = j + len(TOOL_CALL_END), None
                continue
            # the block's text so far, less a partial </tool_call> at the end (as _unclosed reads it)
            # (or up to a </tool_call> that may be a string's text: the rest waits until the string ends)
            end = j if j >= 0 else upto if upto < len(text) else len(text) - next(
                (k for k in range(len(TOOL_CALL_END) - 1, 0, -1) if text.endswith(TOOL_CALL_END[:k])), 0)
            if self.cur is None:
                state, at, values = _header(text[:end], self.body)
                if state != "ok":
                    self.frozen = state == "no" or j >= 0
                    break
                self.cur = _Streamed(values[0], self.fmt, at - 1)       # its arguments from their "{"
                self.cur.block = self.body
                self.calls.append(self.cur)
                out.append({"index": len(self.calls) - 1, "id": self.cur.id, "type": "function",
                            "function": {"name": self.cur.name, "arguments": ""}})
            cur, k = self.cur, len(self.calls) - 1
            if not cur.canon.done and end > cur.at:
                part = cur.canon.feed(text[cur.at:end])
                cur.at = end
                if cur.canon.done:
                    part = part[:-1]    # the arguments' closing "}" waits until the block reads as a call
                if part:
                    cur.args += part
                    out.append({"index": k, "function": {"arguments": part}})
            if cur.canon.bad or j >= 0 and not cur.canon.done:
                self.frozen = True      # not a call the whole answer's parse reads: nothing more goes out
                break
            if j < 0:
                break
            whole = _call(text[self.body:j])
            if whole is None or whole["name"] != cur.name or \
                    _args_json(whole["arguments"]) != cur.args + "}":
                self.frozen = True      # JSON that broke after the arguments (or named them twice): left to end()
                break
            cur.args += "}"
            out.append({"index": k, "function": {"arguments": "}"}})
            self.scan, self.body, self.cur = j + len(TOOL_CALL_END), None, None
        return _merged(out)

    def end(self, text: str | None = None) -> tuple[str, list[dict], bool]:
        """A streamed answer's end: (the content not sent yet, the `delta.tool_calls` entries not sent yet, whether
        its calls are whole). The whole answer is read as the non-streamed reply reads it (ToolPlan.answer): each
        call that went out gets the rest of its arguments, the reply's later calls go out whole, and the content
        not sent goes out. A call that went out but is not the reply's (cut by max_tokens, or by a stop string
        where not whole, or JSON that broke after its name; Llama 3, Mistral: an answer that turned out not to be
        calls after one went out) is left as it went: nothing more is sent for it (the markup it began with is never
        content), and whole is False (the finish reason is not "tool_calls", as the reply's: ToolPlan.answer).
        Hermes (_hermes_reading): such a block is no part of the reply, so the whole calls before it get what they
        lack, the calls after it go out whole (after it by index) and the content held back goes out. A Llama 3 or
        Mistral answer that does not read as calls after one went out (cut, or broken: _whole_reading): the reply's
        calls are the whole ones that went out, and its content what went out as content, so nothing more is sent;
        they are whole only where the answer was cut after them with no other call begun (where calls go out whole,
        a request with stops, only a whole answer is calls: ToolPlan.read)."""
        head, out = "", []
        if text is not None and text != self.text and text.startswith(self.text):
            head, out = self.stream(text[len(self.text):])
        text = self.text if text is None else text
        if self.fmt == "hermes" and self.parse and not self.whole:
            return self._end_hermes(text, head, out)
        content, calls, whole = self._read_whole(text)
        for k, sent in enumerate(self.calls):
            args = _args_json(calls[k]["arguments"]) if k < len(calls) else None
            if args is None or calls[k]["name"] != sent.name or not args.startswith(sent.args):
                # not the reply's (begun after its calls, or the answer broke in or after it: _whole_reading):
                # left as it went, and nothing after it goes out (the reply's calls are those before it)
                return head + self._unsent(content), out, False
            if len(args) > len(sent.args):
                out.append({"index": k, "function": {"arguments": args[len(sent.args):]}})
        for k in range(len(self.calls), len(calls)):
            out.append({"index": k, **openai_tool_calls([calls[k]], self.fmt)[0]})
        self.calls_sent = len(calls)
        return head + self._unsent(content), out, whole

    def _end_hermes(self, text: str, head: str, out: list[dict]) -> tuple[str, list[dict], bool]:
        """end() of a Hermes answer whose calls stream as they decode: each call that went out is matched to the
        reply's by its block; one the reply does not have (its block dropped: _hermes_reading) is left as it went."""
        content, placed, whole = _hermes_reading(text, self.hidden, self.parallel)
        placed = placed if self.parallel else placed[:1]
        reply = {at: k for k, (at, _) in enumerate(placed)}
        done = set()
        for i, sent in enumerate(self.calls):
            k = reply.get(sent.block)
            if k is None:
                whole = False
                continue
            done.add(k)
            call = placed[k][1]
            args = _args_json(call["arguments"])
            if call["name"] != sent.name or not args.startswith(sent.args):
                whole = False               # (the reading already checks it; a stream cannot take back what went)
                continue
            if len(args) > len(sent.args):
                out.append({"index": i, "function": {"arguments": args[len(sent.args):]}})
        index = len(self.calls)
        for k, (_, call) in enumerate(placed):
            if k not in done:               # never streamed (after a block that could not stream): whole, after
                out.append({"index": index, **openai_tool_calls([call], self.fmt)[0]})
                index += 1
        self.calls_sent = len(placed)
        return head + self._unsent(None if self.calls_only else content), out, whole

    def _unsent(self, content: str | None) -> str:
        """The reply's content less what went out already (none where what went out is not how it begins)."""
        sent = _visible(self.text[:self.sent], self.hidden)
        return (content or "")[len(sent):] if (content or "").startswith(sent) else ""


# ---- streamed calls ---------------------------------------------------------------------------------------------

_WS = " \t\n\r"                 # JSON's whitespace
_STR = object()                 # _seq: a JSON string (its decoded value is returned)
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_ESCAPES = set('"\\/bfnrtu')


def _seq(s: str, pos: int, parts) -> tuple[str, int, list]:
    """Matches `parts` (literals, tuples of alternative literals, or _STR) at s[pos:], whitespace allowed before
    each: ("ok", the end, the strings' values), ("need", ...) where s ends inside them, ("no", ...) where s cannot
    become them."""
    values = []
    for part in parts:
        while pos < len(s) and s[pos] in _WS:
            pos += 1
        rest = s[pos:]
        if part is _STR:
            if not rest:
                return "need", pos, values
            if rest[0] != '"':
                return "no", pos, values
            end, esc = 1, False
            while end < len(rest) and (esc or rest[end] != '"'):
                esc = not esc and rest[end] == "\\"
                end += 1
            if end == len(rest):
                return "need", pos, values
            try:
                values.append(json.loads(rest[:end + 1]))
            except ValueError:
                return "no", pos, values
            pos += end + 1
            continue
        for lit in (part if isinstance(part, tuple) else (part,)):
            if rest.startswith(lit):
                pos += len(lit)
                break
        else:
            if any(lit.startswith(rest) for lit in (part if isinstance(part, tuple) else (part,))):
                return "need", pos, values
            return "no", pos, values
    return "ok", pos, values


# A call's JSON up to its arguments object's "{": what a call must begin with to be streamed as it decodes
_HEADER = ("{", '"name"', ":", _STR, ",", ('"arguments"', '"parameters"'), ":", "{")
# ... also with OpenAI's "type": "function" before its name or its arguments (Llama 3 models write it so, after
# the tools' own JSON in their prompt): such calls went out only whole, once their object had been read
_TYPED = ('"type"', ":", '"function"', ",")
_HEADERS = (_HEADER, ("{", *_TYPED, *_HEADER[1:]), (*_HEADER[:5], *_TYPED, *_HEADER[5:]))


def _header(s: str, pos: int) -> tuple[str, int, list]:
    """_seq of the call headers at s[pos:]: "ok" where one matched, "need" where one may still, else "no" (also
    for a name no call can have: _call_of)."""
    got = [_seq(s, pos, h) for h in _HEADERS]
    for state in ("ok", "need"):
        for g in got:
            if g[0] == state:
                return ("no", *g[1:]) if state == "ok" and _LONE_SURROGATE.search(g[2][0]) else g
    return got[0]


class _Canon:
    """A JSON value's text, read as it arrives, written out as json.dumps(json.loads(text), ensure_ascii=False)
    writes it (", " and ": " between items, no other whitespace, strings re-escaped, numbers as Python prints
    them): `feed` gives the part of that text no later character can change. done once the value has ended; bad on
    text that is not JSON (or JSON written in a form only the whole value's parse reads: NaN, Infinity), after
    which nothing more is given (the caller's end reads the whole answer)."""

    def __init__(self, lenient: bool = False):
        # lenient: NaN, Infinity and -Infinity read as values, as Python's json reads them (nothing streams then:
        # the reader only checks whether text can still become JSON, and where its value ends)
        self.lenient = lenient
        self.used = 0               # the characters read (where the value ended, once done)
        self.stack: list[str] = []
        self.expect = "value"       # value, value_or_close, key, key_or_close, colon, comma_or_close
        self.tok = ""               # a number or literal being read
        self.raw: str | None = None     # a string being read (its text between the quotes so far)
        self.key = False            # ... as an object's key
        self.sent = 0               # len(raw) whose canonical text was given out (its quote goes out at once)
        self.esc = 0                # inside an escape: its characters so far
        self.safe = 0               # len(raw) where a prefix of raw decodes to a prefix of the whole string
        self.done = self.bad = False

    def feed(self, chars: str) -> str:
        out: list[str] = []
        for ch in chars:
            if self.done or self.bad:
                break
            self.used += 1
            self._char(ch, out)
        if self.raw is not None and not self.bad:
            out.append(self._string_part())
        return "" if self.bad else "".join(out)

    def _string_part(self) -> str:
        # as _args_json writes it (a lone surrogate escaped), character by character: only the raw text since the
        # last part is decoded (it begins and ends where safe was: never inside an escape or a surrogate pair).
        # Decoding all of raw each time made a long string argument quadratic (~1 s of CPU for 28k characters).
        part = _args_json(json.loads('"' + self.raw[self.sent:self.safe] + '"'))[1:-1]
        self.sent = self.safe
        return part

    def _value_ended(self):
        if not self.stack:
            self.done = True
        self.expect = "comma_or_close"

    def _char(self, ch: str, out: list):
        if self.raw is not None:
            if self.esc:
                self.raw += ch
                self.esc += 1
                if self.esc == 2 and ch not in _ESCAPES or self.esc > 2 and ch not in "0123456789abcdefABCDEF":
                    self.bad = True
                elif self.esc == 2 and ch != "u" or self.esc == 6:
                    # an escaped high surrogate waits for the low one that may follow (json.loads joins them).
                    # Only a \uXXXX escape that just ended is looked at: a two-character one after an escaped
                    # backslash and a "u" (the text C:\\usr\\bin) also ends 6 characters after a "\\u", and
                    # int() of its non-hex tail raised ValueError, which broke the stream off mid-answer
                    unicode = self.esc == 6
                    self.esc = 0
                    if not (unicode and 0xD800 <= int(self.raw[-4:], 16) <= 0xDBFF):
                        self.safe = len(self.raw)
                return
            if ch == "\\":
                self.raw += ch
                self.esc = 1
            elif ch == '"':
                self.safe = len(self.raw)
                out.append(self._string_part() + '"')
                self.raw = None
                if self.key:
                    self.expect = "colon"
                else:
                    self._value_ended()
            elif ord(ch) < 0x20:
                self.bad = True         # a raw control character: json.loads refuses it
            else:
                self.raw += ch
                self.safe = len(self.raw)
            return
        if self.tok:
            if ch in "0123456789+-.eE" or ch.isalpha():
                self.tok += ch
                return
            if self.tok in ("true", "false", "null") or self.lenient and self.tok in ("NaN", "Infinity", "-Infinity"):
                out.append(self.tok)
            elif _NUMBER.fullmatch(self.tok):
                try:
                    out.append(json.dumps(json.loads(self.tok)))
                except ValueError:
                    # an int of more than sys.get_int_max_str_digits() digits (a model looping on "1"s): json.loads
                    # refuses it (so the whole answer's parse has no call); uncaught, it broke the stream off
                    self.bad = True
                    return
            else:
                self.bad = True
                return
            self.tok = ""
            self._value_ended()
        if ch in _WS:
            return
        expect = self.expect
        if expect in ("value", "value_or_close"):
            if ch in "{[":
                self.stack.append(ch)
                self.expect = "key_or_close" if ch == "{" else "value_or_close"
                out.append(ch)
            elif ch == '"':
                self.raw, self.key, self.sent, self.safe = "", False, 0, 0
                out.append('"')
            elif ch == "-" or ch.isdigit() or ch in "tfn" or self.lenient and ch in "NI":
                self.tok = ch
            elif ch == "]" and expect == "value_or_close":
                self._close(ch, out)
            else:
                self.bad = True
        elif expect in ("key", "key_or_close"):
            if ch == '"':
                self.raw, self.key, self.sent, self.safe = "", True, 0, 0
                out.append('"')
            elif ch == "}" and expect == "key_or_close":
                self._close(ch, out)
            else:
                self.bad = True
        elif expect == "colon":
            if ch == ":":
                out.append(": ")
                self.expect = "value"
            else:
                self.bad = True
        elif ch == ",":
            out.append(", ")
            self.expect = "key" if self.stack[-1] == "{" else "value"
        elif ch in "}]":
            self._close(ch, out)
        else:
            self.bad = True

    def _close(self, ch: str, out: list):
        if self.stack.pop() != {"}": "{", "]": "["}[ch]:
            self.bad = True
            return
        out.append(ch)
        self._value_ended()


def _merged(out: list[dict]) -> list[dict]:
    """One entry per call per step: a step's fragments of a call joined."""
    merged: list[dict] = []
    for d in out:
        if merged and merged[-1]["index"] == d["index"] and "id" not in d and "id" not in merged[-1]:
            merged[-1]["function"]["arguments"] += d["function"]["arguments"]
        else:
            merged.append(d)
    return merged


class _Streamed:
    """A call whose name went out: its id, name, the arguments text sent, and the reader of the rest."""

    def __init__(self, name: str, fmt: str, at: int):
        self.id, self.name, self.args, self.at = _call_id(fmt), name, "", at
        self.canon = _Canon()
        self.call: dict | None = None   # Llama 3, Mistral: the call, once its whole object was read
        self.block: int | None = None   # Hermes: where its block's text begins (end() finds the reply's call by it)


def _joined_parts(parts: list, i: int) -> str:
    """OpenAI's list of {"type": "text", "text": ...} parts as one text (newline-joined, as vLLM and the server)."""
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        raise ToolError(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                        f"supported, got {_json_type(parts)}", f"messages[{i}].content")
    return "\n".join(p["text"] for p in parts)


def generate_with_tools(engine, messages: list[dict], tools: list | None, tool_choice=None,
                        parallel_tool_calls=None, **options):
    """Engine.generate with OpenAI's tools, as the server serves them: (the GenerationResult, the content, the
    parsed calls [{"name", "arguments"}]). messages in OpenAI's format (assistant tool_calls' arguments JSON strings
    or dicts, tool results); options: Engine.generate's (max_new_tokens, temperature, ...; response_format only with
    tool_choice "none"); parallel_tool_calls: OpenAI's (false: at most one call). The prompt is rendered here (the
    tools a template variable) and handed over as token ids, so engine.chat_template_kwargs is never swapped
    (another thread's run may be rendering with it)."""
    from .chat import check_template_variables, render_chat
    from .engine import RenderedPrompt
    template = engine.chat_template      # an override of the model's own: its call format, its rendering
    plan = plan_for(engine.tokenizer, tools, tool_choice, parallel_tool_calls, template)
    if plan.response_format is not None:
        if options.get("response_format") is not None:
            raise ToolError("response_format does not mix with tool_choice 'required' or a named function",
                            "response_format")
        options["response_format"] = plan.response_format
    if not isinstance(messages, list) or not messages:
        raise ToolError(f"messages must be a non-empty list of message dicts, got {type(messages).__name__} "
                        f"{messages!r:.40}", "messages")
    for i, m in enumerate(messages):
        # the Hermes fallback read m["role"] of each (a bare TypeError or KeyError); render_chat names the rest
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ToolError(f"messages[{i}] must be a dict with a 'role' string and 'content', got {m!r:.60}",
                            "messages")
    checked = [{**m, "tool_calls": check_tool_calls(m["tool_calls"], i)} if isinstance(m, dict) and m.get("tool_calls")
               else m for i, m in enumerate(messages)]
    # OpenAI's content parts joined as the server joins them: the Hermes fallback wrote a tool result's list of
    # parts into its <tool_response> as a Python repr
    checked = [{**m, "content": _joined_parts(m["content"], i)} if isinstance(m, dict) and
               isinstance(m.get("content"), list) else m for i, m in enumerate(checked)]
    checked = prepare_messages(checked, plan.tools, template_supports_tools(engine.tokenizer, template))
    try:    # the engine's variables checked as generate checks them (None or a list met `**` as a TypeError)
        own = check_template_variables(engine.chat_template_kwargs)
    except InputError as e:
        raise InputError(f"engine.{e}") from None
    variables = {**own, **({"tools": plan.tools} if plan.tools else {})}
    ids = engine.tokenizer.encode(render_chat(engine.tokenizer, checked, template=template, variables=variables))
    # rendered with the template: its end-of-turn text (vicuna's </s> where that is no special token) ends the answer
    prompt = RenderedPrompt(ids, messages)
    # the answer's text shows the control tokens its calls are written with (the parser reads them; content not)
    with showing_controls(engine.tokenizer, plan.fmt) if plan.parse else nullcontext():
        result = engine.generate(prompt, **options)
    if not plan.parse:
        return result, result.text, []
    content, calls = plan.read(result.text, bool(options.get("stop") or options.get("stop_token_ids")))
    return result, content, calls

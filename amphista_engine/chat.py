"""Chat messages -> prompt text, with the model's own Jinja chat template or a built-in one.

Rendering follows transformers' `apply_chat_template`: a sandboxed Jinja environment with
trim_blocks/lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, and the `bos_token`/`eos_token`
variables, so a template from a model repo or GGUF file renders exactly as it does there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import NamedTuple

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ConfigError, InputError

__all__ = ["BUILTIN_TEMPLATES", "VICUNA_SYSTEM_PROMPT", "ChatStops", "chat_stops", "check_chat_template", "render_chat",
           "resolve_template"]

# FastChat's "vicuna_v1.1" conversation template.
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Built-ins are Jinja too, so every template goes through one renderer. FastChat joins turns as
# `SYSTEM USER: q ASSISTANT: a</s>USER: ...` and prompts the reply with a bare `ASSISTANT:`.
_VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = default_system_prompt %}{% set turns = messages %}{% endif %}"
    "{{ system }} "
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'ASSISTANT: ' + m['content'] + '</s>' }}"
    "{% else %}{{ raise_exception('vicuna_v1.1 supports the roles system (first), user and assistant, not '"
    " + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"vicuna_v1.1": _VICUNA, "chatml": _CHATML}
# Text that ends an assistant turn in each built-in format.
_BUILTIN_STOPS = {"vicuna_v1.1": ["</s>"], "chatml": ["<|im_end|>"]}


class ChatStops(NamedTuple):
    """What ends a reply: token ids (the model's EOS set plus single-token stop strings) and strings
    to cut the text at, for formats whose end marker is several tokens in this vocabulary."""

    token_ids: list[int]
    strings: list[str]


def resolve_template(tokenizer, template: str | None = None, tools: bool = False) -> tuple[str, str]:
    """`(name, jinja source)` of the template to use.

    `template` is a built-in name ("vicuna_v1.1", "chatml"), a Jinja string, or None for the model's
    own template; a model without one gets "chatml" when its vocabulary has `<|im_start|>`, else
    "vicuna_v1.1" (the Llama/Vicuna default). tools: the prompt offers tools, so a model's named "tool_use"
    template is taken over its default, as transformers' apply_chat_template does.
    """
    if template is None:
        if tools and (tool_use := getattr(tokenizer, "chat_templates", {}).get("tool_use")):
            return "model", tool_use
        own = getattr(tokenizer, "chat_template", None)
        if own:
            return "model", own
        has_chatml = tokenizer is not None and tokenizer.token_to_id("<|im_start|>") is not None
        template = "chatml" if has_chatml else "vicuna_v1.1"
    if not isinstance(template, str):
        raise InputError(f"chat template must be a built-in name or a Jinja string, got {type(template).__name__}")
    if template in BUILTIN_TEMPLATES:
        return template, BUILTIN_TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return "custom", template
    raise InputError(f"unknown chat template {template!r}; built-ins: {', '.join(BUILTIN_TEMPLATES)}, "
                     "or pass a Jinja template string")


def check_chat_template(template, what: str = "chat_template") -> str | None:
    """An override of the model's chat template (vLLM's --chat-template and request field chat_template,
    transformers' apply_chat_template(chat_template=...)): None (the model's own), a built-in name, or Jinja source.
    Compiled now, so that one that does not parse is an InputError naming `what` where it is given, not at the first
    chat rendered with it."""
    if template is None:
        return None
    if not isinstance(template, str):
        raise InputError(f"{what} must be a Jinja template (a string) or a built-in name "
                         f"({', '.join(BUILTIN_TEMPLATES)}), got {type(template).__name__}")
    if template not in BUILTIN_TEMPLATES and "{{" not in template and "{%" not in template:
        shown = repr(template) if len(template) <= 60 else repr(template[:50]) + "..."     # a file's whole text
        raise InputError(f"{what} {shown} is neither a Jinja template (it has no {{{{ or {{%) nor a built-in name "
                         f"({', '.join(BUILTIN_TEMPLATES)})")
    try:
        template.encode("utf-8")
    except UnicodeEncodeError as e:
        # each prompt it renders would be refused as "the prompt's text is not valid Unicode", naming no template
        raise InputError(f"{what} is not valid Unicode: it holds U+{ord(template[e.start]):04X}, a lone surrogate "
                         f"(at character {e.start}; bytes that were not UTF-8?)") from None
    try:
        name, source = resolve_template(None, template)
        _compile(source, name)
    except InputError as e:
        cause = e.__cause__
        if isinstance(cause, jinja2.TemplateSyntaxError):
            raise InputError(f"{what} is not a valid Jinja template: {cause.message} (line {cause.lineno})") from None
        own = f"chat template {name!r} "       # _compile's words for the template: this one is `what`
        raise InputError(f"{what} {str(e)[len(own):]}" if str(e).startswith(own) else f"{what}: {e}") from None
    return template


# What render_chat passes itself: template variables may not replace them.
_RESERVED_VARIABLES = ("messages", "add_generation_prompt", "bos_token", "eos_token", "default_system_prompt")


def check_template_variables(variables) -> dict:
    """Extra chat-template variables (transformers' apply_chat_template **kwargs, e.g. Qwen3's enable_thinking) as a
    dict, or an InputError naming what is wrong with them."""
    if variables is None:
        return {}
    if not isinstance(variables, dict) or not all(isinstance(k, str) and k.isidentifier() for k in variables):
        raise InputError(f"chat_template_kwargs must be a dict of template variable names to values, e.g. "
                         f'{{"enable_thinking": false}}, got {variables!r}')
    reserved = [k for k in variables if k in _RESERVED_VARIABLES]
    if reserved:
        raise InputError(f"chat_template_kwargs may not set {', '.join(reserved)}: the engine sets "
                         f"{', '.join(_RESERVED_VARIABLES)} itself")
    return dict(variables)


def render_chat(tokenizer, messages, template: str | None = None, add_generation_prompt: bool | None = None,
                variables: dict | None = None, continue_final_message: bool = False) -> str:
    """Prompt text for `messages` (a list of {"role", "content"} dicts, or a str = one user message).

    `tokenizer` supplies the model's template and `bos_token`/`eos_token`; it may be None when
    `template` is given. Encode the result with `tokenizer.encode(text)`: a BOS the template wrote
    itself is not doubled. variables: more template variables (check_template_variables), e.g.
    {"enable_thinking": False} for Qwen3's template.

    add_generation_prompt: end with the header of a new assistant turn (None: unless continue_final_message).
    continue_final_message: the last message is a partial assistant reply for the model to go on with (assistant
    prefill): the text ends right after its content, without the end of turn the template writes after it, as
    transformers' apply_chat_template(continue_final_message=True) cuts it (the content's trailing whitespace kept
    only where the template keeps it).
    """
    variables = check_template_variables(variables)
    messages = _check_messages(messages)
    for flag, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if not isinstance(value, bool) and not (value is None and flag == "add_generation_prompt"):
            raise InputError(f"{flag} must be True or False, got {type(value).__name__} {value!r:.40}")
    if continue_final_message:
        final = _final_content(messages, add_generation_prompt)
    name, source = resolve_template(tokenizer, template, tools=bool(variables.get("tools")))
    compiled = _compile(source, name)
    generation = not continue_final_message if add_generation_prompt is None else add_generation_prompt

    def render(messages):
        try:
            return compiled.render(
                messages=messages, add_generation_prompt=generation,
                bos_token=getattr(tokenizer, "bos_token", "") or "",
                eos_token=getattr(tokenizer, "eos_token", "") or "",
                default_system_prompt=VICUNA_SYSTEM_PROMPT,
                # transformers defines these as None: templates test `tools is not none`, which an undefined passes.
                **{"tools": None, "documents": None, **variables},
            )
        except jinja2.TemplateError as e:
            raise InputError(f"chat template ({name}) raised an error for these messages: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as e:
            raise InputError(f"chat template ({name}) failed on these messages: {type(e).__name__}: {e}") from e

    if not continue_final_message:
        return render(messages)
    # As transformers' apply_chat_template: a tag after the final content marks where it ends (a plain search for
    # the content took a short one for letters of the end-of-turn tokens after it, "e" in <|im_end|>); a tag whose
    # trailing space the template trimmed means the content's trailing whitespace went too.
    text = render([*messages[:-1], {**messages[-1], "content": final + _FINAL_TAG}])
    at = text.rfind(_FINAL_TAG.strip())
    if at < 0 or not text[:at].rstrip().endswith(final.strip()):
        raise InputError(f"continue_final_message: the chat template ({name}) does not write the final assistant "
                         f"message's content as given (it changes or drops it), so the prompt cannot end inside "
                         f"it; send the content as the template writes it, or continue without the template "
                         f"(a raw prompt with chat=False)")
    return text[:at] if text[at:at + len(_FINAL_TAG)] == _FINAL_TAG else text[:at].rstrip()


# transformers' tag: put after the final message's content, it shows where render_chat cuts the text.
_FINAL_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _final_content(messages: list[dict], add_generation_prompt) -> str:
    """The content continue_final_message goes on from, or an InputError naming why there is none."""
    if add_generation_prompt:
        raise InputError("continue_final_message and add_generation_prompt do not mix: continue_final_message "
                         "continues the last (assistant) message, add_generation_prompt starts a new assistant turn "
                         "after it; ask for one of them")
    last = messages[-1]
    if last["role"] != "assistant":
        raise InputError(f"continue_final_message continues the last message, which must be an assistant message "
                         f"(the partial reply to go on with); message {len(messages) - 1} is a {last['role']} "
                         f"message")
    content = last.get("content")
    if not isinstance(content, str):        # a turn of tool calls only (_check_messages took its None out)
        raise InputError(f"continue_final_message: the final assistant message (message {len(messages) - 1}) has "
                         f"no content to continue (only tool calls); give it the start of the reply as its "
                         f"content, or leave out continue_final_message to start a new turn")
    return content


def chat_stops(tokenizer, template: str | None = None) -> ChatStops:
    """Stop ids and stop strings for replies rendered with `template` (see `resolve_template`)."""
    name, source = resolve_template(tokenizer, template)
    ids = list(getattr(tokenizer, "eos_ids", None) or [])
    strings = list(_BUILTIN_STOPS.get(name, []))
    if name not in _BUILTIN_STOPS and tokenizer is not None:
        strings = [tokenizer.id_to_piece(i) for i in ids if tokenizer.id_to_piece(i) in source]
        if name == "custom":
            # An override's own end-of-turn markers: the tokenizer's EOS set holds those of the model's own template
            # (Tokenizer._collect_eos), so an answer under an override that ends turns otherwise ran on past them
            from .tokenizer import _TURN_END_MARKERS
            strings += [m for m in _TURN_END_MARKERS if m in source and m not in strings]
    for text in strings:
        if tokenizer is not None and (token_id := tokenizer.token_to_id(text)) is not None and token_id not in ids:
            ids.append(token_id)
    return ChatStops(ids, strings)


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, or a str")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InputError(f"message {i} is a {type(m).__name__}, expected a dict with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            # a role of another type was told "has no 'role'", which it has
            what = "no 'role'" if role is None or role == "" else f"a {type(role).__name__} 'role' ({role!r:.40})"
            raise InputError(f"message {i} has {what}; expected a string such as 'system', 'user' or 'assistant'")
        content = m.get("content")
        # An assistant turn that only calls tools has no content (None in OpenAI's format), as in transformers.
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            what = "no 'content'" if content is None else f"a {type(content).__name__} 'content'"
            # OpenAI's content parts are refused, not joined: say so, rather than leave "a list" to puzzle over
            hint = (" (content parts such as [{'type': 'text', 'text': ...}] are not supported: pass the text "
                    "itself)") if isinstance(content, (list, tuple)) else ""
            raise InputError(f"message {i} ({role}) has {what}; expected a str{hint}")
        # transformers drops None values: templates handle a missing key, but print None as "None".
        one = {k: v for k, v in m.items() if v is not None}
        reasoning = next((one[k] for k in _REASONING_FIELDS if k in one), None)
        if reasoning is not None:
            # as transformers' apply_chat_template: a reply's reasoning sent back as `reasoning` (vLLM's newer name) or
            # `thinking` reaches a template that reads reasoning_content (Qwen3's), and gpt-oss's, which reads thinking;
            # before, Qwen3's template wrote an empty <think></think> in its place
            one = {"thinking": reasoning, **one, "reasoning_content": reasoning}
        checked.append(one)
    return checked


# The names of a message's reasoning, as transformers aliases them (the first is the one templates read).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render it as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=16)
def _compile(source: str, name: str):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes; templates expect plain JSON (as in transformers).
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    where = "the model's chat template" if name == "model" else f"chat template {name!r}"
    error = ConfigError if name == "model" else InputError
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise error(f"{where} is not valid Jinja: {e.message} (line {e.lineno})") from e
    except (RecursionError, SyntaxError) as e:
        # Jinja compiles a template to Python code: nesting past Python's own limits (a few hundred {% if %}, 20
        # {% for %}, a long chain of + or parentheses) raised a bare RecursionError, IndentationError or
        # "too many statically nested blocks" SyntaxError from the compiler
        why = e.msg if isinstance(e, SyntaxError) else str(e)
        raise error(f"{where} is nested too deeply to compile ({why}): flatten its blocks or expressions") from e

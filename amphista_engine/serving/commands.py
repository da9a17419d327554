"""`amphista serve`: the argparse subcommand; amphista_engine/cli.py adds it with `register(sub)`."""
from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = (
    "An OpenAI-compatible HTTP server (standard library only): POST /v1/chat/completions and /v1/completions "
    "(streamed as Server-Sent Events with \"stream\": true), OpenAI's Responses API (POST /v1/responses) and "
    "Anthropic's Messages API (POST /v1/messages), GET /v1/models and /health, and GET /metrics "
    "(Prometheus text format: requests, tokens, runs and batch sizes, tau, timings). One engine decodes one run "
    "at a time (it has one KV cache), but a run may hold several requests: the requests waiting when a run starts "
    "are decoded together, up to --max-batch of them, where their options are identical once the defaults are "
    "filled in (temperature, top_p, top_k, min_p, repetition_penalty, stop, seed, speculative, tree, "
    "prediction, chat_template, chat_template_kwargs; max_tokens may differ: each row ends at its own); a request "
    "with a seed that samples runs alone, so that its answer stays the same; one that arrives during a run waits for "
    "the next. --max-batch 1 decodes one request at a time. The sampling flags set what a request that leaves the "
    "field out gets (--temperature 0, the default: greedy; "
    "--max-new-tokens: max_tokens, cut to the room the prompt leaves in --max-seq-len); a request may also send "
    "the non-OpenAI fields speculative (auto, amphista, medusa, lookup, amphista+lookup, none), tree, top_k, "
    "min_p and repetition_penalty, and OpenAI's prediction (drafted from by prompt lookup). POST /tokenize and /detokenize "
    "(vLLM's) count and decode tokens as the completions endpoints prefill them. --api-key (or AMPHISTA_API_KEY) "
    "makes every path but /health and /metrics ask for 'Authorization: Bearer KEY' (or Anthropic's 'x-api-key: "
    "KEY'). Ctrl-C stops it.")


API_KEY_ENV = "AMPHISTA_API_KEY"     # read where --api-key is not given (as vLLM reads VLLM_API_KEY)


def api_key(args) -> str | None:
    """The server's API key: --api-key, else $AMPHISTA_API_KEY (an empty one: none), else None. Checked here, before
    the model loads; a refusal never quotes the key."""
    from ..errors import InputError
    from .server import check_api_key
    key, source = args.api_key, "--api-key"
    if key is None:
        key, source = os.environ.get(API_KEY_ENV) or None, API_KEY_ENV
    try:
        check_api_key(key)
    except InputError as e:
        raise InputError(f"{source}: {e}") from None
    return key


# what a request that leaves a sampling field out gets without a flag or a generation_config.json (greedy)
BUILTIN_SAMPLING = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def sampling_defaults(args, per_request: bool = True) -> dict:
    """Fills args' sampling flags left unset: from the model's generation_config.json under --generation-config auto
    (vLLM's default: the sampling its authors recommend, e.g. Qwen3's temperature 0.6, top_p 0.95, top_k 20), else
    the built-in greedy ones. Returns what was taken from the file (named on stderr). per_request: the server's
    defaults for requests (False: `amphista generate` / `chat`, this run's own sampling)."""
    from ..loading import generation_defaults
    gen, file = (generation_defaults(args.model, missing_ok=not per_request) if args.generation_config == "auto"
                 else ({}, None))
    if not per_request and args.temperature == 0:
        # this run greedy by flag: the file's nucleus settings would do nothing (and be warned of as typed flags); a
        # server keeps them, for requests that send a temperature
        gen = {k: v for k, v in gen.items() if k not in ("top_k", "top_p", "min_p")}
    taken = {}
    for key, builtin in BUILTIN_SAMPLING.items():
        if getattr(args, key) is None:
            setattr(args, key, gen.get(key, builtin))
            if key in gen:
                taken[key] = gen[key]
    who, overrides = (("request defaults", "a request's own fields and the sampling flags override them")
                      if per_request else ("sampling", "the sampling flags override them"))
    if taken:
        said = ", ".join(f"{k} {v}" for k, v in taken.items())
        print(f"{who} from {file}: {said} ({overrides}; --generation-config none: greedy)", file=sys.stderr, flush=True)
    return taken


# vLLM's --tool-call-parser names of the formats tools.py reads (llama4_json: vLLM's other name for llama3_json)
TOOL_CALL_PARSERS = {"hermes": "hermes", "llama3_json": "llama3_json", "llama4_json": "llama3_json",
                     "mistral": "mistral"}


def vllm_flags(args) -> bool:
    """vLLM's flags that ask for what this server does anyway, checked before the load (a name it does not read is
    refused by name): returns --cache-prompt, which --enable-prefix-caching turns on."""
    from ..errors import InputError
    parser = args.tool_call_parser
    if parser is not None and parser not in TOOL_CALL_PARSERS:
        raise InputError(f"--tool-call-parser {parser}: this server reads tool calls in the hermes, llama3_json "
                         f"(llama4_json) and mistral formats only, whichever the chat template writes (no flag "
                         f"needed); a model that writes {parser}'s format is not supported")
    for name in args.served_model_name or ():
        if not name.strip():
            raise InputError("--served-model-name takes non-empty names (the model id /v1/models lists and replies "
                             "carry)")
    if args.cache_prompt and args.enable_prefix_caching is False:
        raise InputError("--cache-prompt and --no-enable-prefix-caching ask for opposite things (prefix caching is "
                         "--cache-prompt here); drop one of them")
    return args.cache_prompt or args.enable_prefix_caching is True


def check_tool_call_parser(args, engine) -> None:
    """--tool-call-parser against the format the loaded model's chat template (or --chat-template) writes, which is
    the one read: another is refused by name rather than ignored."""
    from ..errors import InputError
    from ..tools import tool_call_format
    if args.tool_call_parser is None:
        return
    fmt = tool_call_format(engine.tokenizer, engine.chat_template)
    if TOOL_CALL_PARSERS[args.tool_call_parser] != fmt:
        what = "--chat-template" if engine.chat_template is not None else "the model's chat template"
        raise InputError(f"--tool-call-parser {args.tool_call_parser}: tool calls are read in the format "
                         f"{what} has the model write, {fmt} here (one that never mentions tools gets Hermes' "
                         f"instructions); leave out --tool-call-parser, or give --tool-call-parser {fmt}")


def cmd_serve(args) -> int:
    from ..cli import _load
    from ..errors import InputError
    from ..sampling import SamplingParams
    from .server import OpenAIApp, bind

    # the port first: one in use is named before seconds of loading, and clients that connect while the model
    # loads wait in the listen queue rather than being refused
    httpd = bind(args.host, args.port)
    try:
        if args.max_batch < 1:      # named before the load, as a flag
            raise InputError(f"--max-batch must be at least 1 (1: one request at a time), got {args.max_batch}")
        key = api_key(args)
        cache_prompt = vllm_flags(args)
        sampling_defaults(args)
        SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed,  # named here
                       min_p=args.min_p)
        # --max-new-tokens is the default of requests without max_tokens, cut to the room each prompt leaves: a
        # --max-seq-len 256 server is not refused for the default 512 (generate refuses it: one prompt, one answer)
        from ..engine import DEFAULT_MAX_SEQ_LEN
        over = {"max_new_tokens": min(args.max_new_tokens, max(1, (args.max_seq_len or DEFAULT_MAX_SEQ_LEN) - 1))}
        if args.temperature == 0:
            # _load warns that --seed/--top-p/--top-k do nothing with greedy decoding: here they are the defaults
            # of requests that sample (send a temperature), so they do something
            over.update(top_k=0, top_p=1.0, min_p=0.0, seed=None)
        load_args = argparse.Namespace(**{**vars(args), **over})
        engine, speculative, tree, _ = _load(load_args)
        check_tool_call_parser(args, engine)
        defaults = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        stop=args.stop or None, seed=args.seed)
        httpd.app = OpenAIApp(engine, model_id=args.served_model_name or args.model, speculative=speculative,
                              tree=tree if speculative is not None else None, defaults=defaults, quiet=args.quiet,
                              max_batch=args.max_batch, cache_prompt=cache_prompt, continuous=args.continuous,
                              api_key=key, reasoning_parser=args.reasoning_parser,
                              trust_request_chat_template=args.trust_request_chat_template)
        method = "plain decoding" if speculative is None else f"speculative {speculative}" + (
            f", tree {tree}" if tree else "")
        batching = "one request at a time" if args.max_batch == 1 else \
            f"concurrent requests batched, up to {args.max_batch} rows" + (
                ", joining runs as rows free up" if args.continuous else " a run")
        auth = "; API key required" if key else ""      # that one is asked, never the key itself
        if args.reasoning_parser != "none":
            auth += f"; reasoning parser {args.reasoning_parser}"
        named = f" as {', '.join(httpd.app.model_ids)}" if args.served_model_name else ""
        print(f"serving {args.model}{named} ({method}) at {httpd.url}/v1 (OpenAI-compatible; {batching}{auth}; "
              f"Ctrl-C stops)", file=sys.stderr, flush=True)
        httpd.serve_forever()
    finally:
        httpd.server_close()
    return 0


def register(sub) -> None:
    """Adds the serve subcommand to an argparse subparsers object."""
    from ..cli import _add_decoding_args, _add_model_args, _add_sampling_args, _int, add_template_arg
    from ..reasoning import REASONING_PARSERS

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                       "/v1/responses; Anthropic's /v1/messages); concurrent requests decoded together",
                       description=DESCRIPTION)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    s.add_argument("--port", type=_int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    _add_model_args(s)
    _add_decoding_args(s)
    _add_sampling_args(s, max_new_tokens=512, per_run=False)     # the rest are per request
    add_template_arg(s)     # the defaults of requests that send no chat_template / chat_template_kwargs
    s.add_argument("--served-model-name", nargs="+", metavar="NAME", default=None,
                   help="vLLM's: the model id(s) /v1/models lists (each of them) and replies carry (the first); "
                   "default: --model as given")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="vLLM's: a chat request may send its own chat_template (Jinja, run in a sandbox, in the request's "
                   "own thread: its CPU time is the server's). Off by default: such a request is a 400")
    s.add_argument("--max-batch", type=_int, default=8, metavar="N",
                   help="the most requests decoded together in one run (default 8; 1: one request at a time). The "
                   "KV cache holds N rows of --max-seq-len (checked against free memory at start)")
    s.add_argument("--cache-prompt", action="store_true",
                   help="a request decoded alone starts from the KV cache's copy of the last such request's prompt "
                   "+ answer, so a chat's next turn prefills only its new messages (llama.cpp's cache_prompt; a "
                   "request's \"cache_prompt\" field overrides it). Off by default: the reused K/V were computed "
                   "by that earlier run, so an answer may differ from a fresh one in the last bits")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM's, taken as --cache-prompt: the prefix kept is the last request decoded alone (its "
                   "prompt + answer), not vLLM's shared block cache. --no-enable-prefix-caching: off, the default "
                   "here")
    s.add_argument("--no-continuous-batching", dest="continuous", action="store_false",
                   help="a request that arrives while a run decodes waits for the next run (by default it joins the "
                   "run between two steps, in a row that ended or was free, where it can share it)")
    s.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default="none",
                   help="vLLM's: a chat answer's <think>...</think> text goes in message.reasoning_content (streamed: "
                   "delta.reasoning_content), the rest in content, which alone is read for tool calls. qwen3 (Qwen3, "
                   "SmolLM3): reasoning only where the answer opens with <think>; deepseek_r1 (DeepSeek-R1 distills, "
                   "Qwen3 thinking-only models, whose template opens <think> in the prompt): all before </think>. "
                   "Default none: the answer as the model wrote it")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's, accepted and not needed: tool calls are always read (tool_choice auto, required "
                   "or a named function), in the format the chat template writes")
    s.add_argument("--tool-call-parser", metavar="NAME", default=None,
                   help="vLLM's, accepted where it names the format read anyway, the one the chat template writes: "
                   "hermes, llama3_json (or llama4_json) or mistral; another name, or one the template does not "
                   "write, is refused")
    s.add_argument("--quiet", action="store_true", help="no log line per request on stderr")
    s.add_argument("--api-key", metavar="KEY", default=None,
                   help=f"requests must send 'Authorization: Bearer KEY' or 'x-api-key: KEY' (401 otherwise; "
                   f"/health and /metrics stay open). Default: ${API_KEY_ENV} where set, else no key. The environment "
                   f"variable keeps the key out of the process list")
    # unset sampling flags are filled by sampling_defaults: a flag given, the model's generation_config, else greedy
    s.set_defaults(func=cmd_serve)

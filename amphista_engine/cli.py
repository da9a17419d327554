"""`amphista` command line. Answers go to stdout; progress, timing and errors to stderr."""
from __future__ import annotations

import argparse
import codecs
import functools
import json
import os
import re
import signal
import stat
import sys
import warnings
from pathlib import Path

from .errors import HUGE_INT_DIGITS, AmphistaError, InputError, ModelLoadError, read_json, refuse_huge_ints
from .text_files import missing_note, read_utf8, user_path


def _weights_line(engine) -> str:
    """How the target's linears run, how many of them run int8 rows (a Q4_K_M file's wider layers), and the bytes
    its weights hold."""
    from .kernels import cpu_quant
    linears = [m for m in engine.model.layers.modules() if cpu_quant.on_codes(m)]
    wide = sum(type(m) is cpu_quant.Int8Linear for m in linears)
    rows = f", {wide} of {len(linears)} layer linears int8 rows (the file's wider layers)" if wide else ""
    return f"{engine.linears.describe()}{rows}; {cpu_quant.weight_bytes(engine.model) / 2**30:.2f} GiB"


def _int(text: str) -> int:
    """argparse's type=int for the integer flags, where a number far too long to mean anything is named by its
    length: argparse quoted all its digits back, and int() itself refuses one past 4300 of them."""
    digits = text.strip().lstrip("+-").replace("_", "")
    if len(digits) > HUGE_INT_DIGITS and digits.isascii() and digits.isdigit():
        raise argparse.ArgumentTypeError(f"an integer of {len(digits)} digits: far out of range")
    return int(_ascii(text))


def _ascii(text: str) -> str:
    """The text of a number flag, refused (ValueError, as int() and float() refuse) where it is not ASCII: int() and
    float() read any script's digits (--logit-bias ٣=5 biased token 3, ３ was 3 tokens, --temperature ٠٫٥ was 0.5)."""
    if not text.isascii():
        raise ValueError(text)
    return text


def _float(text: str) -> float:
    """argparse's type=float for the float flags, in ASCII digits only (_ascii)."""
    return float(_ascii(text))


_int.__name__ = "int"       # argparse's "invalid int value: 'x'" for what int() refuses, as before
_float.__name__ = "float"


def _add_quant_arg(p: argparse.ArgumentParser):
    p.add_argument("--quant", default="auto", choices=["auto", "q4", "none"],
                   help="CPU weights: auto (default) keeps a GGUF file's 4-bit layers 4-bit (int4 kernel, int8 LM "
                        "head; a Q4_K_M file's wider layers int8); q4 quantizes any model to 4 bits; none multiplies "
                        "dequantized weights in --dtype")


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m",
                   help="checkpoint directory, .gguf file, or alias (default: smollm2-135m, the embedded model)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="weights and cache dtype (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--max-seq-len", type=_int, default=None,
                   help="static KV cache length: prompt + answer (default 2048)")
    # its own action, not a second name of --max-seq-len's: argparse's errors name the flag that was typed
    p.add_argument("--max-model-len", type=_int, default=None, dest="max_seq_len", metavar="MAX_SEQ_LEN",
                   help="vLLM's name for --max-seq-len")
    _add_quant_arg(p)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay decode steps from CUDA graphs (GPU only; on by default, --no-cuda-graphs for eager)")


def _add_decoding_args(p: argparse.ArgumentParser):
    p.add_argument("--heads", default="default",
                   help="drafting-heads directory; 'default' = the heads shipped for the model if any (Amphista, "
                   "or those of --speculative); a shipped heads name (smollm2-135m-amphista, smollm2-135m-medusa); "
                   "'none' = plain decoding. --speculative lookup loads none")
    p.add_argument("--speculative", default="auto",
                   choices=["auto", "amphista", "medusa", "lookup", "amphista+lookup", "medusa+lookup", "none"],
                   help="drafting method (auto: whatever --heads holds, if a quick timing on the CPU says it is "
                        "faster than plain decoding there; lookup: prompt lookup decoding, drafts copied from the "
                        "prompt and the answer so far, for any model and without heads; amphista+lookup: the heads' "
                        "tree and the lookup's chain verified together; none: plain decoding)")
    p.add_argument("--tree", default=None, help="static tree name (e.g. mc_sim_7b_63, mix-8), dynamic-N, a JSON path "
                   "list, or auto: the fastest here of the trees the heads record a tau for (the default under "
                   "--speculative auto); --speculative lookup takes chain-K (K 1-16; default chain-7 on a GPU, "
                   "chain-4 on a CPU); amphista+lookup takes the heads' tree, or TREE+chain-K to size the chain")


def add_template_arg(p: argparse.ArgumentParser):
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_JINJA",
                   help="the chat template in place of the model's own, as vLLM's --chat-template: a Jinja file, "
                        "or the template itself where the value is no file and holds '{', '}' or a newline (its "
                        "escapes, such as \\n, decoded as vLLM does; also a built-in name: chatml, vicuna_v1.1). "
                        "Its end-of-turn tokens end answers; tool calls are read in the format it writes")
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help='more variables for the model\'s chat template, as a JSON object, e.g. '
                        '\'{"enable_thinking": false}\' (Qwen3: answer without a <think> block)')


def _chat_template(args) -> str | None:
    """--chat-template's template, checked before the load (one that does not parse is named now, not at the first
    chat). As vLLM decides: a file where the value opens as one, else the value itself where it holds '{', '}' or
    a newline; else a built-in name, or a path that is not there."""
    from .chat import BUILTIN_TEMPLATES, check_chat_template
    value = getattr(args, "chat_template", None)
    if value is None:
        return None
    path = user_path(value)
    if _readable_file(path):
        template = _read_flag_file("--chat-template", value, path)
        what = f"--chat-template {value!r} (the file's template)"
    elif any(c in value for c in "{}\n"):
        if bad := _not_utf8(value):      # its prompts were refused as "the prompt's text", after the load
            raise InputError(f"--chat-template is {bad}")
        template, what = _unescaped(value), "--chat-template"
        if bad := _not_utf8(template):   # an escape such as \ud800
            raise InputError(f"--chat-template is {bad}, after its escapes are decoded")
    elif value in BUILTIN_TEMPLATES:
        return value
    else:
        kind = ("is a directory, not a file" if os.path.isdir(path) else "is not a file" if os.path.exists(path)
                else "no such file" + missing_note(path))
        raise InputError(f"--chat-template {value!r}: {kind}; give a Jinja template file, the template itself "
                         f"(text with {{% ... %}} or {{{{ ... }}}}), or a built-in name "
                         f"({', '.join(BUILTIN_TEMPLATES)})")
    return check_chat_template(template, what)


# a backslash escape as Python's unicode_escape codec reads one; any other backslash is kept as it is
_ESCAPE = re.compile(r"\\(?:U[0-9a-fA-F]{8}|u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|N\{[^}]*\}|[0-7]{1,3}|.)", re.S)
_SIMPLE_ESCAPES = "\\'\"abfnrtv\n"


def _unescaped(value: str) -> str:
    """An inline --chat-template with its escapes decoded, as vLLM's load_chat_template does (codecs.decode(value,
    "unicode_escape")): a shell passes `\\n` typed in quotes as two characters, which the template wanted as a line
    break. Escape by escape, so that characters past ASCII are not garbled (the codec reads the text's UTF-8
    bytes as Latin-1: '中' became three characters), and a backslash before another character is kept (the codec
    warns of it)."""
    def one(m: re.Match) -> str:
        escape = m.group()
        if escape[1] not in _SIMPLE_ESCAPES + "01234567UuxN":
            return escape
        try:
            if escape[1] in "Uux" and len(escape) == 2:     # too few hex digits for the pattern
                raise UnicodeDecodeError("unicode_escape", b"", 0, 1, "truncated escape")
            return codecs.decode(escape, "unicode_escape")
        except UnicodeDecodeError:
            shown = value[m.start():m.start() + 12]
            raise InputError(f"--chat-template has a bad escape at {shown!r}: an inline template's escapes are "
                             f"decoded, as vLLM decodes them (\\x takes 2 hex digits, \\u 4, \\U 8, \\N{{name}}); "
                             f"write \\\\ for a backslash") from None
    return _ESCAPE.sub(one, value)


def _readable_file(path: str) -> bool:
    """A file to read a template from: a regular file, or a pipe (the shell's process substitution,
    `--chat-template <(curl ...)`, is /dev/fd/N, which os.path.isfile calls no file), as vLLM's open() takes it."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(mode) or stat.S_ISFIFO(mode)


def _template_kwargs(args) -> dict:
    from .chat import check_template_variables
    text = getattr(args, "chat_template_kwargs", None)
    if text is None:
        return {}
    try:
        value = read_json(text)
    except ValueError as e:
        raise InputError(f"--chat-template-kwargs must be a JSON object, e.g. '{{\"enable_thinking\": false}}' "
                         f"({e})") from None
    refuse_huge_ints({"--chat-template-kwargs": value})
    try:
        return check_template_variables(value)
    except InputError as e:
        raise InputError(str(e).replace("chat_template_kwargs", "--chat-template-kwargs", 1)) from None


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256, per_run: bool = True):
    """per_run: also the options a server takes per request only (penalties, logit bias, ignore_eos)."""
    # the default named: chat's 512 is not the API's 256 (generate's is)
    p.add_argument("--max-new-tokens", type=_int, default=max_new_tokens,
                   help=f"the most tokens an answer gets (default {max_new_tokens})" if per_run else
                   f"max_tokens of requests that send none (default {max_new_tokens})")
    # None: unset, filled by serving.commands.sampling_defaults (the model's generation_config.json, else greedy)
    p.add_argument("--temperature", type=_float, default=None,
                   help="0 = greedy (default, unless the model's generation_config.json samples)")
    p.add_argument("--top-k", type=_int, default=None)
    p.add_argument("--top-p", type=_float, default=None)
    p.add_argument("--min-p", type=_float, default=None,
                   help="min-p sampling: keep tokens at least MIN_P times as likely as the most likely one (0 = off)")
    p.add_argument("--repetition-penalty", type=_float, default=None)
    what = "requests that leave" if not per_run else "unset"
    p.add_argument("--generation-config", choices=("auto", "none"), default="auto",
                   help=f"auto (default, as vLLM and transformers): {what} temperature, top_p, top_k, min_p or "
                   "repetition_penalty take the model's generation_config.json values (where it samples: "
                   "\"do_sample\": true; GGUF files and the embedded model have none), a flag given wins over them; "
                   "none: the flags' own defaults (greedy)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=_int, default=None)
    if per_run:
        p.add_argument("--presence-penalty", type=_float, default=0.0,
                       help="OpenAI's, on the answer's tokens so far")
        p.add_argument("--frequency-penalty", type=_float, default=0.0,
                       help="OpenAI's, per repeat of a token in the answer")
        p.add_argument("--logit-bias", action="append", metavar="ID=VALUE",
                       help="add VALUE to token ID's logit at every step (repeatable; -100 bans it)")
        p.add_argument("--ignore-eos", action="store_true",
                       help="go on past end-of-sequence tokens, to --max-new-tokens (fixed-length runs)")
        p.add_argument("--min-tokens", type=_int, default=0,
                       help="no end-of-sequence (or --stop-token-id) token before this many tokens, nor a --stop "
                            "string that completes in them")
        p.add_argument("--stop-token-id", type=_int, action="append", dest="stop_token_ids", metavar="ID",
                       help="a token id that ends the answer as EOS does (repeatable)")
        # the API's (and the server's) vLLM options, which the commands had no flag for
        p.add_argument("--include-stop-str-in-output", action="store_true",
                       help="keep the --stop string that ended the answer in its text")
        p.add_argument("--bad-word", action="append", dest="bad_words", metavar="WORD",
                       help="a word never generated, with or without a leading space (vLLM's bad_words; repeatable)")
        p.add_argument("--allowed-token-id", type=_int, action="append", dest="allowed_token_ids", metavar="ID",
                       help="generate only these token ids (repeatable; vLLM's allowed_token_ids)")
        p.add_argument("--truncate-prompt-tokens", type=_int, default=None, metavar="N",
                       help="keep only the prompt's last N tokens (after the chat template)")
        form = p.add_mutually_exclusive_group()
        form.add_argument("--json-object", action="store_true",
                          help="answer with a JSON object (response_format json_object)")
        form.add_argument("--json-schema", metavar="FILE_OR_JSON",
                          help="answer with JSON valid under this schema (a file, or the schema inline)")
        form.add_argument("--regex", help="answer with text that matches this regular expression")
        form.add_argument("--grammar", metavar="FILE", help="answer with text of this Lark grammar (llguidance's)")


def _logit_bias(args) -> dict | None:
    """--logit-bias ID=VALUE flags as {id: value}; a malformed one is named."""
    out = {}
    for item in getattr(args, "logit_bias", None) or ():
        tok, sep, value = item.partition("=")
        try:
            out[_int(tok)] = _float(value)
        except ValueError:
            sep = ""
        except argparse.ArgumentTypeError as e:      # a token id of thousands of digits: not quoted back
            raise InputError(f"--logit-bias: the token id is {e}") from None
        if not sep:
            raise InputError(f"--logit-bias takes TOKEN_ID=VALUE (e.g. --logit-bias 13=-100), got {item!r}")
    return out or None


def _response_format(args) -> dict | None:
    """--json-object / --json-schema / --regex / --grammar as a response_format (structured.py), or None."""
    if getattr(args, "json_object", False):
        return {"type": "json_object"}
    if getattr(args, "regex", None) is not None:
        return {"type": "regex", "regex": args.regex}
    schema, grammar = getattr(args, "json_schema", None), getattr(args, "grammar", None)
    # a quoted "~/g.lark" (or --grammar=~/g.lark) reaches us unexpanded: "no such file", or a schema read as JSON
    grammar = user_path(grammar)
    if schema is not None and schema.startswith("~") and os.path.isfile(user_path(schema)):
        schema = user_path(schema)
    if grammar is not None:
        if not os.path.isfile(grammar):
            raise InputError(f"--grammar {grammar!r}: no such file (a Lark grammar, as llguidance reads it)")
        return {"type": "grammar", "grammar": read_utf8(Path(grammar))}
    if schema is None:
        return None
    text = read_utf8(Path(schema)) if os.path.isfile(schema) else schema
    try:
        value = read_json(text)
    except ValueError as e:
        what = f"the file {schema!r}" if os.path.isfile(schema) else "its value (neither a file nor inline JSON)"
        raise InputError(f"--json-schema: {what} is not valid JSON ({e})") from None
    refuse_huge_ints({"--json-schema": value})
    return {"type": "json_schema", "json_schema": {"schema": value}}


def _read_flag_file(name: str, value: str, path) -> str:
    """A flag's file (value as given, path resolved) read as UTF-8 text, its errors said of the flag."""
    try:
        return read_utf8(Path(path))
    except InputError as e:
        raise InputError(f"{name} {e}") from None
    except OSError as e:        # unreadable (permissions, I/O): said of the flag, never a bare trace
        raise InputError(f"{name} {value!r}: cannot read it ({e.strerror or e})") from None


def _prediction(args) -> str | None:
    """The text of --prediction or --prediction-file (None: neither given), read and checked before the load, as the
    prompt is, and refused with a --speculative that never drafts from it."""
    text, path = getattr(args, "prediction", None), getattr(args, "prediction_file", None)
    if path is not None:
        given, path = path, user_path(path)
        flag = f"--prediction-file {given!r}"
        if not _readable_file(path):
            kind = ("is a directory, not a file" if os.path.isdir(path) else "is not a file" if os.path.exists(path)
                    else "no such file" + missing_note(path))
            raise InputError(f"{flag}: {kind}; give a UTF-8 text file of the answer's expected text, or the text "
                             f"itself with --prediction")
        text = _read_flag_file("--prediction-file", given, path)
        text = text.removeprefix("\ufeff")     # a byte order mark (a file saved by Notepad) is no answer text
    elif text is not None:
        flag = "--prediction"
        if bad := _not_utf8(text):
            raise InputError(f"--prediction is {bad}")
    else:
        return None
    if not text.strip():
        # the engine drafts from nothing there: a run that silently ignores the flag (a wrong file, an empty $VAR)
        raise InputError(f"{flag} is empty: give the answer's expected text (e.g. the file being edited)")
    if args.speculative in ("none", "amphista", "medusa"):
        raise InputError(f"{flag.split()[0]} drafts for prompt lookup decoding, which --speculative "
                         f"{args.speculative} never uses: pass --speculative auto (the default), lookup, "
                         f"amphista+lookup or medusa+lookup with it, or leave one of them out")
    return text


def _load(args, prompt=None):
    """The engine, and how it decodes: (engine, speculative method or None, tree, speculation check or None)."""
    from .engine import DEFAULT_MAX_SEQ_LEN, Engine, check_max_new_tokens, check_stop
    from .sampling import SamplingParams
    from .shipped_heads import resolve_heads

    if None in (args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty):  # generate, chat
        from .serving.commands import sampling_defaults
        sampling_defaults(args, per_request=False)
    # The decoding flags are checked before the load and the speculation timing (seconds), not after them.
    SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed,
                   getattr(args, "presence_penalty", 0.0), getattr(args, "frequency_penalty", 0.0), _logit_bias(args),
                   args.min_p)
    check_max_new_tokens(args.max_new_tokens)
    check_stop(args.stop)
    if hasattr(args, "json_schema"):
        from .structured import grammar_source
        flag = next((f for f, given in (("--json-schema", args.json_schema), ("--regex", args.regex),
                                        ("--grammar", args.grammar)) if given is not None),
                    "--json-object" if args.json_object else None)
        form = _response_format(args)      # its own errors name the flag already
        try:
            grammar_source(form)
        except InputError as e:     # "response_format type 'regex' needs...": the flag the user typed
            raise InputError(f"{flag}: {e}") from None
        # the engine refuses these at the run, after the load and in its own terms (ignore_eos, response_format)
        if flag is not None and (args.ignore_eos or args.min_tokens):
            raise InputError(f"{'--ignore-eos' if args.ignore_eos else '--min-tokens'} does not mix with {flag}: a "
                             "constrained answer ends by EOS where its format is complete, and nowhere else")
    template_kwargs = _template_kwargs(args)
    chat_template = _chat_template(args)
    for stop in args.stop or ():      # bytes that are not UTF-8 (argv's surrogates) could never match the text
        if bad := _not_utf8(stop):
            raise InputError(f"a --stop string is {bad}")
    if args.temperature == 0:
        # A script that always passes --seed or --top-p got greedy text with no word that they did nothing
        unused = [flag for flag, off in ((f"--top-k {args.top_k}", args.top_k == 0),
                                         (f"--top-p {args.top_p}", args.top_p == 1.0),
                                         (f"--min-p {args.min_p}", args.min_p == 0.0),
                                         (f"--seed {args.seed}", args.seed is None)) if not off]
        if unused:
            warnings.warn(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect with greedy "
                          f"decoding (--temperature 0, the default): add --temperature T to sample")
    if args.quant == "q4" and str(args.device or "").split(":")[0] == "cuda":   # named before the load, as a flag
        raise InputError(f"--quant q4 runs on the CPU only (--device {args.device}); use --quant auto or none there")
    if args.max_seq_len is not None and args.max_seq_len < 2:    # named as what it is, not as no room left
        raise InputError(f"--max-seq-len must be at least 2 (the static KV cache's length), got {args.max_seq_len}")
    if args.max_new_tokens >= (args.max_seq_len or DEFAULT_MAX_SEQ_LEN):
        raise InputError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the cache "
                         f"(--max-seq-len {args.max_seq_len or DEFAULT_MAX_SEQ_LEN}); raise --max-seq-len or lower "
                         f"--max-new-tokens")
    from .shipped_heads import check_lookup_heads, heads_dir
    lookup = args.speculative == "lookup"
    if lookup:      # before --heads is read, and the load: a lookup run loads no heads, and verifies a chain
        check_lookup_heads(args.heads)
        from .errors import ConfigError
        from .prompt_lookup import MAX_DEPTH, chain_depth, default_depth
        try:
            chain_depth(args.tree, "cpu")
        except ConfigError:
            raise InputError(f"--tree {args.tree}: --speculative lookup drafts one token per depth, a chain: give "
                             f"--tree chain-K with K in 1..{MAX_DEPTH}, or leave --tree out (chain-"
                             f"{default_depth('cuda')} on a GPU, chain-{default_depth('cpu')} on a CPU)") from None
    if args.heads not in ("default", "none") or Path(args.heads).exists():
        # a typo'd shipped name or a missing directory is named before the load, as eval and bench name theirs
        args.heads = str(heads_dir(args.heads, args.model, "--heads"))
    if args.tree is not None and (args.speculative == "none" or args.heads == "none"):
        raise InputError(f"--tree {args.tree} applies to speculative decoding, but --"
                         + ("speculative none" if args.speculative == "none" else "heads none") + " decodes plainly")
    print(f"loading {args.model} ...", file=sys.stderr)
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                                    cuda_graphs=args.cuda_graphs, quant=args.quant, chat_template=chat_template)
    engine.chat_template_kwargs = template_kwargs
    if engine.quant == "q4":
        print(f"weights: {_weights_line(engine)} (--quant none for {str(engine.dtype).removeprefix('torch.')})",
              file=sys.stderr)
    if engine.device.type == "cpu" and str(engine.dtype) == "torch.float16":
        # measured on an AVX2 EPYC, 2 threads: 18-19 tokens/s in fp16, ~150-190 with the default fp32
        print("note: fp16 on a CPU runs torch's reference ops (the cpu backend's kernels take fp32 and bf16): "
              "several times slower than the default fp32 (--dtype fp32) or bf16", file=sys.stderr)
    if lookup:      # no heads to load, nor a speculation check to time them: the drafts are the text's own
        return engine, "lookup", args.tree, None
    with_lookup = args.speculative.endswith("+lookup")
    speculative = resolve_heads(engine, args.heads, args.speculative.removesuffix("+lookup"))
    if with_lookup:         # the heads beside a lookup chain: the method asked for, no timing of the heads alone
        if speculative is None:
            raise InputError(f"--speculative {args.speculative} needs drafting heads, and none are shipped for "
                             f"{args.model}: pass --heads DIR, or --speculative lookup (no heads)")
        return engine, f"{speculative}+lookup", args.tree, None
    if speculative is None and args.tree is not None:     # no heads shipped for the model: plain, said above
        warnings.warn(f"--tree {args.tree} is not used: there are no drafting heads to draft with (--heads DIR)")
    check, tree = None, args.tree
    if speculative is not None and engine.device.type == "cpu":
        if prompt is not None:
            # a prompt the cache cannot hold is named before the seconds of timing below, not after them
            engine._check_room(engine.encode_prompt(prompt, args.chat), args.max_new_tokens, 0)
        # auto means "the faster of the two": on some CPUs a tree step costs more than the heads save; with no
        # --tree (or --tree auto) the check also picks the fastest of the heads' recorded trees
        kind = speculative
        speculative, tree, check = engine.resolve_speculation(
            "auto" if args.speculative == "auto" else kind, tree, args.temperature, args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, presence_penalty=getattr(args, "presence_penalty", 0.0),
            frequency_penalty=getattr(args, "frequency_penalty", 0.0))
        if check is not None:
            print(f"note: {check.reason}" + ("" if check.pays else f" (--speculative {kind} uses the heads anyway)"),
                  file=sys.stderr)
    if speculative is not None and args.speculative == "auto":
        # The engine resolves "auto" again at each run, from the verdict above (kept on the engine), and decodes
        # plainly, with a warning, where the tree's scratch slots do not fit the cache but the answer does.
        speculative, tree = "auto", args.tree
    return engine, speculative, tree, check


def _method(engine, result) -> str | None:
    """The drafting method a run used (speculative="auto" may have decoded plainly), or None: its stats' own word
    (a lookup run beside loaded heads is no run of theirs)."""
    extra = result.stats.extra
    if "tree" not in extra:
        return None
    return extra.get("method") or (engine.heads.config.kind if engine.heads is not None else None)


def _decoding_kwargs(args, speculative, tree) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=args.stop or None,
                seed=args.seed, speculative=speculative, tree=tree if speculative is not None else None,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                logit_bias=_logit_bias(args), ignore_eos=args.ignore_eos, min_tokens=args.min_tokens,
                stop_token_ids=args.stop_token_ids, response_format=_response_format(args),
                include_stop_str_in_output=args.include_stop_str_in_output, bad_words=args.bad_words,
                allowed_token_ids=args.allowed_token_ids, truncate_prompt_tokens=args.truncate_prompt_tokens)


def _stream_answer(engine, prompt, before=None, **kwargs):
    """Streams the answer to stdout and a stats line to stderr; returns the result. before(): called once the run
    is set up (its checks passed: engine.stream raises them at the call), before the first chunk."""
    chunks = engine.stream(prompt, **kwargs)
    if before is not None:
        before()
    written = False
    try:
        for chunk in chunks:
            _write(chunk)
            written = written or bool(chunk)
    except AmphistaError as e:
        # An error raised mid-answer (NonFiniteError): its "amphista: error:" line went to the end of the cut
        # answer's line on a terminal. Not for _StdoutError (stdout is what failed) nor Ctrl-C (the shell ends
        # the line of a job that SIGINT ended).
        if written and not isinstance(e, _StdoutError):
            _write("\n")
        raise
    _write("\n")
    result = engine.last_result
    speculative = _method(engine, result)
    method = f"{speculative} {result.stats.extra['tree']}" if speculative else "plain"
    print(f"[{method}] {result.stats.summary()} | finish: {result.finish_reason}", file=sys.stderr)
    return result


def _not_utf8(text: str, encoding: str = "UTF-8") -> str | None:
    """Python reads bytes that are not UTF-8 (on stdin, in argv) as lone surrogates, which the tokenizer refuses
    with a bare TypeError: what the first one was, or None. `encoding`: what the bytes were read as."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte {c - 0xDC00:#04x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        if encoding.lower().replace("-", "").replace("_", "") == "utf8":
            encoding, hint = "UTF-8", ""
        else:
            hint = f"; stdin is read as {encoding}: PYTHONIOENCODING=utf-8 reads UTF-8"
        return f"not {encoding} text ({what} at character {e.start}{hint})"


class _StdoutError(AmphistaError):
    """stdout is closed or cannot be written (a full disk): the answer has nowhere to go."""


def _stdin(what: str):
    """sys.stdin, reading bytes its encoding cannot decode as lone surrogates (named by _not_utf8) instead of
    raising UnicodeDecodeError from the codec (a UTF-8 locale or PYTHONIOENCODING decode strictly)."""
    if sys.stdin is None:
        raise InputError(f"stdin is closed: {what}")
    if getattr(sys.stdin, "errors", None) == "strict" and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    return sys.stdin


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _check_stdout():
    if sys.stdout is None:
        raise _StdoutError("stdout is closed: the answer has nowhere to go (redirect it to a file or /dev/null)")


def _write(text: str):
    """Writes answer text to stdout. A character stdout's encoding cannot show (PYTHONIOENCODING=ascii, a Latin-1
    terminal) is written as '?' with one warning, not a UnicodeEncodeError trace; a failed write is an error."""
    _check_stdout()
    try:
        try:
            sys.stdout.write(text)
        except UnicodeEncodeError:
            if not hasattr(sys.stdout, "reconfigure"):
                raise
            warnings.warn(f"stdout's encoding ({sys.stdout.encoding}) cannot show some characters of the answer: "
                          f"they are written as '?' (PYTHONIOENCODING=utf-8 writes them)")
            sys.stdout.reconfigure(errors="replace")
            sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise _StdoutError(f"cannot write the answer to stdout: {e.strerror or e}") from e


def _generate_prompt(args):
    """The prompt text ('-': all of stdin), as messages after a system message when --system is given."""
    stdin = _stdin("'-' reads the prompt from it") if args.prompt == "-" else None
    if stdin is not None and _isatty(stdin):
        # `amphista generate -` typed at a terminal waited in silence, as if the load had hung
        print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
    prompt = args.prompt
    if stdin is not None:
        # Only the line end that echo and editors add goes: rstrip() also took a raw prompt's trailing spaces
        # ("def f(x):\n    " lost the indentation the answer continues from, unlike the same prompt as an argument)
        prompt = stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
        prompt = prompt[:-1] if prompt.endswith("\r") else prompt
    if stdin is not None:
        prompt = prompt.removeprefix("\ufeff")     # a byte order mark (a file saved by Notepad) is no prompt text
    if not prompt.strip():
        raise InputError("prompt is empty" + (" (nothing on stdin)" if args.prompt == "-" else ""))
    encoding = getattr(stdin, "encoding", None) or "UTF-8"
    for what, text, enc in (("the prompt" + (" on stdin" if args.prompt == "-" else ""), prompt, encoding),
                            ("--system", args.system or "", "UTF-8")):
        if bad := _not_utf8(text, enc):
            raise InputError(f"{what} is {bad}")
    if args.system is None:
        return prompt
    if args.chat is False:
        raise InputError("--system needs the chat template; drop --no-chat")
    return [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]


def cmd_generate(args) -> int:
    if args.logprobs and not args.json:
        raise InputError("--logprobs goes with --json (the answer's token_logprobs are a JSON field)")
    from .engine import check_top_logprobs
    check_top_logprobs(args.top_logprobs)     # before the load: a bad N fails fast
    if args.top_logprobs and not (args.logprobs and args.json):
        raise InputError("--top-logprobs goes with --logprobs and --json (top_logprobs is a JSON field beside "
                         "token_logprobs)")
    for flag, value in (("--chat-template", args.chat_template),
                        ("--chat-template-kwargs", args.chat_template_kwargs)):
        if args.chat is False and value is not None:    # the kwargs were taken and did nothing
            raise InputError(f"{flag} applies to the chat template, which --no-chat turns off; drop one of them")
    _check_stdout()
    prompt = _generate_prompt(args)       # before the load: stdin and the flags fail fast
    prediction = _prediction(args)
    engine, speculative, tree, check = _load(args, prompt)
    if prediction is not None and speculative is None:
        # --speculative auto decoding plainly (--heads none, no heads shipped, heads slower here than plain steps):
        # the prediction is the lookup's to draft from, as the server decodes a request with one
        speculative, tree = "lookup", None
    kwargs = dict(_decoding_kwargs(args, speculative, tree), chat=args.chat, prediction=prediction)
    # the engine's errors name its arguments: main says them as the flags (_in_flag_terms)
    if args.json:
        result = engine.generate(prompt, logprobs=args.logprobs, top_logprobs=args.top_logprobs, **kwargs)
        out = result.to_dict()
        out["speculative"] = _method(engine, result)
        from .kernels import cpu_quant
        from .kernels.backend import resolve
        out["weights"] = {"dtype": str(engine.dtype).removeprefix("torch."), "quant": engine.quant,
                          "linears": engine.linears.describe(), "bytes": cpu_quant.weight_bytes(engine.model)}
        # the backend the hot ops ran on (AMPHISTA_BACKEND, else the device's default), as `amphista bench` reports
        # it: where the one asked for has no kernel here (cuda on a CPU) the ops say what they fell back to
        out["kernels"] = resolve("tree_attention", engine.device)
        if check is not None:
            out["speculation_check"] = check.to_dict()
        if prediction is not None:
            # OpenAI's completion_tokens_details, counted on the whole prediction, as the server counts them
            from .prompt_lookup import prediction_counts, prediction_ids
            accepted, rejected = prediction_counts(prediction_ids(engine.tokenizer, prediction), result.token_ids)
            out["stats"].update(accepted_prediction_tokens=accepted, rejected_prediction_tokens=rejected)
        _write(json.dumps(out) + "\n")
    else:
        _stream_answer(engine, prompt, **kwargs)
    return 0


# The engine's messages and warnings name its keyword arguments (Python callers want those names); generate's and
# chat's users set them with flags, so what these commands print names the flags instead: "longer than the cache
# (max_seq_len=128)" and "speculative=None, or 'auto'" meant nothing at the shell. The API name -> the flag.
_FLAGS = {"max_seq_len": "--max-seq-len", "max_new_tokens": "--max-new-tokens", "min_tokens": "--min-tokens",
          "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
          "presence_penalty": "--presence-penalty", "frequency_penalty": "--frequency-penalty",
          "stop_token_ids": "--stop-token-id", "logit_bias": "--logit-bias",
          "chat_template_kwargs": "--chat-template-kwargs", "speculative": "--speculative", "tree": "--tree",
          "top_logprobs": "--top-logprobs", "include_stop_str_in_output": "--include-stop-str-in-output",
          "bad_words": "--bad-word", "allowed_token_ids": "--allowed-token-id",
          "truncate_prompt_tokens": "--truncate-prompt-tokens"}
# name=value as the engine writes it (max_seq_len=128, speculative='auto', speculative=None): the flag with its value
# as it could be typed (--max-seq-len=128, --speculative=auto, --speculative=none); a bare snake_case name: its flag.
# The bare words speculative and tree stay English ("speculative decoding", "the tree's room").
_API_NAME = re.compile(r"\b(speculative|tree)=(?:'([^']*)'|(None)\b)|\b(" + "|".join(
    n for n in _FLAGS if "_" in n) + r")\b(?:=(-?[0-9][0-9.]*|'[^']*'))?")


def _in_flag_terms(message: str) -> str:
    """An engine message or warning with the API's argument names as the command's flags that set them."""
    message = message.replace("speculative=None, or 'auto'", "--speculative none or auto")
    # single words left alone below (English too), but the whole message is about the flag where it opens with one:
    # "temperature must be finite", "seed must be an integer ... or None" (no None to type), "stop strings must..."
    message = re.sub(r"\A(temperature|seed|stop) (must|strings must)", r"--\1 \2", message)
    if message.startswith("--seed "):
        message = message.replace(" or None, got", ", got", 1)

    def flag(m):
        if m[1]:
            return f"{_FLAGS[m[1]]}={m[2] if m[3] is None else 'none'}"
        return _FLAGS[m[4]] + (f"={m[5].strip(chr(39))}" if m[5] else "")
    return _API_NAME.sub(flag, message)


def _chat_turn(engine, system, history, turn, kwargs):
    """Answers `turn` after as much of `history` as fits in the cache, dropping (in place) the oldest exchanges
    that do not, with a note on stderr before the answer. Returns the result, or None when there is none to keep
    (interrupted, or `turn` alone too long)."""
    from .errors import CacheFullError

    kept = list(history)

    def drop():
        # Announced before the answer streams (it was printed after it, below the stats line): the reader knows
        # while reading it that the model no longer saw the start of the conversation. Dropped once announced.
        if len(kept) < len(history):
            n = (len(history) - len(kept)) // 2
            what = "the oldest exchange no longer fits" if n == 1 else f"the oldest {n} exchanges no longer fit"
            print(f"({what} the cache (--max-seq-len): dropped" + ("; the --system message stays)" if system else ")"),
                  file=sys.stderr)
            del history[:len(history) - len(kept)]

    while True:
        try:
            return _stream_answer(engine, system + kept + turn, before=drop, **kwargs)
        except KeyboardInterrupt:     # Ctrl-C stops this answer, not the conversation (at the prompt: quits)
            _write("\n")             # the cut answer ends its line on stdout too: the next one starts its own
            print("(interrupted: this exchange is not kept)", file=sys.stderr)
            return None
        except CacheFullError as e:
            if not kept:              # the message alone does not fit: the conversation stays as it was
                # The engine's advice, in the flags' terms, said once (the command's own "raise --max-seq-len or
                # lower --max-new-tokens" after it repeated it); "prompt" there is the whole rendered turn, not
                # what was typed, hence the note on what it holds.
                what = " even without the earlier exchanges" if history else ""
                prompt = "the message in the chat template" + (" after the --system message" if system else "")
                print(f"amphista: error: that message does not fit the cache{what}: {_in_flag_terms(str(e))} (the "
                      f"prompt: {prompt}). It was not sent (the conversation so far is kept)", file=sys.stderr)
                return None
            del kept[:2]              # the oldest exchange
            continue


CHAT_HELP = ("type a message; /reset starts a new conversation, /help shows this, /exit or /quit (or end of "
             "input) quits")
CHAT_COMMANDS = ("/reset", "/help", "/exit", "/quit")
# What /help and `amphista chat --help` add: what happens to a conversation that outgrows the cache.
CHAT_LIMITS = ("each line is a turn, answered with the conversation so far (a message of several lines: between "
               "\"\"\" and \"\"\", or end each line but the last with \\); Ctrl-C stops an answer (the exchange is "
               "not kept). When the conversation no longer fits --max-seq-len with room for --max-new-tokens, its "
               "oldest exchanges are left out (a note says so; the --system message stays); a message too long "
               "for the cache on its own is not sent")


class _Terminal:
    """stdin at a terminal, read through the readline module (GNU readline or libedit): line editing and the
    session's history (up arrow), where stdin.readline() put the arrow keys' escapes (^[[A) into the message.
    input() edits with readline only where sys.stdin and sys.stdout are fds 0 and 1 and terminals, and it writes
    its prompt and the echo to fd 1: fd 1 is stderr's terminal while it reads, so the prompt stays on stderr and
    answers redirected to a file (amphista chat > answers.txt) get none of it."""

    def __init__(self, stdin):
        self.encoding, self._pending = getattr(stdin, "encoding", None), []

    @classmethod
    def of(cls, stdin):
        """stdin as a _Terminal where it and stderr are terminals and readline imports; else stdin as it is (a
        pipe or file is read exactly as before, never through readline)."""
        try:
            if not (stdin.fileno() == 0 and sys.stdout.fileno() == 1 and os.isatty(0)
                    and os.isatty(sys.stderr.fileno())):
                return stdin
            import readline  # noqa: F401  (importing it is what makes input() edit lines)
        except (AttributeError, ValueError, OSError, ImportError):
            return stdin
        return cls(stdin)

    def isatty(self) -> bool:
        return True

    def readline(self, prompt: str = "") -> str:
        """A line with its newline, as stdin.readline() gives it ("" at the end of input: Ctrl-D)."""
        if not self._pending:
            sys.stdout.flush()
            stdout = os.dup(1)
            try:
                os.dup2(sys.stderr.fileno(), 1)
                text = input(prompt)
            except EOFError:
                return ""
            finally:
                os.dup2(stdout, 1)
                os.close(stdout)
            # A paste of several lines comes at once where an inputrc turns bracketed paste on: its lines are
            # taken one by one, as a pipe's (each a turn, or a '"""' block's)
            self._pending = [line + "\n" for line in text.split("\n")]
        return self._pending.pop(0)


def _read_line(stdin, prompt: str) -> str:
    """The prompt on stderr, then a line of stdin ("" at its end): at a terminal, read with line editing."""
    if isinstance(stdin, _Terminal):
        return stdin.readline(prompt)
    print(prompt, end="", file=sys.stderr, flush=True)
    return stdin.readline()


def _read_continued(stdin, first: str) -> str:
    """One message over several lines (pasted code: each line was answered as a turn of its own): from a line
    starting with \"\"\" to one ending with \"\"\" (as Ollama reads them), or lines ending in a backslash. Returns the
    message with its newlines; "" (no message, the input ended) where the input ends inside it."""
    quoted = first.strip().startswith('"""')
    lines, line = [], first
    while True:
        if quoted:
            body = line.strip() if not lines else line.rstrip("\r\n")
            if not lines:
                body = body[3:]
            if body.rstrip().endswith('"""') and (lines or len(line.strip()) >= 6):
                lines.append(body.rstrip()[:-3])
                return "\n".join(lines) + "\n"
            lines.append(body)
        else:
            body = line.rstrip("\r\n")
            if not body.endswith("\\"):
                lines.append(body)
                return "\n".join(lines) + "\n"
            lines.append(body[:-1])
        line = _read_line(stdin, "... ")
        if not line:
            print("\n(the input ended inside a multi-line message: not sent)", file=sys.stderr)
            return ""


def cmd_chat(args) -> int:
    """A conversation on stdin: each turn renders the whole history through the chat template and prefills what
    the cache does not hold yet (reuse_prefix). When the history no longer fits the cache with room for an answer,
    the oldest exchanges go (the prompt then changes at its start, so that turn is prefilled whole)."""
    if bad := _not_utf8(args.system or ""):
        raise InputError(f"--system is {bad}")
    stdin = _stdin("chat reads the conversation from it")     # before the load, as generate's checks
    _check_stdout()
    engine, speculative, tree, _ = _load(args)
    if engine.tokenizer.chat_template is None and engine.chat_template is None:
        from .chat import resolve_template
        print(f"note: the model has no chat template of its own; using the built-in "
              f"{resolve_template(engine.tokenizer)[0]} format", file=sys.stderr)
    kwargs = dict(_decoding_kwargs(args, speculative, tree), reuse_prefix=args.reuse_prefix)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []   # as generate's
    history: list[dict] = []
    at_start = True       # of the input: where a byte order mark stands
    print(CHAT_HELP, file=sys.stderr)
    stdin = _Terminal.of(stdin)
    while True:
        try:
            line = _read_line(stdin, "> ")
            if at_start and line.startswith("\ufeff"):
                # A file saved with a byte order mark (Notepad, Windows PowerShell's pipe): the mark went into the
                # first message, and a first line of /reset or /exit was sent to the model as one
                line = line[1:]
            at_start = False
            if line and (line.strip().startswith('"""') or line.rstrip("\r\n").endswith("\\")):
                line = _read_continued(stdin, line)
        except KeyboardInterrupt:     # Ctrl-C at the prompt quits: the shell's prompt must not follow "> "
            print(file=sys.stderr)
            raise
        if not line:
            print(file=sys.stderr)    # end of input (Ctrl-D): ends the "> " line, as a shell does
            break
        if not line.endswith("\n") and _isatty(stdin):
            # Ctrl-D after typed text sends it with no Enter: the answer ran on after it ("> abcI'm sorry...")
            print(file=sys.stderr)
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(new conversation)", file=sys.stderr)
            continue
        if text == "/help":
            print(f"{CHAT_HELP}\n{CHAT_LIMITS}", file=sys.stderr)
            continue
        if not text:
            continue
        if re.fullmatch(r"/[A-Za-z]+", text):     # a mistyped command is not a message (one with words after it is)
            print(f"amphista: error: unknown command {text}; the commands are {', '.join(CHAT_COMMANDS)}",
                  file=sys.stderr)
            continue
        if bad := _not_utf8(text, getattr(stdin, "encoding", None) or "UTF-8"):   # this line only: goes on
            print(f"amphista: error: that line is {bad}; it was not sent (the conversation so far is kept)",
                  file=sys.stderr)
            continue
        if "\n" in text:
            # Pasted code keeps its first line's indentation: strip() took it (an indented method's body then stood
            # 8 columns right of its `def`). Only the blank lines around the message go.
            text = re.sub(r"\A(?:[ \t]*\n)+", "", line).rstrip()
        turn = [{"role": "user", "content": text}]
        result = _chat_turn(engine, system, history, turn, kwargs)
        if result is not None:
            history += turn + [{"role": "assistant", "content": result.text}]
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser (subcommands' parsers are of their parent's class), with a hint where a missing prompt
    error misleads: `amphista generate -x` (a prompt that starts with '-' is taken for an option) and `cat q.txt |
    amphista generate` (stdin is read only for '-') both said only 'the following arguments are required'."""

    def error(self, message):
        if self.prog.endswith(" generate") and message.endswith("required: prompt"):
            message += ("; give it as an argument or '-' to read it from stdin (cat prompt.txt | amphista generate "
                        "-); a prompt that starts with '-' goes after '--' (amphista generate -- '-x')")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog="amphista", description="Amphista speculative decoding engine")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt (streams text to stdout)")
    g.add_argument("prompt", help="the prompt; '-' reads it from stdin")
    g.add_argument("--system", default=None, help="a system message before the prompt (chat template)")
    _add_model_args(g)
    _add_decoding_args(g)
    _add_sampling_args(g)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: when the model has one, or --chat-template is given)")
    add_template_arg(g)
    predicted = g.add_mutually_exclusive_group()
    predicted.add_argument("--prediction", metavar="TEXT",
                           help="the answer's expected text (OpenAI's predicted outputs; e.g. the code being edited): "
                                "prompt lookup drafts from it first, the same answer sooner where it follows it "
                                "(--speculative auto, lookup, amphista+lookup or medusa+lookup)")
    predicted.add_argument("--prediction-file", metavar="PATH",
                           help="--prediction's text read from a UTF-8 file")
    # The keys a script reads are named here: they were documented nowhere
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (one line) instead of streaming text: text, token_ids, prompt_tokens, "
                        "finish_reason (eos, length or stop), stop_reason (the --stop string or --stop-token-id id "
                        "that ended it, where one did), stats (token counts, times in ms, tau, accept_hist; tree and "
                        "tree_nodes when a tree ran; accepted_prediction_tokens and rejected_prediction_tokens with "
                        "--prediction), speculative (the method that ran, or null), weights (dtype, "
                        "quant, linears, bytes), kernels (the backend the hot ops ran on) and, where the CPU timed "
                        "the heads, speculation_check")
    g.add_argument("--logprobs", action="store_true",
                   help="with --json: token_logprobs, the model's log-probability of each answer token")
    g.add_argument("--top-logprobs", type=_int, default=0, metavar="N",
                   help="with --logprobs --json: top_logprobs, the N (0-20) most likely tokens at each answer token's "
                        "position as [token_id, logprob] pairs, best first")
    g.set_defaults(func=cmd_generate)

    # The description is what `amphista chat --help` shows: it had none (the commands were only in the list of
    # subcommands, and what happens when the conversation outgrows the cache nowhere).
    c = sub.add_parser("chat", help="a conversation on stdin, answers streamed to stdout (" + CHAT_HELP + ")",
                       description=f"A conversation on stdin, answers streamed to stdout: {CHAT_HELP}; {CHAT_LIMITS}.")
    _add_model_args(c)
    _add_decoding_args(c)
    _add_sampling_args(c, max_new_tokens=512)
    c.add_argument("--system", default=None, help="system message at the start of every conversation")
    add_template_arg(c)
    c.add_argument("--reuse-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill only what the cache does not hold from the previous turn (default on; "
                        "--no-reuse-prefix prefills the whole history every turn, as a fresh run would)")
    c.set_defaults(func=cmd_chat)

    from .evaluation.commands import register as register_evaluation
    from .serving.commands import register as register_serving
    from .training.commands import register as register_training
    register_training(sub)
    register_evaluation(sub)
    register_serving(sub)
    # Every command that loads a model takes the backend switch, as AMPHISTA_BACKEND sets it: main() sets it for the
    # process, so it reaches the server's scheduler thread and the benchmarks' own timed steps too.
    from .kernels.backend import BACKENDS
    for command in sub.choices.values():
        if any("--device" in action.option_strings for action in command._actions):
            command.add_argument("--backend", default=None, choices=BACKENDS,
                                 help="kernel backend of the hot ops: torch (the reference), triton, cuda or cpu "
                                      "(default: AMPHISTA_BACKEND, else the fastest on the device)")
    return parser


def _warning_line(message, category, filename, lineno, line=None, terms=str) -> str:
    return f"amphista: warning: {terms(str(message))}\n"


def _silence_stdout():
    """stdout goes to devnull, so that the interpreter's own flush at exit raises nothing either."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):    # no stdout, or one without a descriptor
        pass


def _interrupted(argv) -> int:
    """Ctrl-C: exit status 130. Run as the command (argv None: the `amphista` script, python -m), the process ends
    by SIGINT itself, as an uncaught KeyboardInterrupt would end it, without its trace: bash goes on with a loop or
    script after a child that exited, even with 130 (it takes it for one that handled Ctrl-C), so `for f in *; do
    amphista generate ...; done` ran on to the next file at each Ctrl-C."""
    if argv is None and os.name == "posix":
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return 130


def main(argv=None) -> int:
    if sys.stderr is None:        # `2>&-`: print(file=None) would put the progress lines into the answer
        sys.stderr = open(os.devnull, "w")
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:     # Ctrl-C while the subcommands' modules (torch) import: no trace either
        return _interrupted(argv)
    # generate and chat run the engine on the flags' values: its errors and warnings are said in the flags' terms
    terms = _in_flag_terms if getattr(args, "func", None) in (cmd_generate, cmd_chat) else str
    shown = warnings.formatwarning
    warnings.formatwarning = functools.partial(_warning_line, terms=terms)   # one line, as errors are
    from .kernels import backend
    process_backend = backend.process_backend()
    try:
        if getattr(args, "backend", None) is not None:
            backend.set_backend(args.backend)       # put back below: main() also runs inside other programs
        return args.func(args)
    except AmphistaError as e:
        # a file's own keys (generation_config.json's min_p) are no flags the user typed
        print(f"amphista: error: {str(e) if isinstance(e, ModelLoadError) else terms(str(e))}", file=sys.stderr)
        if isinstance(e, _StdoutError):
            _silence_stdout()
        return 2
    except KeyboardInterrupt:
        return _interrupted(argv)
    except BrokenPipeError:
        # stdout's reader went away (`amphista generate ... | head`): stop quietly, as a SIGPIPE'd tool does
        _silence_stdout()
        return 141
    except OSError as e:
        if e.filename is None:
            raise
        # a path given that cannot be made, read or written (--out somewhere read-only, a full disk)
        print(f"amphista: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown
        backend.set_backend(process_backend)


if __name__ == "__main__":
    sys.exit(main())

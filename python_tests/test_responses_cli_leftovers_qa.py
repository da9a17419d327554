"""QA of leftovers in /v1/responses and the CLIs:

- a stream cut by max_output_tokens ended with response.completed (its response "incomplete"), where OpenAI's
  Responses API ends it with response.incomplete (the openai SDK's ResponseIncompleteEvent);
- float flags (--temperature, --top-p, ...) took non-ASCII digits ('٠٫٥', '０.５') as float() does;
- an inline --chat-template kept a typed backslash-n as two characters, where vLLM decodes the escapes;
- `tree-search --out ''` and `eval-tau --out ''` failed naming no empty path; `bench --draft-vocab 1` was taken where
  `train` refuses it."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import warnings

import pytest

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")

import test_responses_fuzz_qa as fuzz                      # noqa: E402
from test_responses_api import events_of                   # noqa: E402
from test_responses_fuzz_qa import send                    # noqa: E402
from test_tool_streaming import scripted                   # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

server, client = fuzz.server, fuzz.client       # its fixtures: the tiny model, served


# ---- 1. response.incomplete ---------------------------------------------------------------------------------------
def test_a_cut_stream_ends_with_response_incomplete(server, client, monkeypatch):
    scripted(server, monkeypatch, "The answer is long enough to be cut.")
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 3}
    status, _, text = send(server.url, body)
    whole = json.loads(text)
    assert status == 200 and whole["status"] == "incomplete", whole
    assert whole["incomplete_details"] == {"reason": "max_output_tokens"}
    status, _, text = send(server.url, {**body, "stream": True})
    events = events_of(text)
    last = events[-1]
    assert last["type"] == "response.incomplete", [e["type"] for e in events]
    assert "response.completed" not in [e["type"] for e in events]
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["content"][0]["text"] == whole["output"][0]["content"][0]["text"]
    # the SDK's typed events: its ResponseIncompleteEvent
    typed = list(client.responses.create(**body, stream=True))
    assert isinstance(typed[-1], openai.types.responses.ResponseIncompleteEvent), typed[-1]
    assert typed[-1].response.incomplete_details.reason == "max_output_tokens"


def test_a_whole_stream_still_ends_with_response_completed(server, monkeypatch):
    scripted(server, monkeypatch, "Short.")
    events = events_of(send(server.url, {"model": "tiny", "input": "Hi", "max_output_tokens": 50, "stream": True})[2])
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["status"] == "completed"
    assert events[-1]["response"]["incomplete_details"] is None


# ---- 3. float flags, inline --chat-template ----------------------------------------------------------------------
def _cli(argv) -> tuple[int, str]:
    from amphista_engine import cli
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, err.getvalue()


ARABIC_HALF, FULLWIDTH_HALF = "\u0660.\u0665", "\uff10.\uff15"     # '٠.٥' and '０.５': float() reads both as 0.5


@pytest.mark.parametrize("argv", [
    ["generate", "--temperature", ARABIC_HALF, "hi"],
    ["generate", "--top-p", FULLWIDTH_HALF, "hi"],
    ["chat", "--min-p", FULLWIDTH_HALF],
    ["serve", "--repetition-penalty", "\u0661"],
    ["generate", "--presence-penalty", ARABIC_HALF, "hi"],
    ["train", "--data", "d", "--out", "o", "--lr", FULLWIDTH_HALF],
    ["distill", "--prompts", "p", "--out", "o", "--top-p", ARABIC_HALF],
    ["eval", "--questions", "q", "--temperature", FULLWIDTH_HALF],
])
def test_float_flags_refuse_non_ascii_digits(argv, capsys):
    """Parsed only (the parser refuses the flag; taken, the command would run)."""
    from amphista_engine.cli import build_parser
    flag = [a for a in argv if a.startswith("--")][-1]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: invalid float value" in err, err


def test_float_flags_still_take_ascii_numbers():
    from amphista_engine.cli import build_parser
    args = build_parser().parse_args(["generate", "--temperature", "0.5", "--top-p", "1e-1", "hi"])
    assert (args.temperature, args.top_p) == (0.5, 0.1)
    assert build_parser().parse_args(["train", "--data", "d", "--out", "o", "--lr", "2e-4"]).lr == 2e-4


def _template(value: str):
    from amphista_engine.cli import _chat_template
    return _chat_template(argparse.Namespace(chat_template=value))


def test_inline_chat_template_decodes_escapes_as_vllm():
    """`--chat-template '{{ x }}\\n'` (a backslash and an n, as a shell passes it) kept both characters; vLLM's
    load_chat_template decodes them (codecs unicode_escape)."""
    typed = "{% for m in messages %}{{ m['content'] }}\\n{% endfor %}"
    assert _template(typed) == "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    # characters past ASCII are kept (the codec alone reads the text's UTF-8 bytes as Latin-1: '中' became
    # three characters);
    # \\t, \\u, \\x escapes decoded; a backslash before another character stays
    assert _template("{{ '\u4e2d\u00e9' }}\\t\\u00e9\\x41 \\d") == "{{ '\u4e2d\u00e9' }}\t\u00e9A \\d"
    assert _template("{{ 'a\\\\nb' }}") == "{{ 'a\\nb' }}"      # an escaped backslash is one backslash


@pytest.mark.parametrize("typed", ["{{ x }}\\x4", "{{ x }}\\u12", "{{ x }}\\N{NO SUCH NAME}"])
def test_inline_chat_template_bad_escape_is_named(typed):
    from amphista_engine.errors import InputError
    with pytest.raises(InputError, match="--chat-template has a bad escape"):
        _template(typed)


# ---- 4. --out '', bench --draft-vocab 1 ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["tree-search", "eval-tau", "train"])
def test_an_empty_out_path_is_named(tmp_path, command, monkeypatch):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question_id": 1, "category": "a", "turns": ["hi"]}) + "\n")
    monkeypatch.chdir(tmp_path)
    from amphista_engine.training import evaltau, trainer, tree_search

    def ran(*args, **kwargs):
        raise AssertionError(f"{command} ran with --out ''")
    for module, name in ((trainer, "train_heads"), (evaltau, "eval_tau"), (tree_search, "tree_search")):
        monkeypatch.setattr(module, name, ran)
    flags = {"tree-search": ["--data", str(data), "--heads", "default"],
             "eval-tau": ["--questions", str(data), "--heads", "default"], "train": ["--data", str(data)]}[command]
    rc, err = _cli([command, "--out", "", *flags])
    assert rc == 2 and "--out is an empty path" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]


@pytest.mark.parametrize("sizes", ["1", "0,1", "8192,1"])
def test_bench_refuses_a_draft_vocab_of_one_before_any_load(tmp_path, monkeypatch, sizes):
    from amphista_engine.evaluation import bench

    def loaded(*args, **kwargs):
        raise AssertionError("the heads were loaded before --draft-vocab was checked")
    monkeypatch.setattr(bench, "bench_heads", loaded)
    rc, err = _cli(["bench", "--draft-vocab", sizes, "--out", str(tmp_path / "b")])
    assert rc == 2 and "--draft-vocab 1: heads that draft from a single token" in err, err
    assert not (tmp_path / "b").exists()


def test_bench_draft_vocab_refuses_non_ascii_digits(tmp_path, monkeypatch):
    """int() read '٣' as 3."""
    from amphista_engine.evaluation import bench

    def loaded(*args, **kwargs):
        raise AssertionError("the heads were loaded before --draft-vocab was checked")
    monkeypatch.setattr(bench, "bench_heads", loaded)
    rc, err = _cli(["bench", "--draft-vocab", "\u0663", "--out", str(tmp_path / "b")])
    assert rc == 2 and "--draft-vocab must be a comma list of integers" in err, err


# ---- 2. strict calls under the calls' grammar stream as they decode ---------------------------------------------
# bounded (the tiny random model writes an unbounded string until max_output_tokens)
STRICT = {"type": "function", "name": "get_weather", "strict": True,
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                         "required": ["city", "days"], "additionalProperties": False}}


def _call_events(events: list[dict]) -> tuple[list[str], list[dict]]:
    """(the arguments deltas, the function_call items done)."""
    return ([e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"],
            [e["item"] for e in events if e["type"] == "response.output_item.done"
             and e["item"]["type"] == "function_call"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_strict_call_under_the_grammar_streams_as_it_decodes(server, client, tool_choice):
    """tool_choice "required" or named: the grammar holds the call whole, so a strict one streams piecewise as a
    non-strict one does (it went out in one delta at its end); joined, its deltas are the call."""
    body = {"model": "tiny", "input": "Weather?", "tools": [STRICT], "tool_choice": tool_choice,
            "parallel_tool_calls": False, "max_output_tokens": 400}
    status, _, text = send(server.url, body)
    whole = json.loads(text)
    assert status == 200 and whole["status"] == "completed", whole
    [call] = whole["output"]
    events = events_of(send(server.url, {**body, "stream": True})[2])
    fuzz.check_events(events)
    deltas, done = _call_events(events)
    assert len(deltas) > 1, deltas
    assert "".join(deltas) == done[0]["arguments"] == call["arguments"]
    assert events[-1]["type"] == "response.completed"
    assert [o["arguments"] for o in events[-1]["response"]["output"]] == [call["arguments"]]
    # the SDK parses a strict call of response.completed: whole, it parses
    with client.responses.stream(**body) as stream:
        list(stream)
        got = stream.get_final_response()
    assert got.output[0].parsed_arguments == json.loads(call["arguments"])


def test_a_strict_call_cut_under_the_grammar(server, client):
    """Cut by max_output_tokens: the call the stream announced stays at its index, incomplete, in response.incomplete
    (which the SDK does not parse: iterating the stream raises nothing); the non-streamed reply, which parse() reads,
    holds no cut strict call."""
    body = {"model": "tiny", "input": "Weather?", "tools": [STRICT], "tool_choice": "required",
            "parallel_tool_calls": False, "max_output_tokens": 400}
    whole = json.loads(send(server.url, body)[2])
    for cut in range(whole["usage"]["output_tokens"] - 1, 0, -4):     # the first cut inside the arguments
        events = events_of(send(server.url, {**body, "max_output_tokens": cut, "stream": True})[2])
        if events[-1]["response"]["output"][0]["status"] == "incomplete":
            break
    body["max_output_tokens"] = cut
    fuzz.check_events(events)
    deltas, done = _call_events(events)
    final = events[-1]
    assert final["type"] == "response.incomplete" and final["response"]["status"] == "incomplete"
    assert [(o["type"], o["status"]) for o in final["response"]["output"]] == [("function_call", "incomplete")]
    assert deltas and "".join(deltas) == done[0]["arguments"] == final["response"]["output"][0]["arguments"]
    assert whole["output"][0]["arguments"].startswith(done[0]["arguments"])
    typed = list(client.responses.create(**body, stream=True))
    assert typed[-1].type == "response.incomplete" and typed[-1].response.output[0].status == "incomplete"
    cut = json.loads(send(server.url, body)[2])
    assert cut["status"] == "incomplete" and all(o["type"] != "function_call" for o in cut["output"]), cut

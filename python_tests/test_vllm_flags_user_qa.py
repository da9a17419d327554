"""vLLM users' habits: a chat template override (Engine.chat_template / from_pretrained(chat_template=...),
`--chat-template` on generate, chat and serve, a chat request's `chat_template` field), `--served-model-name`,
`--max-model-len`, and vLLM's serve flags for what the server does anyway (--enable-auto-tool-choice,
--tool-call-parser, --enable-prefix-caching). Each override is checked against the template's own rendering."""
from __future__ import annotations

import json
import shutil
import threading

import pytest

from amphista_engine import cli
from amphista_engine.chat import render_chat
from amphista_engine.errors import InputError
from conftest import serving
from test_serve import call, error_of

pytestmark = pytest.mark.usefixtures("one_thread_module")

# A template unlike the tiny model's fallback (Vicuna): bracketed roles, its tools as JSON where it is given some
T = ("{% if tools %}[tools] {{ tools | tojson }}\n{% endif %}"
     "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}[assistant] {% endif %}")
MSGS = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "The quick brown fox"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def rendered(engine, messages, template=T, **kwargs) -> list[int]:
    return engine.tokenizer.encode(render_chat(engine.tokenizer, messages, template=template, **kwargs))


@pytest.fixture
def engine(tiny_amphista_engine):
    yield tiny_amphista_engine
    tiny_amphista_engine.chat_template = None


# ---- Python API -----------------------------------------------------------------------------------------------

def test_engine_chat_template_renders_prompts_and_is_checked(engine):
    default = engine.encode_prompt(MSGS)
    engine.chat_template = T
    assert engine.encode_prompt(MSGS) == rendered(engine, MSGS) != default
    # a string prompt is one user message in the override (the tiny model has no template of its own: raw before)
    assert engine.encode_prompt("hello there") == rendered(engine, "hello there")
    # tools go into the override, which reads them (not into the fallback's Hermes system message)
    from amphista_engine.tools import generate_with_tools
    small = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]     # fits 128
    result = generate_with_tools(engine, MSGS[1:], small, max_new_tokens=1)[0]
    assert result.prompt_token_ids == rendered(engine, MSGS[1:], variables={"tools": small})
    with pytest.raises(InputError, match=r"chat_template is not a valid Jinja template"):
        engine.chat_template = "{% for m in messages %}"
    assert engine.chat_template == T        # a refused template leaves the one set
    engine.chat_template = None
    assert engine.encode_prompt(MSGS) == default


def test_from_pretrained_refuses_a_broken_template_before_the_load(tmp_path):
    from amphista_engine import Engine
    with pytest.raises(InputError, match="chat_template is not a valid Jinja template"):
        Engine.from_pretrained(str(tmp_path / "no-such-model"), chat_template="{{ messages ")


def test_override_end_of_turn_token_ends_answers(tiny_hf_dir, tmp_path):
    """A model whose vocabulary has <|im_end|> (special) but whose own template never writes it: a ChatML override's
    answers end there, as the built-in chatml's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from amphista_engine import Engine
    from conftest import CORPUS
    for f in tiny_hf_dir.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f, tmp_path / f.name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}))
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    engine = Engine.from_pretrained(str(tmp_path), device="cpu", max_seq_len=64)
    im_end = engine.tokenizer.token_to_id("<|im_end|>")
    assert im_end not in engine.eos_ids
    forced = dict(max_new_tokens=4, logit_bias={im_end: 100.0})
    assert engine.generate(MSGS, **forced).finish_reason == "length"
    engine.chat_template = chatml
    assert im_end in engine.eos_ids
    result = engine.generate(MSGS, **forced)
    assert (result.finish_reason, result.token_ids) == ("eos", [])


# ---- the server: a request's chat_template --------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_amphista_engine):
    with serving(tiny_amphista_engine, model_id=["tiny-a", "tiny-b"], log=lambda line: None,
                 defaults=dict(max_new_tokens=8), trust_request_chat_template=True) as httpd:
        yield httpd.url, httpd.app


def test_request_chat_template_tokenize_and_answer(engine, served):
    url, _ = served
    status, reply = call(url, "/tokenize", {"messages": MSGS, "chat_template": T})
    assert status == 200 and reply["tokens"] == rendered(engine, MSGS)
    # continue_final_message: cut inside the override's assistant message
    partial = MSGS + [{"role": "assistant", "content": "The lazy"}]
    status, reply = call(url, "/tokenize", {"messages": partial, "chat_template": T, "continue_final_message": True})
    assert status == 200 and reply["tokens"] == rendered(engine, partial, continue_final_message=True)
    # tools go into the override (which reads them), not into the fallback's Hermes system message
    status, reply = call(url, "/tokenize", {"messages": MSGS, "chat_template": T, "tools": TOOLS})
    assert status == 200 and reply["tokens"] == rendered(engine, MSGS, variables={"tools": TOOLS})

    status, reply = call(url, "/v1/chat/completions", {"messages": MSGS, "chat_template": T, "max_tokens": 6})
    assert status == 200, reply
    assert reply["model"] == "tiny-a" and reply["usage"]["prompt_tokens"] == len(rendered(engine, MSGS))
    engine.chat_template = T
    expected = engine.generate(MSGS, max_new_tokens=6, speculative=None)
    assert reply["choices"][0]["message"]["content"] == expected.text


def test_request_chat_template_with_cache_prompt(engine, served):
    url, _ = served
    body = {"messages": MSGS, "chat_template": T, "max_tokens": 4, "cache_prompt": True}
    first = call(url, "/v1/chat/completions", body)[1]
    turn = MSGS + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                   {"role": "user", "content": "and the lazy dog?"}]
    status, second = call(url, "/v1/chat/completions", {**body, "messages": turn})
    assert status == 200, second
    assert second["usage"]["prompt_tokens"] == len(rendered(engine, turn))
    assert second["amphista"].get("prompt_tokens_reused", 0) > 0


def test_request_chat_template_refused_by_name(served):
    url, _ = served
    error_of(call(url, "/v1/chat/completions", {"messages": MSGS, "chat_template": "{% if %}"}), 400,
             "chat_template is not a valid Jinja template", param="chat_template")
    error_of(call(url, "/v1/chat/completions", {"messages": MSGS, "chat_template": 3}), 400, "chat_template",
             param="chat_template")
    error_of(call(url, "/v1/completions", {"prompt": "hi", "chat_template": T}), 400, "chat_template applies to",
             param="chat_template")
    error_of(call(url, "/tokenize", {"prompt": "hi", "chat_template": T}), 400, "chat_template", param="chat_template")


def test_served_model_names(served):
    url, _ = served
    status, reply = call(url, "/v1/models")
    assert status == 200 and [m["id"] for m in reply["data"]] == ["tiny-a", "tiny-b"]
    assert call(url, "/v1/models/tiny-b")[1]["id"] == "tiny-b"
    error_of(call(url, "/v1/models/other"), 404, "'tiny-a', 'tiny-b'")


# ---- the CLI --------------------------------------------------------------------------------------------------

def test_generate_chat_template_file_and_inline(engine, tiny_hf_dir, tmp_path, capsys):
    path = tmp_path / "t.jinja"
    path.write_text(T)
    engine.chat_template = T
    expected = engine.generate(MSGS[1]["content"], max_new_tokens=4, speculative=None)
    for value in (str(path), T):
        assert cli.main(["generate", "--model", str(tiny_hf_dir), "--heads", "none", "--max-model-len", "128",
                         "--max-new-tokens", "4", "--chat-template", value, "--json", MSGS[1]["content"]]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["prompt_tokens"] == len(rendered(engine, MSGS[1]["content"]))
        assert out["token_ids"] == expected.token_ids


@pytest.mark.parametrize("value, words", [("{% if %}", "--chat-template is not a valid Jinja template"),
                                          ("missing.jinja", "--chat-template 'missing.jinja': no such file")])
def test_cli_refuses_a_bad_chat_template_before_the_load(value, words, tiny_hf_dir, capsys):
    for command in (["generate", "hi"], ["chat"], ["serve", "--port", "0"]):
        assert cli.main([*command, "--model", str(tiny_hf_dir), "--chat-template", value]) == 2
        err = capsys.readouterr().err
        assert words in err and "loading" not in err, err


def test_max_model_len_in_help():
    parser = cli.build_parser()
    for command in ("generate", "chat", "serve"):
        args = parser.parse_args([command, "--max-model-len", "96"] + (["p"] if command == "generate" else []))
        assert args.max_seq_len == 96
        sub = next(a for a in parser._actions if getattr(a, "choices", None) and command in a.choices)
        assert "--max-model-len" in sub.choices[command].format_help()


@pytest.mark.parametrize("flags, words", [
    (["--tool-call-parser", "pythonic"], "--tool-call-parser pythonic: this server reads tool calls in the hermes"),
    (["--cache-prompt", "--no-enable-prefix-caching"], "--no-enable-prefix-caching"),
    (["--served-model-name", " "], "--served-model-name takes non-empty names")])
def test_serve_refuses_what_it_does_not_do_before_the_load(flags, words, capsys):
    assert cli.main(["serve", "--port", "0", "--model", "/no/such/model", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and "loading" not in err, err


def test_serve_tool_call_parser_must_match_the_template(tiny_hf_dir, capsys):
    assert cli.main(["serve", "--port", "0", "--model", str(tiny_hf_dir), "--heads", "none", "--max-model-len", "64",
                     "--tool-call-parser", "mistral"]) == 2
    err = capsys.readouterr().err
    assert "--tool-call-parser mistral: tool calls are read in the format" in err and "hermes here" in err


def test_serve_vllm_flags(engine, tiny_hf_dir, monkeypatch, capsys):
    """`amphista serve` with a vLLM command line: the override renders every chat, the names are served, prefix
    caching is --cache-prompt, --max-model-len the cache's length."""
    from amphista_engine.serving.server import AmphistaHTTPServer
    real, seen = AmphistaHTTPServer.serve_forever, {}

    def serve_forever(self, *args, **kwargs):
        thread = threading.Thread(target=real, args=(self,), daemon=True)
        thread.start()
        try:
            seen["app"] = self.app
            seen["models"] = call(self.url, "/v1/models")[1]
            seen["tokens"] = call(self.url, "/tokenize", {"messages": MSGS})[1]
            seen["answer"] = call(self.url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4})[1]
            seen["own"] = call(self.url, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4,
                                                                   "chat_template": T})
        finally:
            self.shutdown()
            thread.join(5)

    monkeypatch.setattr(AmphistaHTTPServer, "serve_forever", serve_forever)
    assert cli.main(["serve", "--port", "0", "--model", str(tiny_hf_dir), "--heads", "none", "--quiet",
                     "--max-model-len", "128", "--chat-template", T, "--served-model-name", "org/tiny", "tiny",
                     "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--enable-prefix-caching"]) == 0
    app = seen["app"]
    assert app.cache_prompt is True and app.engine.max_seq_len == 128 and app.engine.chat_template == T
    assert [m["id"] for m in seen["models"]["data"]] == ["org/tiny", "tiny"]
    assert seen["tokens"]["tokens"] == rendered(engine, MSGS)
    assert seen["answer"]["model"] == "org/tiny"
    assert seen["answer"]["usage"]["prompt_tokens"] == len(rendered(engine, MSGS))
    assert "as org/tiny, tiny" in capsys.readouterr().err
    # a request's own template runs the client's Jinja here: refused unless --trust-request-chat-template (vLLM's)
    status, reply = seen["own"]
    assert status == 400 and reply["error"]["param"] == "chat_template"
    assert "--trust-request-chat-template" in reply["error"]["message"]
    assert app.trust_request_chat_template is False
    monkeypatch.setattr(AmphistaHTTPServer, "serve_forever", serve_forever)
    assert cli.main(["serve", "--port", "0", "--model", str(tiny_hf_dir), "--heads", "none", "--quiet",
                     "--max-model-len", "128", "--trust-request-chat-template"]) == 0
    status, reply = seen["own"]
    assert status == 200 and reply["usage"]["prompt_tokens"] == len(rendered(engine, MSGS))

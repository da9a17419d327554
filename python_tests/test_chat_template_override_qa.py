"""Chat template overrides, tried as users try them (Engine.chat_template, --chat-template, a request's
chat_template): templates Jinja cannot compile named by the setting that gave them (never a bare RecursionError or
SyntaxError), text that is not Unicode named where it is set, the CLI's template read from a pipe (`<(...)`) and an
unreadable file named by the flag, a run that renders and stops with one template even where the engine's is set
meanwhile, and concurrent server requests with other templates each rendered and ended by their own."""
from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from amphista_engine import cli
from amphista_engine.chat import check_chat_template, render_chat
from amphista_engine.errors import InputError
from conftest import serving
from test_serve import call, error_of

pytestmark = pytest.mark.usefixtures("one_thread_module")

T = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
     "{% if add_generation_prompt %}[assistant] {% endif %}")
MSGS = [{"role": "user", "content": "The quick brown fox"}]
# templates past what Python compiles Jinja's code of: nesting deeper than its recursion limit, its indentation limit
# (100 levels) and its 20 statically nested blocks
DEEP = {"ifs": "{% if true %}" * 3000 + "x" + "{% endif %}" * 3000,
        "indented": "{% if true %}" * 200 + "x" + "{% endif %}" * 200,
        "loops": "{% for a in [1] %}" * 30 + "{{ messages[0].content }}" + "{% endfor %}" * 30,
        "parentheses": "{{ " + "(" * 1000 + "1" + ")" * 1000 + " }}"}
SURROGATE = "\udcff{{ messages[0]['content'] }}"


def rendered(engine, messages, template=T, **kwargs) -> list[int]:
    return engine.tokenizer.encode(render_chat(engine.tokenizer, messages, template=template, **kwargs))


@pytest.fixture
def engine(tiny_amphista_engine):
    yield tiny_amphista_engine
    tiny_amphista_engine.chat_template = None


# ---- templates that cannot be used, named where they are set ------------------------------------------------------

@pytest.mark.parametrize("kind", DEEP)
def test_a_template_too_deep_to_compile_is_named(engine, kind):
    engine.chat_template = T
    with pytest.raises(InputError, match="chat_template is nested too deeply to compile"):
        engine.chat_template = DEEP[kind]
    assert engine.chat_template == T
    with pytest.raises(InputError, match="--chat-template is nested too deeply"):
        check_chat_template(DEEP[kind], "--chat-template")


def test_from_pretrained_refuses_a_deep_or_non_unicode_template_before_the_load(tmp_path):
    from amphista_engine import Engine
    for template, words in ((DEEP["ifs"], "nested too deeply"), (SURROGATE, "not valid Unicode")):
        with pytest.raises(InputError, match=f"chat_template is {words}"):
            Engine.from_pretrained(str(tmp_path / "no-such-model"), chat_template=template)


def test_a_template_that_is_not_unicode_is_named_where_it_is_set(engine):
    # it was taken, and every prompt it rendered was refused as "the prompt's text is not valid Unicode"
    with pytest.raises(InputError, match=r"chat_template is not valid Unicode: it holds U\+DCFF"):
        engine.chat_template = SURROGATE
    assert engine.chat_template is None


# ---- a run keeps the template it started with ------------------------------------------------------------------

def test_joiners_render_with_the_runs_template(engine):
    """A prompt joining a run (admit) renders with the template the run's prompts rendered with, the one whose
    end-of-turn tokens end its rows, though engine.chat_template was set meanwhile (another thread, an async call's
    worker): it rendered with the new one and ended by the old one's tokens."""
    engine.reserve_batch(2)
    engine.chat_template = T
    NEXT = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    waiting = [(MSGS, 3)]

    def admit(free):
        engine.chat_template = NEXT        # the next run's, set while this one decodes
        got = waiting[:free]
        del waiting[:free]
        return got
    engine.generate_batch([MSGS], max_new_tokens=6, ignore_eos=True, speculative=None, admit=admit)
    assert not waiting and len(engine.last_results) == 2
    assert engine.last_results[1].prompt_token_ids == rendered(engine, MSGS) == engine.last_results[0].prompt_token_ids
    assert engine.encode_prompt(MSGS) == rendered(engine, MSGS, NEXT)     # the next run's


# ---- the CLI: --chat-template's file ---------------------------------------------------------------------------

def _generate(tiny_hf_dir, value, *flags):
    return cli.main(["generate", "--model", str(tiny_hf_dir), "--heads", "none", "--max-model-len", "64",
                     "--max-new-tokens", "2", "--speculative", "none", "--chat-template", value, *flags, "hello"])


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="no /dev/fd")
def test_chat_template_from_a_pipe(engine, tiny_hf_dir, capsys):
    """`--chat-template <(curl ...)`: the shell passes /dev/fd/N, a pipe, which was "no such file"."""
    read, write = os.pipe()
    try:
        os.write(write, T.encode())
        os.close(write)
        assert _generate(tiny_hf_dir, f"/dev/fd/{read}", "--json") == 0, capsys.readouterr().err
    finally:
        os.close(read)
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(rendered(engine, "hello"))


def test_chat_template_file_that_cannot_be_read(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "t.jinja"
    path.write_text(T)

    def unreadable(p, *args):
        raise PermissionError(13, "Permission denied", str(p))
    monkeypatch.setattr(cli, "read_utf8", unreadable)
    assert _generate(tiny_hf_dir, str(path)) == 2
    err = capsys.readouterr().err
    assert f"--chat-template {str(path)!r}: cannot read it (Permission denied)" in err and "loading" not in err, err


@pytest.mark.parametrize("value, words", [
    (SURROGATE, "--chat-template is not UTF-8 text (byte 0xff at character 0)"),
    (os.devnull, f"--chat-template {os.devnull!r}: is not a file"),
    ("deep", "(the file's template) is nested too deeply to compile")])
def test_cli_names_a_template_it_cannot_use_before_the_load(value, words, tiny_hf_dir, tmp_path, capsys):
    if value == "deep":
        value = str(tmp_path / "deep.jinja")
        (tmp_path / "deep.jinja").write_text(DEEP["ifs"])
    assert _generate(tiny_hf_dir, value) == 2
    err = capsys.readouterr().err
    assert words in err and "loading" not in err, err


# ---- the server ------------------------------------------------------------------------------------------------

def _special_engine(tiny_hf_dir, tmp_path):
    """The tiny model with <|im_end|> and <|eot_id|> special tokens of its vocabulary, which its own template never
    writes: only an override that ends turns with one ends answers there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from amphista_engine import Engine
    from conftest import CORPUS
    for f in tiny_hf_dir.iterdir():
        if f.name not in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f, tmp_path / f.name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}))
    return Engine.from_pretrained(str(tmp_path), device="cpu", max_seq_len=64)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}### {{ m['role'] }}\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}assistant\n\n{% endif %}")


def test_concurrent_requests_render_and_stop_with_their_own_templates(tiny_hf_dir, tmp_path):
    """Requests with other templates at once (continuous batching, --max-batch 4): each prompt rendered with its own
    template, each answer ended by its own template's end of turn (<|im_end|>, all but forced, ends ChatML's
    answers at once and no other's); unusable templates are 400s naming chat_template, not 500s."""
    engine = _special_engine(tiny_hf_dir, tmp_path)
    im_end = engine.tokenizer.token_to_id("<|im_end|>")
    templates = {"chatml": CHATML, "llama3": LLAMA3, "own": None, "builtin": "chatml"}
    lengths = {name: len(rendered(engine, MSGS, t)) for name, t in templates.items()}
    assert len({lengths["chatml"], lengths["llama3"], lengths["own"]}) == 3
    replies = {}
    with serving(engine, log=lambda line: None, max_batch=4, trust_request_chat_template=True) as httpd:
        def ask(name, i):
            body = {"messages": MSGS, "max_tokens": 5, "logit_bias": {str(im_end): 100}, "speculative": "none"}
            if templates[name] is not None:
                body["chat_template"] = templates[name]
            replies[name, i] = call(httpd.url, "/v1/chat/completions", body)
        threads = [threading.Thread(target=ask, args=(name, i)) for i in range(2) for name in templates]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for name in (*DEEP, "surrogate"):
            template = SURROGATE if name == "surrogate" else DEEP[name]
            error_of(call(httpd.url, "/v1/chat/completions", {"messages": MSGS, "chat_template": template}), 400,
                     "chat_template is", param="chat_template")
    assert len(replies) == 2 * len(templates)
    for (name, i), (status, reply) in replies.items():
        assert status == 200, reply
        ends = name in ("chatml", "builtin")
        assert reply["usage"]["prompt_tokens"] == lengths[name], (name, reply)
        assert reply["choices"][0]["finish_reason"] == ("stop" if ends else "length"), (name, reply)
        assert reply["usage"]["completion_tokens"] == (1 if ends else 5), (name, reply)

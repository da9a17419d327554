"""Chat rendering: the model's Jinja template (checked against transformers' apply_chat_template),
the built-in vicuna_v1.1 and chatml formats, stop selection and message errors."""
from __future__ import annotations

import pytest

from amphista_engine.chat import BUILTIN_TEMPLATES, VICUNA_SYSTEM_PROMPT, chat_stops, render_chat, resolve_template
from amphista_engine.errors import ConfigError, InputError
from amphista_engine.tokenizer import load_tokenizer
from conftest import SMOLLM2_GGUF
from conftest import needs_smollm2_gguf as needs_smollm2

TWO_TURNS = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke about 🐍 and 中文."},
]


class _StubTokenizer:
    """Just what render_chat reads from a tokenizer: template, special token strings, vocabulary lookup."""

    def __init__(self, chat_template=None, vocab=("<s>", "</s>")):
        self.chat_template = chat_template
        self.vocab = {t: i for i, t in enumerate(vocab)}
        self.bos_token, self.eos_token = "<s>", "</s>"
        self.eos_ids = [self.vocab["</s>"]] if "</s>" in self.vocab else []

    def token_to_id(self, piece):
        return self.vocab.get(piece)

    def id_to_piece(self, token_id):
        return next(t for t, i in self.vocab.items() if i == token_id)


def _reference(chat_template, bos="<s>", eos="</s>"):
    """A transformers tokenizer carrying `chat_template`, for its apply_chat_template."""
    transformers = pytest.importorskip("transformers", reason="transformers is the optional reference")
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, bos: 1, eos: 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template,
                                                bos_token=bos, eos_token=eos)


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(SMOLLM2_GGUF)


@needs_smollm2
def test_smollm2_template_two_turns(smol):
    prompt = render_chat(smol, TWO_TURNS)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi there!<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nTell me a joke about 🐍 and 中文.<|im_end|>\n"
        "<|im_start|>assistant\n")
    # The rendered prompt encodes with its markers as single special tokens.
    ids = smol.encode(prompt)
    assert ids.count(smol.token_to_id("<|im_start|>")) == 5 and ids.count(smol.token_to_id("<|im_end|>")) == 4
    assert render_chat(smol, "Hi there!") == render_chat(smol, TWO_TURNS[:1])
    stops = chat_stops(smol)
    assert stops.strings == ["<|im_end|>"] and stops.token_ids[0] == smol.token_to_id("<|im_end|>")


@needs_smollm2
def test_smollm2_template_matches_transformers(smol):
    reference = _reference(smol.chat_template, bos=smol.bos_token, eos=smol.eos_token)
    for messages in (TWO_TURNS, [{"role": "system", "content": "Be brief."}, *TWO_TURNS[:1]]):
        for gen in (True, False):
            assert render_chat(smol, messages, add_generation_prompt=gen) == reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen)


def test_jinja_environment_matches_transformers():
    """Whitespace control, bos/eos variables, loop controls, namespaces and tojson render as in transformers."""
    template = (
        "{{ bos_token }}\n"
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "[{{ ns.n }}] {{ m['role'] | upper }}: {{ m['content'] | trim }}"
        " {{ {'len': m['content'] | length} | tojson }}\n"
        "    {% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}[next] ASSISTANT:{% endif %}"
    )
    messages = [{"role": "system", "content": "sys <b>"}, *TWO_TURNS]
    reference = _reference(template)
    ours = _StubTokenizer(template)
    for gen in (True, False):
        assert render_chat(ours, messages, add_generation_prompt=gen) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)


def test_vicuna_builtin():
    expected = (f"{VICUNA_SYSTEM_PROMPT} USER: Hi there! ASSISTANT: Hello! How can I help?</s>"
                "USER: Tell me a joke about 🐍 and 中文. ASSISTANT:")
    assert render_chat(None, TWO_TURNS, "vicuna_v1.1") == expected
    assert render_chat(None, TWO_TURNS, "vicuna_v1.1", add_generation_prompt=False) == expected[:-len("ASSISTANT:")]
    assert render_chat(None, "What is 2+2?", "vicuna_v1.1") == f"{VICUNA_SYSTEM_PROMPT} USER: What is 2+2? ASSISTANT:"
    custom = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert render_chat(None, custom, "vicuna_v1.1") == "You are terse. USER: Hi ASSISTANT:"
    # A template-less Llama-style tokenizer (no <|im_start|>) falls back to Vicuna.
    assert resolve_template(_StubTokenizer()) == ("vicuna_v1.1", BUILTIN_TEMPLATES["vicuna_v1.1"])
    assert render_chat(_StubTokenizer(), "Hi") == f"{VICUNA_SYSTEM_PROMPT} USER: Hi ASSISTANT:"
    assert chat_stops(_StubTokenizer()) == ([1], ["</s>"])
    with pytest.raises(InputError, match="tool"):
        render_chat(None, [{"role": "tool", "content": "{}"}], "vicuna_v1.1")


def test_chatml_builtin():
    assert render_chat(None, TWO_TURNS, "chatml") == (
        "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
        "<|im_start|>user\nTell me a joke about 🐍 and 中文.<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(None, "yo", "chatml", add_generation_prompt=False) == "<|im_start|>user\nyo<|im_end|>\n"
    # A template-less vocabulary that has the ChatML markers falls back to ChatML.
    stub = _StubTokenizer(vocab=("<s>", "</s>", "<|im_start|>", "<|im_end|>"))
    assert resolve_template(stub)[0] == "chatml"
    assert chat_stops(stub) == ([1, 3], ["<|im_end|>"])
    assert render_chat(None, [{"role": "user", "content": "x"}], "chatml") == render_chat(
        None, [{"role": "user", "content": "x"}], BUILTIN_TEMPLATES["chatml"])


def test_custom_template_string_and_bos():
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}={{ m['content'] }};{% endfor %}"
    assert render_chat(_StubTokenizer(), "hi", template) == "<s>user=hi;"
    assert render_chat(None, "hi", template) == "user=hi;"  # no tokenizer: no BOS text


def test_message_errors():
    for bad in ([], (), None, 5, [None], ["hi"], [{"content": "x"}], [{"role": "", "content": "x"}],
                [{"role": "user"}], [{"role": "user", "content": None}], [{"role": "user", "content": ["x"]}]):
        with pytest.raises(InputError):
            render_chat(None, bad, "chatml")
    with pytest.raises(InputError, match="message 1 has no 'role'"):
        render_chat(None, [{"role": "user", "content": "a"}, {"content": "b"}], "chatml")


def test_template_errors():
    with pytest.raises(InputError, match="unknown chat template 'llama9'"):
        render_chat(None, "hi", "llama9")
    with pytest.raises(InputError, match="roles must alternate"):
        render_chat(None, "hi", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InputError, match="not valid Jinja"):
        render_chat(None, "hi", "{% for m in messages %}")
    with pytest.raises(ConfigError, match="model's chat template is not valid Jinja"):
        render_chat(_StubTokenizer("{% if %}"), "hi")
    with pytest.raises(InputError):  # the sandbox refuses to reach Python internals
        render_chat(None, "hi", "{{ messages.__class__.__mro__ }}")
    with pytest.raises(InputError):
        render_chat(None, "hi", 42)

"""Structured output as a demanding user meets it (amphista_engine/structured.py): sentencepiece vocabularies (a
tokenizer.model folder, a GGUF 'llama' vocabulary), a model whose logits are wider than its tokenizer, and
response_formats that match no text at all."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

pytest.importorskip("llguidance")
pytest.importorskip("sentencepiece")

from amphista_engine.errors import InputError             # noqa: E402
from amphista_engine.structured import Constraint, Grammar  # noqa: E402
from amphista_engine.tokenizer import load_tokenizer      # noqa: E402

from conftest import write_tiny_hf                        # noqa: E402
from test_tokenizer import spm, spm_dir, spm_gguf         # noqa: E402,F401 -- fixtures

pytestmark = pytest.mark.usefixtures("one_thread_module")

CODE = r"[a-e]{2,4}-[0-9]{2}\."
WORDS = r"([a-e][0-9]){2,4}-(héllo|中文|😀)!"


def _sampled(tok, grammar: Grammar, V: int, seed: int, max_new: int = 40):
    """An answer drawn from random logits [V] held to the grammar, as the decoders hold them: (ids, ended by EOS)."""
    c = Constraint(grammar, 1, "cpu")
    g = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(max_new):
        logits = c.apply(torch.randn(1, V, generator=g) * 3)
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        if t in tok.eos_ids:
            return ids, True
        ids.append(t)
        c.consume(torch.tensor([[t]]), torch.tensor([1]))
    return ids, False


@pytest.mark.parametrize("source", ["model", "gguf"])
@pytest.mark.parametrize("wider", [0, 100])
def test_sentencepiece_vocabularies_hold_answers_to_the_grammar(spm_dir, spm_gguf, source, wider):  # noqa: F811
    """tokenizer.model: llguidance tokenized each forced byte with sentencepiece's dummy-prefix `▁` in front, so the
    matcher broke at the first forced byte and the rest of the answer came out unconstrained (garbage with
    finish_reason "eos"). GGUF 'llama': refused ("can't determine decoder type"). Logits wider than the vocabulary
    (wider > 0): "ValueError: Invalid buffer size" from inside the mask."""
    tok = load_tokenizer(spm_dir / "tokenizer.model" if source == "model" else spm_gguf)
    V = tok.vocab_size + wider
    for regex in (CODE, WORDS):
        grammar = Grammar({"type": "regex", "regex": regex}, tok, V, tok.eos_ids)
        for seed in range(3):
            ids, ended = _sampled(tok, grammar, V, seed)
            text = tok.decode(ids, skip_special_tokens=True)
            assert ended and re.fullmatch(regex, text), (regex, seed, text)
            assert all(i < tok.vocab_size for i in ids)       # the padded ids past the tokenizer are never allowed


@pytest.fixture(scope="module")
def spm_engine(spm_dir, tmp_path_factory):  # noqa: F811
    """A random Llama whose tokenizer is a sentencepiece tokenizer.model (400 pieces) under 512-wide logits, with
    random Amphista heads."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    folder = write_tiny_hf(tmp_path_factory.mktemp("spm_model"), vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    shutil.copy(spm_dir / "tokenizer.model", folder / "tokenizer.model")
    eng = Engine.from_pretrained(str(folder), device="cpu", max_seq_len=256)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=3, seed=1))
    return eng


def test_sentencepiece_engine_plain_speculative_and_sampled(spm_engine):
    eng = spm_engine
    assert eng.tokenizer.vocab_size < eng.config.vocab_size
    rf = {"type": "regex", "regex": WORDS}
    prompts = ["The quick brown fox", "Hello"]
    plain = eng.generate_batch(prompts, max_new_tokens=30, response_format=rf)
    assert all(re.fullmatch(WORDS, r.text) and r.finish_reason == "eos" for r in plain), [r.text for r in plain]
    spec = eng.generate_batch(prompts, max_new_tokens=30, response_format=rf, speculative="amphista")
    assert [r.text for r in spec] == [r.text for r in plain]
    for seed in range(2):
        r = eng.generate("Hello", max_new_tokens=30, response_format=rf, speculative="amphista", temperature=1.0,
                         seed=seed)
        assert re.fullmatch(WORDS, r.text) and r.finish_reason == "eos", (seed, r.text)
    r = eng.generate("Hello", max_new_tokens=20, response_format={"type": "json_object"})
    assert r.finish_reason == "length" or r.text.strip().startswith("{"), r.text


@pytest.mark.parametrize("rf", [
    {"type": "regex", "regex": r"[^\s\S]"},
    {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"},
                                                                                        "b": {"$ref": "#/$defs/a"}}}}},
    {"type": "grammar", "grammar": 'start: a\na: a "x"'},
], ids=["empty-regex", "ref-cycle", "only-recursion"])
def test_a_format_matching_no_text_is_named(tiny_amphista_engine, rf):
    """Valid to llguidance, whose mask then allows EOS alone: the answer was "" with finish_reason "eos", which
    matches nothing the client asked for."""
    with pytest.raises(InputError, match="matches no text at all"):
        tiny_amphista_engine.generate("hi", max_new_tokens=4, response_format=rf)


def test_a_format_matching_only_the_empty_text_still_runs(tiny_amphista_engine):
    r = tiny_amphista_engine.generate("hi", max_new_tokens=4, response_format={"type": "grammar", "grammar": "start: "})
    assert r.text == "" and r.finish_reason == "eos"


def test_server_names_a_format_matching_no_text(tiny_amphista_engine):
    from conftest import serving
    from test_serve import call
    with serving(tiny_amphista_engine, model_id="tiny") as httpd:
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 8, "response_format": {"type": "regex",
                                                                                     "regex": "[^\\s\\S]"}}
        status, reply = call(httpd.url, "/v1/completions", body)
    assert status == 400 and "matches no text at all" in reply["error"]["message"], reply

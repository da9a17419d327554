"""Structured output (amphista_engine/structured.py): answers held to a regex, a JSON schema or a Lark grammar, in
plain and speculative decoding (where greedy output must still equal plain output), through the engine, the server
and the CLI."""
from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("llguidance")

from amphista_engine.errors import InputError            # noqa: E402
from amphista_engine.generation import GenerationStats, PlainDecoder, run    # noqa: E402
from amphista_engine.kv_cache import KVCache              # noqa: E402
from amphista_engine.sampling import SamplingParams       # noqa: E402
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec    # noqa: E402
from amphista_engine.structured import Constraint, Grammar    # noqa: E402

from conftest import needs_smollm2                        # noqa: E402
from test_speculative import OracleHeads, _NoText         # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

CODE = {"type": "regex", "regex": r"[a-e]{2,4}-[0-9]{2}\."}


def _decode(engine, dec, prompt: list[int], max_new: int):
    stats = [GenerationStats()]
    list(run(dec, [prompt], _NoText(), max_new, engine.eos_ids, [], stats))
    return dec.rows[0].ids, dec.rows[0].finish_reason, stats[0]


def _plain(engine, prompt, max_new, rf, params=SamplingParams()):
    cache = KVCache.for_model(engine.config, 1, 128, torch.float32, "cpu")
    dec = PlainDecoder(engine.model, cache, params)
    if rf is not None:
        dec.constraint = Constraint(Grammar(rf, engine.tokenizer, engine.config.vocab_size, engine.eos_ids), 1, "cpu")
    return _decode(engine, dec, prompt, max_new)


def test_regex_answers_match_greedy_and_sampled(tiny_amphista_engine):
    eng = tiny_amphista_engine
    free = eng.generate("The quick brown fox", max_new_tokens=12)
    assert not re.fullmatch(CODE["regex"], free.text)          # the random model does not write codes by itself
    greedy = eng.generate("The quick brown fox", max_new_tokens=12, response_format=CODE)
    assert re.fullmatch(CODE["regex"], greedy.text) and greedy.finish_reason == "eos", greedy.text
    texts = set()
    for seed in range(5):
        r = eng.generate("The quick brown fox", max_new_tokens=12, response_format=CODE, temperature=1.5, seed=seed)
        assert re.fullmatch(CODE["regex"], r.text) and r.finish_reason == "eos", (seed, r.text)
        texts.add(r.text)
    assert len(texts) > 1


def test_lark_grammar_and_json_object(tiny_amphista_engine):
    eng = tiny_amphista_engine
    lark = 'start: "colour: " COLOUR\nCOLOUR: "red" | "green" | "blue"'
    r = eng.generate("The quick brown fox", max_new_tokens=20, response_format={"type": "grammar", "grammar": lark})
    assert r.text in ("colour: red", "colour: green", "colour: blue") and r.finish_reason == "eos", r.text
    # json_object: valid JSON where it ends by EOS; a random model may fill the object past the budget ("length")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    r = eng.generate("The quick brown fox", max_new_tokens=40,
                     response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert r.finish_reason == "eos", r.text
    value = json.loads(r.text)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)


@pytest.mark.parametrize("tree", ["tree-16", "dynamic-16"])
def test_speculative_equals_plain_under_an_oracle(tiny_amphista_engine, tree):
    """Each tree node is masked by the grammar advanced along its own path: with an oracle drafting the constrained
    answer, long runs are accepted and every token and bonus must be what constrained plain decoding chose (a mask
    taken at the root for every node would not give it)."""
    eng = tiny_amphista_engine
    prompt = eng.tokenizer.encode("The quick brown fox")
    rf = {"type": "regex", "regex": r"([a-e][0-9]){6,12}!"}
    plain, why, _ = _plain(eng, prompt, 40, rf)
    text = eng.tokenizer.decode(plain, skip_special_tokens=True)
    assert why == "eos" and re.fullmatch(rf["regex"], text), text
    heads = OracleHeads(prompt + plain, eng.config.vocab_size, 3, hit=0.9)
    cache = KVCache.for_model(eng.config, 1, 128, torch.float32, "cpu")
    dec = SpeculativeDecoder(eng.model, cache, heads, TreeSpec(tree, 3, "cpu"), SamplingParams())
    dec.constraint = Constraint(Grammar(rf, eng.tokenizer, eng.config.vocab_size, eng.eos_ids), 1, "cpu")
    got, why2, stats = _decode(eng, dec, prompt, 40)
    assert got == plain and why2 == "eos"
    assert stats.tau > 1.5, stats.tau


def test_tree_masks_follow_each_nodes_path(tiny_amphista_engine):
    """apply_tree: node i's logits masked as plain decoding would mask them after the tokens on i's path."""
    eng = tiny_amphista_engine
    tok = eng.tokenizer
    rf = {"type": "regex", "regex": r"(ab|ac|b)[0-9]+"}
    g = Grammar(rf, tok, eng.config.vocab_size, eng.eos_ids)
    a, b, c, z = (tok.encode(s, add_bos=False)[0] for s in "abcz")
    # root(0) -> a(1) -> b(2), a(1) -> c(3), root -> b(4), root -> z(5: the grammar forbids it), z -> a(6)
    tokens = torch.tensor([[0, a, b, c, b, z, a]])
    parent = [-1, 0, 1, 1, 0, 0, 5]
    N = len(parent)
    anc = torch.zeros(1, N, N, dtype=torch.bool)
    depth = torch.zeros(1, N, dtype=torch.long)
    for i in range(N):
        j = i
        while j >= 0:
            anc[0, i, j] = True
            j = parent[j]
        depth[0, i] = int(anc[0, i].sum()) - 1
    V = eng.config.vocab_size
    logits = torch.randn(1, N, V)
    got = Constraint(g, 1, "cpu").apply_tree(logits, tokens, anc, depth)
    for i in range(N):
        path = [int(tokens[0, j]) for j in sorted(range(1, N), key=lambda j: int(depth[0, j])) if anc[0, i, j]]
        alone = Constraint(g, 1, "cpu")
        alone.consume(torch.tensor([path]), torch.tensor([len(path)]))
        want = alone.apply(logits[:, i])
        if i in (5, 6):           # paths through z: never accepted, so left unmasked
            assert torch.equal(got[0, i], logits[0, i].float())
            continue
        assert torch.equal(got[0, i], want[0]), i
    assert not torch.equal(got[0, 1], got[0, 0])        # the masks differ by node


def test_batch_rows_each_follow_the_grammar_and_end_apart(tiny_amphista_engine):
    eng = tiny_amphista_engine
    rf = {"type": "regex", "regex": r"(a|bbbbbbbbbb|[0-9]{3,6})\."}
    prompts = ["The quick brown fox", "jumps over", "the lazy dog and the quick brown fox"]
    plain = [eng.generate(p, max_new_tokens=20, response_format=rf).text for p in prompts]
    batch = eng.generate_batch(prompts, max_new_tokens=20, response_format=rf)
    assert [r.text for r in batch] == plain
    assert all(re.fullmatch(rf["regex"], r.text) and r.finish_reason == "eos" for r in batch)


@pytest.mark.parametrize("rf,words", [
    ({"type": "xml"}, "type 'xml' is not supported"),
    ("json", "must be an object with a 'type'"),
    ({"type": "regex"}, "needs a non-empty 'regex'"),
    ({"type": "regex", "regex": "[a-"}, "invalid regex"),
    ({"type": "json_schema"}, "needs a 'json_schema' object"),
    ({"type": "json_schema", "json_schema": {"schema": 5}}, "must be a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}}, "bogus"),
    ({"type": "grammar", "grammar": "start: undefined_rule"}, "undefined_rule"),
])
def test_bad_response_formats_are_named(tiny_amphista_engine, rf, words):
    with pytest.raises(InputError, match=re.escape(words)):
        tiny_amphista_engine.generate("hi", max_new_tokens=4, response_format=rf)


def test_options_a_grammar_cannot_keep_are_refused(tiny_amphista_engine):
    for kw, word in ((dict(ignore_eos=True), "ignore_eos"), (dict(min_tokens=3), "min_tokens")):
        with pytest.raises(InputError, match=f"{word} does not mix with response_format"):
            tiny_amphista_engine.generate("hi", max_new_tokens=8, response_format=CODE, **kw)
    # free text ({"type": "text"}) is no constraint: the same answer as without one
    free = tiny_amphista_engine.generate("hi", max_new_tokens=6)
    assert tiny_amphista_engine.generate("hi", max_new_tokens=6, response_format={"type": "text"}).text == free.text


def test_server_response_format(tiny_amphista_engine):
    from conftest import serving
    from test_serve import call
    with serving(tiny_amphista_engine, model_id="tiny") as httpd:
        status, reply = call(httpd.url, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 12,
                                                             "response_format": CODE})
        assert status == 200, reply
        text = reply["choices"][0]["text"]
        assert re.fullmatch(CODE["regex"], text) and reply["choices"][0]["finish_reason"] == "stop", text
        # refused before the request waits for a run, named by its field (chat takes response_format too)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
                "response_format": {"type": "regex", "regex": "[a-"}}
        status, reply = call(httpd.url, "/v1/chat/completions", body)
        assert status == 400 and reply["error"]["param"] == "response_format", reply
        assert "invalid regex" in reply["error"]["message"]


def test_cli_flags(tiny_hf_dir, capsys):
    from amphista_engine.cli import main
    base = ["generate", "The quick brown fox", "--model", str(tiny_hf_dir), "--max-new-tokens", "12",
            "--max-seq-len", "128"]
    assert main(base + ["--regex", CODE["regex"]]) == 0
    assert re.fullmatch(CODE["regex"], capsys.readouterr().out.strip())
    assert main(base + ["--json-schema", "{not json"]) != 0
    assert "--json-schema" in capsys.readouterr().err


@needs_smollm2
def test_json_schema_on_the_embedded_model_speculative_equals_plain():
    from amphista_engine import Engine
    eng = Engine.from_pretrained("smollm2-135m", device="cpu")
    eng.load_heads("default")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}
    q = [{"role": "user", "content": "Describe a cat as JSON with a name and an age."}]
    plain = eng.generate(q, max_new_tokens=60, response_format=rf)
    spec = eng.generate(q, max_new_tokens=60, response_format=rf, speculative="amphista", tree="dynamic-4")
    value = json.loads(plain.text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int), plain.text
    assert spec.text == plain.text and spec.stats.tau > 1.0


def test_first_head_drafts_only_what_the_grammar_allows(tiny_amphista_engine):
    """first_head: head 0's guesses (the tokens right after the root) held to each row's grammar state, over token ids
    or a draft vocabulary's slots; the other heads untouched; a row whose allowed tokens the vocabulary lacks kept."""
    eng = tiny_amphista_engine
    tok = eng.tokenizer
    g = Grammar({"type": "regex", "regex": r"(b|c)[0-9]"}, tok, eng.config.vocab_size, eng.eos_ids)
    V = eng.config.vocab_size
    b, c = (tok.encode(s, add_bos=False)[0] for s in "bc")
    draft = torch.randn(2, 3, V)
    con = Constraint(g, 2, "cpu")
    con.consume(torch.tensor([[b], [0]]), torch.tensor([1, 0]))       # row 0 after "b": a digit; row 1: b or c
    got = con.first_head(draft, None)
    digits = {tok.encode(str(d), add_bos=False)[0] for d in range(10)}
    assert {int(i) for i in torch.isfinite(got[0, 0]).nonzero()} <= digits | set(eng.eos_ids)
    assert {int(i) for i in torch.isfinite(got[1, 0]).nonzero()} == {b, c}
    assert torch.equal(got[:, 1:], draft[:, 1:])                          # the other heads untouched
    assert torch.equal(got[0, 0][sorted(digits)], draft[0, 0][sorted(digits)])   # allowed guesses keep their scores
    # a draft vocabulary of slots: slot s scores token perm[s]; row 1's b and c are outside it in one case
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:50]
    keep = perm[(perm != b) & (perm != c)][:40]
    for vocab, row1_free in ((torch.cat([keep, torch.tensor([b, c])]), False), (keep, True)):
        d = torch.randn(2, 3, len(vocab))
        got = Constraint(g, 2, "cpu").first_head(d, lambda slots, v=vocab: v[slots])
        finite = {int(vocab[i]) for i in torch.isfinite(got[1, 0]).nonzero()}
        assert finite == ({int(t) for t in vocab} if row1_free else {b, c})

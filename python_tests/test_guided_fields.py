"""vLLM's structured-output request fields (guided_json, guided_regex, guided_choice, guided_grammar, and the newer
structured_outputs object) as aliases of response_format (serving/server.py -> structured.py), and the "choice"
response_format type they bring to the Python API."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("llguidance")

from amphista_engine.errors import InputError            # noqa: E402

from conftest import serving                              # noqa: E402
from test_serve import call, error_of, sse                # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHOICES = ["red", "green light", "blue", "gr"]      # "gr" a prefix of another: EOS only after a whole choice
REGEX = r"[a-e]{2,4}-[0-9]{2}\."
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "n"], "additionalProperties": False}
LARK = 'start: "colour: " COLOUR\nCOLOUR: "red" | "green" | "blue"'
GBNF = 'root ::= "colour: " colour\ncolour ::= "red" | "green" | "blue"'
PROMPTS = ["The quick brown fox", "jumps over", "the lazy dog and"]
# a system message of its own: the template's default one leaves the tiny model's 128 tokens no room
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tiny_amphista_engine):
    with serving(tiny_amphista_engine, model_id="tiny") as httpd:
        yield httpd


def _completion(url, prompt="The quick brown fox", **fields):
    status, reply = call(url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 24, **fields})
    assert status == 200, reply
    return reply["choices"][0]["text"], reply["choices"][0]["finish_reason"]


def _chat(url, **fields):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 24, **fields}
    status, reply = call(url, "/v1/chat/completions", body)
    assert status == 200, reply
    return reply["choices"][0]["message"]["content"], reply["choices"][0]["finish_reason"]


def test_choice_answers_are_exactly_one_choice_plain_and_speculative(tiny_amphista_engine):
    eng = tiny_amphista_engine
    rf = {"type": "choice", "choices": CHOICES}
    for prompt in PROMPTS:
        free = eng.generate(prompt, max_new_tokens=12)
        assert free.text not in CHOICES                  # the random model does not answer one by itself
        plain = eng.generate(prompt, max_new_tokens=12, response_format=rf)
        assert plain.text in CHOICES and plain.finish_reason == "eos", plain.text
        spec = eng.generate(prompt, max_new_tokens=12, response_format=rf, speculative="amphista", tree="tree-16")
        assert spec.text == plain.text and spec.finish_reason == "eos"
    # sampled: still a whole choice each time; characters Lark or a regex would read as syntax stay literal
    odd = ["a.b*(c)|d", 'say "hi"\\', "ünï €", "line\nbreak"]
    texts = set()
    for seed in range(6):
        r = eng.generate("hi", max_new_tokens=16, response_format={"type": "choice", "choices": odd},
                         temperature=1.5, seed=seed)
        assert r.text in odd and r.finish_reason == "eos", (seed, r.text)
        texts.add(r.text)
    assert len(texts) > 1


def test_choice_allows_eos_only_after_a_whole_choice(tiny_amphista_engine):
    import torch

    from amphista_engine.structured import Constraint, Grammar
    eng = tiny_amphista_engine
    tok, V = eng.tokenizer, eng.config.vocab_size
    g = Grammar({"type": "choice", "choices": CHOICES}, tok, V, eng.eos_ids)
    for text in ("", "g", "gr", "gre", "green", "green light", "blue", "red"):
        ids = tok.encode(text, add_bos=False) if text else []
        con = Constraint(g, 1, "cpu")
        con.consume(torch.tensor([ids or [0]]), torch.tensor([len(ids)]))
        allowed = torch.isfinite(con.apply(torch.zeros(1, V))[0]).nonzero().flatten().tolist()
        eos_ok = any(i in eng.eos_ids for i in allowed)
        assert eos_ok == (text in CHOICES), text
        nexts = {tok.decode([i]) for i in allowed if i not in eng.eos_ids}
        assert all(any(c.startswith(text + n) for c in CHOICES) for n in nexts), (text, nexts)
        assert bool(nexts) == any(c != text and c.startswith(text) for c in CHOICES), (text, nexts)


@pytest.mark.parametrize("rf", [{"type": "choice"}, {"type": "choice", "choices": []},
                                {"type": "choice", "choices": ["a", 3]}, {"type": "choice", "choices": "ab"}])
def test_bad_choice_formats_are_named(tiny_amphista_engine, rf):
    with pytest.raises(InputError, match="type 'choice' needs a non-empty 'choices' list of strings"):
        tiny_amphista_engine.generate("hi", max_new_tokens=4, response_format=rf)


def test_each_field_holds_the_answer(server):
    # guided_choice and structured_outputs.choice: both endpoints, streamed and not, the same choice
    for prompt in PROMPTS:
        text, why = _completion(server.url, prompt, guided_choice=CHOICES)
        assert text in CHOICES and why == "stop", text
        assert _completion(server.url, prompt, structured_outputs={"choice": CHOICES}) == (text, why)
        assert _completion(server.url, prompt, guided_choice=CHOICES, speculative="amphista") == (text, why)
        assert _completion(server.url, prompt, guided_choice=CHOICES, guided_decoding_backend="xgrammar") == (text, why)
    content, why = _chat(server.url, guided_choice=CHOICES)
    assert content in CHOICES and why == "stop"
    events = sse(server.url, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 24,
                                                  "structured_outputs": {"choice": CHOICES}})
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]) == content
    events = sse(server.url, "/v1/completions", {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 24,
                                             "guided_choice": CHOICES})
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == \
        _completion(server.url, PROMPTS[0], guided_choice=CHOICES)[0]
    # guided_regex / structured_outputs.regex: the same answer as response_format's regex
    want = _completion(server.url, response_format={"type": "regex", "regex": REGEX})
    assert re.fullmatch(REGEX, want[0]) and want[1] == "stop", want
    assert _completion(server.url, guided_regex=REGEX) == want
    assert _completion(server.url, structured_outputs={"regex": REGEX}) == want
    # guided_json (an object or a JSON string of one) / structured_outputs.json
    want = _completion(server.url, max_tokens=40,
                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert want[1] == "stop" and set(json.loads(want[0])) == {"ok", "n"}, want
    for fields in ({"guided_json": SCHEMA}, {"guided_json": json.dumps(SCHEMA)},
                   {"structured_outputs": {"json": SCHEMA}}):
        assert _completion(server.url, max_tokens=40, **fields) == want, fields
    # json_object: a JSON object whenever it ends by EOS
    text, why = _chat(server.url, max_tokens=40, structured_outputs={"json_object": True})
    assert why == "length" or isinstance(json.loads(text), dict), text
    # guided_grammar: Lark as response_format's grammar takes it, and GBNF (vLLM's xgrammar syntax) mapped to it
    want = _completion(server.url, response_format={"type": "grammar", "grammar": LARK})
    assert want[0] in ("colour: red", "colour: green", "colour: blue") and want[1] == "stop", want
    assert _completion(server.url, guided_grammar=LARK) == want
    assert _completion(server.url, guided_grammar=GBNF) == want
    assert _completion(server.url, structured_outputs={"grammar": GBNF}) == want


def test_json_whitespace_options(server):
    """guided_whitespace_pattern / structured_outputs.whitespace_pattern set the whitespace JSON may hold;
    disable_any_whitespace allows none."""
    for fields in ({"guided_json": SCHEMA, "guided_whitespace_pattern": "[ ]{3}"},
                   {"structured_outputs": {"json": SCHEMA, "whitespace_pattern": "[ ]{3}"}},
                   {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
                    "guided_whitespace_pattern": "[ ]{3}"}):
        text, why = _completion(server.url, max_tokens=60, temperature=1.5, seed=3, **fields)
        if why == "stop":
            json.loads(text)
        runs = re.findall(r"\s+", re.sub(r'"[^"]*"', "", text))    # the whitespace between JSON's tokens
        assert runs and set(runs) == {"   "}, text
    for seed in range(3):
        text, _ = _completion(server.url, max_tokens=60, temperature=1.5, seed=seed,
                              structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
        assert not re.search(r"\s", re.sub(r'"[^"]*"', "", text)), text


def test_requests_with_other_constraints_do_not_share_a_run(server, tiny_amphista_engine):
    """The mapped response_format is part of the batch key: each request gets the answer it gets alone."""
    import concurrent.futures

    from amphista_engine.serving.batching import batch_key
    bodies = [{"guided_choice": CHOICES}, {"guided_regex": REGEX}, {"structured_outputs": {"grammar": GBNF}}, {}]
    alone = [_completion(server.url, **b) for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = list(pool.map(lambda b: _completion(server.url, **b), bodies * 2))
    assert together == alone * 2
    app = server.app
    keys = [batch_key(app.decoding({"prompt": "Hi", "max_tokens": 8, **b}, "Hi", False), {}) for b in bodies]
    assert len(set(keys)) == len(bodies)
    # the same constraint in vLLM's two spellings and as response_format: one run may take them all
    same = [{"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}},
            {"response_format": {"type": "choice", "choices": CHOICES}}]
    assert len({batch_key(app.decoding({"prompt": "Hi", "max_tokens": 8, **b}, "Hi", False), {}) for b in same}) == 1


@pytest.mark.parametrize("fields,words,param", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"},
     ["response_format and guided_regex"], "guided_regex"),
    ({"guided_choice": ["a"], "guided_json": SCHEMA}, ["guided_json and guided_choice"], "guided_choice"),
    ({"guided_regex": "a+", "structured_outputs": {"choice": ["a"]}},
     ["guided_regex and structured_outputs.choice"], "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a+", "json_object": True}},
     ["structured_outputs.regex and structured_outputs.json_object"], "structured_outputs.json_object"),
    ({"guided_choice": []}, ["guided_choice must be a non-empty list of strings"], "guided_choice"),
    ({"guided_choice": "yes"}, ["guided_choice must be a non-empty list"], "guided_choice"),
    ({"guided_choice": ["yes", 1]}, ["guided_choice[1] must be a string"], "guided_choice"),
    ({"structured_outputs": {"choice": []}}, ["structured_outputs.choice must be a non-empty"],
     "structured_outputs.choice"),
    ({"guided_regex": 5}, ["guided_regex must be a non-empty regex string"], "guided_regex"),
    ({"guided_regex": "[a-"}, ["guided_regex", "unclosed character class"], "guided_regex"),
    ({"guided_json": [1, 2]}, ["guided_json must be a JSON schema object"], "guided_json"),
    ({"guided_json": "{not json"}, ["guided_json is not valid JSON"], "guided_json"),
    ({"guided_json": {"type": "bogus"}}, ["guided_json", "bogus"], "guided_json"),
    ({"guided_grammar": "root ::= undefined_rule"}, ["guided_grammar", "undefined_rule"], "guided_grammar"),
    ({"guided_grammar": "root ::= (\"a\""}, ["guided_grammar, read as GBNF/EBNF", "Expected ')'"], "guided_grammar"),
    ({"structured_outputs": {"json_object": "yes"}}, ["structured_outputs.json_object must be true or false"],
     "structured_outputs.json_object"),
    ({"structured_outputs": "regex"}, ["structured_outputs must be an object"], "structured_outputs"),
    ({"structured_outputs": {"regexp": "a"}}, ["no key 'regexp'"], "structured_outputs.regexp"),
    ({"structured_outputs": {"structural_tag": "{}"}}, ["structural_tag is not supported"],
     "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": SCHEMA, "disable_additional_properties": 1}},
     ["disable_additional_properties must be true or false"], "structured_outputs.disable_additional_properties"),
    ({"guided_regex": "a+", "guided_whitespace_pattern": " "}, ["guided_regex is not JSON"],
     "guided_whitespace_pattern"),
    ({"guided_whitespace_pattern": " "}, ["needs a JSON constraint"], "guided_whitespace_pattern"),
    ({"guided_json": SCHEMA, "guided_whitespace_pattern": "[a-"}, ["guided_whitespace_pattern", "unclosed"],
     "guided_whitespace_pattern"),
    ({"guided_regex": "a+", "guided_decoding_backend": 3}, ["guided_decoding_backend must be a string"],
     "guided_decoding_backend"),
])
def test_bad_fields_are_400s_naming_them(server, fields, words, param):
    for path, base in (("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": MESSAGES})):
        error_of(call(server.url, path, {"model": "tiny", "max_tokens": 8, **base, **fields}), 400, *words, param=param)


def test_errors_found_as_the_run_starts_name_the_field(server):
    """A grammar's fit to the tokenizer is checked when its run starts (the engine's response_format error): the
    reply names the field the client sent."""
    for fields, param in (({"guided_regex": r"[^\s\S]"}, "guided_regex"),
                          ({"structured_outputs": {"regex": r"[^\s\S]"}}, "structured_outputs.regex"),
                          ({"response_format": {"type": "regex", "regex": r"[^\s\S]"}}, "response_format")):
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 8, **fields}
        err = error_of(call(server.url, "/v1/completions", body), 400, "matches no text at all", param=param)
        assert err["message"].startswith(param), err


def test_guided_fields_do_not_mix_with_tools(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    error_of(call(server.url, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES,
                                                   "tools": tools, "guided_choice": ["a"]}),
             400, "guided_choice does not mix with tools", param="guided_choice")


def test_a_request_without_these_fields_is_unchanged(server, tiny_amphista_engine):
    free = tiny_amphista_engine.generate("The quick brown fox", max_new_tokens=24)
    assert _completion(server.url) == (free.text, "length")
    # fields that ask for nothing: the same free answer
    nothing = {"guided_json": None, "guided_choice": None, "structured_outputs": {"json_object": False},
               "guided_decoding_backend": "auto", "response_format": {"type": "text"}}
    assert _completion(server.url, **nothing) == (free.text, "length")
    assert _completion(server.url, structured_outputs=None) == (free.text, "length")

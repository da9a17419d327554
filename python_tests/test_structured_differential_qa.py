"""A seeded differential sweep over constrained decoding on the real SmolLM2-135M (4-bit) with its shipped Amphista
heads: greedy speculative decoding (dynamic-4, dynamic-8, mix-16 and a chain) must give plain greedy's tokens, text and
finish_reason, and the same tool calls, where a grammar holds the answer: response_format json_object / json_schema
(random schemas: nested objects, enums, arrays with minItems/maxItems, integers, numbers, booleans, null, string
lengths, required and optional keys) and tools under tool_choice "required" or a named function; answers often cut by
max_new_tokens mid-JSON. A stream's text must equal its result's, and a batch's rows the rows run alone.
A wider sweep (several hundred seeds, the server's streamed and non-streamed chat completions too) found no mismatch."""
from __future__ import annotations

import random

import pytest

from conftest import needs_smollm2, smollm2_with_shipped_heads

TREES = ["dynamic-4", "dynamic-8", "mix-16", "chain-3"]
WORDS = ["name", "age", "city", "tags", "ok", "score", "kind", "info", "items", "note"]
PROMPTS = ["Describe a cat as JSON.", "Give me a user record.", "List some fruits as JSON.", "Weather in Paris?"]


def _schema(r: random.Random, depth: int = 0) -> dict:
    k = r.random()
    if depth < 2 and k < 0.3:
        keys = r.sample(WORDS, r.randint(1, 3))
        s = {"type": "object", "properties": {w: _schema(r, depth + 1) for w in keys},
             "required": [w for w in keys if r.random() < 0.6]}
        if r.random() < 0.7:
            s["additionalProperties"] = False
        return s
    if depth < 2 and k < 0.45:
        a = {"type": "array", "items": _schema(r, depth + 1)}
        if r.random() < 0.5:
            a["minItems"] = r.randint(0, 2)
        if r.random() < 0.5:
            a["maxItems"] = a.get("minItems", 0) + r.randint(0, 2)
        return a
    t = r.choice(["string", "integer", "number", "boolean", "null", "enum", "string"])
    if t == "enum":
        return {"enum": r.sample(["red", "green", "blue", 1, 2, None, True], r.randint(1, 3))}
    s = {"type": t}
    if t == "string" and r.random() < 0.5:
        s["minLength"] = r.randint(0, 3)
        s["maxLength"] = s["minLength"] + r.randint(0, 10)
    return s


def _object(r: random.Random) -> dict:
    keys = r.sample(WORDS, r.randint(1, 4))
    return {"type": "object", "properties": {w: _schema(r, 1) for w in keys},
            "required": [w for w in keys if r.random() < 0.6], "additionalProperties": False}


def _key(result):
    return result.token_ids, result.text, result.finish_reason


@pytest.fixture(scope="module")
def smol():
    return smollm2_with_shipped_heads(max_seq_len=1024)


@needs_smollm2
@pytest.mark.parametrize("seed", range(5))      # each kind of constraint once
def test_speculative_equals_plain_under_a_grammar(smol, seed):
    from amphista_engine.tools import generate_with_tools
    r = random.Random(seed)
    kind = ["json_object", "json_schema", "tools_required", "tools_named", "batch"][seed]
    mx, tree = r.randint(8, 40), r.choice(TREES)
    spec = {"speculative": "amphista", "tree": tree}
    q = [{"role": "user", "content": r.choice(PROMPTS)}]
    if kind.startswith("tools"):
        tools = [{"type": "function", "function": {"name": f"fn_{i}_{r.choice(WORDS)}", "parameters": _object(r)}}
                 for i in range(r.randint(1, 3))]
        choice = ("required" if kind == "tools_required" else
                  {"type": "function", "function": {"name": r.choice(tools)["function"]["name"]}})
        p = generate_with_tools(smol, q, tools, choice, max_new_tokens=mx)
        s = generate_with_tools(smol, q, tools, choice, max_new_tokens=mx, **spec)
        assert _key(s[0]) == _key(p[0]) and s[1:] == p[1:], (p, s)
        return
    if kind == "batch":
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": _object(r)}}
        prompts = [q, [{"role": "user", "content": "Another one."}]]
        alone = [smol.generate(x, max_new_tokens=mx, response_format=rf) for x in prompts]
        plain = smol.generate_batch(prompts, max_new_tokens=mx, response_format=rf)
        fast = smol.generate_batch(prompts, max_new_tokens=mx, response_format=rf, **spec)
        assert [_key(x) for x in fast] == [_key(x) for x in plain] == [_key(x) for x in alone]
        return
    rf = ({"type": "json_object"} if kind == "json_object" else
          {"type": "json_schema", "json_schema": {"name": "x", "schema": _object(r)}})
    plain = smol.generate(q, max_new_tokens=mx, response_format=rf)
    fast = smol.generate(q, max_new_tokens=mx, response_format=rf, **spec)
    streamed = "".join(smol.stream(q, max_new_tokens=mx, response_format=rf, **spec))
    assert _key(fast) == _key(plain) and streamed == fast.text, (plain, fast, streamed)

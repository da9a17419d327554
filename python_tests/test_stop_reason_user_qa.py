"""Today's features as a user coming from vLLM meets them: stop_reason where several stop strings match in one token
(ours: the first to end in the text, of those the longest, whatever the list's order; vLLM takes the list's order),
huge integers inside JSON schemas sent as strings and in the CLI's JSON flags (named, never quoted back or met by
Python's int-to-str advice), bind()'s port, and the speculation check's note under penalties (only the penalties in
force, and only sampling that weighs)."""
from __future__ import annotations

import pytest

from amphista_engine import InputError

from conftest import serving
from test_serve import call, error_of
from test_speculation_check import _synthetic_steps

pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "The quick brown fox"
RAW = "1" + "0" * 5000              # 5001 digits: past what json.loads and int() read
LONG = "1" + "0" * 999              # 1000 digits: read, but far past anything a schema or option means


def _schema(digits: str) -> str:
    return '{"type": "integer", "maximum": %s}' % digits


def test_two_stop_strings_ending_in_one_token_report_the_first_to_end(tiny_amphista_engine):
    """A token that completes two stops at once ("a" and "an" in the token "an"): the one that ends first ("a", as
    where the token came as "a" + "n") is the stop_reason, in either list order, with include_stop_str_in_output
    too; the other rows of the batch end as they would alone, their stop_reason None."""
    eng = tiny_amphista_engine
    ban = {eng.eos_ids[0]: -100}
    full = eng.generate(PROMPT, 12, chat=False, logit_bias=ban)
    for i, tok in enumerate(full.token_ids):
        piece, before = eng.tokenizer.decode([tok]), eng.tokenizer.decode(full.token_ids[:i])
        if len(piece) >= 2 and piece.isprintable() and piece[0] not in before and full.text.startswith(before + piece):
            break
    else:
        pytest.skip(f"no multi-character token in {full.text!r}")
    for stop in ([piece[0], piece], [piece, piece[0]]):
        for keep in (False, True):
            r = eng.generate(PROMPT, 12, chat=False, logit_bias=ban, stop=stop, include_stop_str_in_output=keep)
            assert (r.finish_reason, r.stop_reason) == ("stop", piece[0]), (stop, keep)
            assert r.text == before + (piece[0] if keep else "") and r.to_dict()["stop_reason"] == piece[0]
    rows = eng.generate_batch([PROMPT, "hello"], 12, chat=False, logit_bias=ban, stop=[piece])
    alone = eng.generate("hello", 12, chat=False, logit_bias=ban, stop=[piece])
    assert rows[0].stop_reason == piece and (rows[1].text, rows[1].stop_reason) == (alone.text, alone.stop_reason)


@pytest.mark.parametrize("digits", [LONG, RAW])
def test_a_schema_string_holding_a_huge_integer_is_named(tiny_amphista_engine, digits):
    """A JSON schema sent as a string is read by us, not by the request's walk: its bound of 1000 digits reached
    llguidance ("Value is not JSON serializable: 1000...0"), one of 5001 met json.loads' ValueError, whose advice
    (sys.set_int_max_str_digits) no client can follow."""
    n = len(digits)
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": _schema(digits)}}
    with pytest.raises(InputError, match=rf"^response_format json_schema.schema\['maximum'\] is an integer of {n} "
                                         r"digits: far out of range") as e:
        tiny_amphista_engine.generate(PROMPT, 3, chat=False, response_format=rf)
    assert digits not in str(e.value) and "set_int_max_str_digits" not in str(e.value)
    with serving(tiny_amphista_engine, model_id="tiny", log=lambda line: None) as httpd:
        closing = {"json": _schema(digits), "disable_additional_properties": True}
        for field, body in (("guided_json", {"guided_json": _schema(digits)}),
                            ("structured_outputs.json", {"structured_outputs": closing})):
            err = error_of(call(httpd.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, **body}), 400,
                           f"is an integer of {n} digits", param=field)
            assert err["message"].startswith(f"{field}['maximum']") and digits not in err["message"], err


@pytest.mark.parametrize("flag, value, named", [
    ("--json-schema", _schema(RAW), "--json-schema['maximum'] is an integer of 5001 digits"),
    ("--json-schema", _schema(LONG), "--json-schema['maximum'] is an integer of 1000 digits"),
    ("--chat-template-kwargs", '{"enable_thinking": %s}' % RAW,
     "--chat-template-kwargs['enable_thinking'] is an integer of 5001 digits"),
])
def test_cli_json_flags_name_a_huge_integer(flag, value, named, capsys):
    from amphista_engine.cli import main
    code = main(["generate", "hi", flag, value, "--generation-config", "none", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"amphista: error: {named}: far out of range" in err, err
    assert "0" * 900 not in err and "set_int_max_str_digits" not in err, err


def test_bind_names_a_huge_port():
    from amphista_engine.serving.server import bind
    with pytest.raises(InputError, match="^port is an integer of 5001 digits"):
        bind("127.0.0.1", 10 ** 5000)


def test_the_speculation_note_names_what_weighs_and_only_that(tiny_fp32_amphista4_engine, monkeypatch):
    """`amphista generate --speculative auto --repetition-penalty 1.3` printed "penalties (repetition 1.3, presence
    0, frequency 0) keeps 46% ...": penalties that are off named as if they counted, and "keeps" after a plural. A
    temperature that keeps every token (0.3) was named beside a penalty as if it shared the cut."""
    import amphista_engine.speculation_check as sc
    engine = tiny_fp32_amphista4_engine
    monkeypatch.setattr(sc, "_time_steps", _synthetic_steps([]))
    monkeypatch.setattr(engine.heads.config, "extra", {"tree_search": {"decoding_tau": {"tree-16": 2.5}}})

    def reason(**kw):
        return sc.check_speculation(engine, "tree-16", repeats=1, warmup=0, **kw).reason
    assert "of the tokens past the first" not in reason()         # greedy, no penalty: nothing weighs
    strong = reason(penalties=(1.3, 0.0, 0.0))
    assert "x0.9, penalties (repetition 1.3) keep 46% of the tokens past the first)" in strong, strong
    assert "presence" not in strong and "frequency" not in strong
    assert "temperature" not in reason(temperature=0.3, penalties=(1.3, 0.0, 0.0))
    both = reason(temperature=0.7, penalties=(1.0, 0.8, 0.5))
    assert "sampling at temperature 0.7 and penalties (presence 0.8, frequency 0.5) keep" in both, both
    assert "sampling at temperature 0.7 keeps" in reason(temperature=0.7)
    # a penalty that favours repeats counts as off: nothing named
    assert "penalties" not in reason(penalties=(0.9, -0.5, 0.0))

"""Integers too long for Python to write (10**5000: int-to-str stops at 4300 digits) given as options, token ids,
engine arguments, request fields or flags: an InputError (a 400, an argparse error) naming the field, never Python's
ValueError "Exceeds the limit (4300 digits) for integer string conversion" raised inside our own message."""
from __future__ import annotations

import pytest

from amphista_engine.errors import HUGE_INT_DIGITS, AmphistaError, InputError

from conftest import serving                              # noqa: E402
from test_serve import call, error_of                     # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

H = 10 ** 5000                  # 5001 digits
DIGITS = "5001 digits"
RAW = "1" + "0" * 5000          # the same number as a request body or a flag writes it


@pytest.mark.parametrize("options, name", [
    ({"max_new_tokens": H}, "max_new_tokens"),
    ({"max_new_tokens": [H]}, "max_new_tokens[0]"),
    ({"seed": H}, "seed"),
    ({"stop_token_ids": [1, H]}, "stop_token_ids[1]"),
    ({"logit_bias": {H: 1.0}}, "logit_bias has a key"),
    ({"logit_bias": {5: H}}, "logit_bias[5]"),
    ({"n": H}, "n is"),
    ({"allowed_token_ids": [H]}, "allowed_token_ids[0]"),
    ({"min_tokens": H}, "min_tokens"),
    ({"top_k": H}, "top_k"),
    ({"temperature": -H}, "temperature"),
    ({"logprobs": True, "top_logprobs": H}, "top_logprobs"),
    ({"truncate_prompt_tokens": H}, "truncate_prompt_tokens"),
    ({"speculative": "amphista", "tree": [[0], [H]]}, "tree[1][0]"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "maximum": H}}}}, "response_format['json_schema']['schema']['maximum']"),
])
def test_api_options_name_the_huge_int(tiny_amphista_engine, options, name):
    with pytest.raises(InputError) as e:
        tiny_amphista_engine.generate_batch(["hi"], **{"max_new_tokens": 2, **options})
    assert str(e.value).startswith(name) and DIGITS in str(e.value), e.value


@pytest.mark.parametrize("method", ["generate", "stream"])
def test_n_of_one_answer_methods(tiny_amphista_engine, method):
    with pytest.raises(InputError, match=f"^n is an integer of {DIGITS}"):
        getattr(tiny_amphista_engine, method)("hi", max_new_tokens=2, n=H)


def test_logit_bias_key_as_a_string_of_digits(tiny_amphista_engine):
    with pytest.raises(InputError, match="^logit_bias: a key is a string of 5001 digits"):
        tiny_amphista_engine.generate("hi", max_new_tokens=2, logit_bias={RAW: 1.0})


def test_token_id_prompts(tiny_amphista_engine):
    eng = tiny_amphista_engine
    with pytest.raises(InputError, match=f"a token id of {DIGITS} \\(at position 1 of the prompt\\)"):
        eng.generate([1, H], max_new_tokens=2)
    with pytest.raises(InputError, match=f"^prompt 1: a token id of {DIGITS}"):
        eng.generate_batch([[1, 2], [1, H]], max_new_tokens=2)
    with pytest.raises(InputError, match=f"a token id of {DIGITS}"):
        eng.prompt_logprobs([1, H])
    with pytest.raises(InputError, match=f"^top_logprobs is an integer of {DIGITS}"):
        eng.prompt_logprobs([1, 2], top_logprobs=H)


def test_admitted_joiner_with_a_huge_limit_is_refused_by_name(tiny_amphista_engine):
    eng = tiny_amphista_engine
    eng.reserve_batch(2)
    pending = [[([1, H], 2)], [("hi", H)]]        # one joiner per call (one row is free): popped from the end

    def admit(free):
        return pending.pop() if pending else []
    errors = [item for _, item in eng.stream_batch(["hi"], max_new_tokens=4, admit=admit)
              if isinstance(item, AmphistaError)]
    assert [type(e) for e in errors] == [InputError, InputError], errors
    assert str(errors[0]).startswith("max_new_tokens is an integer of " + DIGITS), errors[0]
    assert f"a token id of {DIGITS}" in str(errors[1]), errors[1]


def test_sampling_params_and_engine_arguments(tiny_amphista_engine, tiny_hf_dir):
    from amphista_engine import Engine
    from amphista_engine.sampling import SamplingParams
    for field in ("seed", "top_k"):
        with pytest.raises(InputError, match=f"^{field} is an integer of {DIGITS}"):
            SamplingParams(**{field: H})
    with pytest.raises(InputError, match=f"^logit_bias has a key that is an integer of {DIGITS}"):
        SamplingParams(logit_bias={H: 1.0})
    for arg in ("max_seq_len", "max_batch_size"):
        with pytest.raises(InputError, match=f"^{arg} is an integer of {DIGITS}"):
            Engine.from_pretrained(str(tiny_hf_dir), device="cpu", **{arg: H})
    with pytest.raises(InputError, match=f"^max_seq_len is an integer of {DIGITS}"):
        Engine(tiny_amphista_engine.loaded, max_seq_len=H)
    with pytest.raises(InputError, match=f"^max_batch_size is an integer of {DIGITS}"):
        tiny_amphista_engine.reserve_batch(H)


def test_a_cache_of_hundreds_of_digits_and_a_tree_string_holding_a_huge_rank(tiny_amphista_engine, tiny_hf_dir):
    """Below the refusal's 640 digits, a max_seq_len still needs more GiB than a float holds (the cache check's
    division overflowed), and a tree given as a JSON string met json's own ValueError for an int past 4300 digits."""
    from amphista_engine import Engine
    from amphista_engine.errors import CacheFullError, ConfigError
    with pytest.raises(CacheFullError, match="needs more memory than any machine has"):
        Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=10 ** 400)
    with pytest.raises(ConfigError, match="neither a tree name nor a JSON list of paths"):
        tiny_amphista_engine.generate("Hi", 2, speculative="amphista", tree="[[0], [" + "1" * 5000 + "]]")


def test_ordinary_and_boundary_values_keep_their_messages(tiny_amphista_engine):
    eng = tiny_amphista_engine
    # 640 digits can always be written (the lowest int-to-str limit Python takes): the option's own check speaks
    assert HUGE_INT_DIGITS == 640
    with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        eng.generate("hi", max_new_tokens=2, seed=10 ** 639, temperature=0.5)
    with pytest.raises(InputError, match="^seed is an integer of 641 digits"):
        eng.generate("hi", max_new_tokens=2, seed=10 ** 640, temperature=0.5)
    with pytest.raises(InputError, match="token id 300 "):
        eng.generate([1, 300], max_new_tokens=2)
    out = eng.generate_batch(["hi", "ho"], max_new_tokens=[2, 3], seed=2**64 - 1, temperature=0.7,
                             logit_bias={5: 1.0}, stop_token_ids=[7])
    assert len(out) == 2


@pytest.fixture(scope="module")
def server(tiny_amphista_engine):
    with serving(tiny_amphista_engine, model_id="tiny") as httpd:
        yield httpd


COMPLETION = '{"model": "tiny", "prompt": "hi", "max_tokens": 2, %s}'


@pytest.mark.parametrize("path, body, param, named", [
    ("/v1/completions", '{"model": "tiny", "prompt": "hi", "max_tokens": %s}' % RAW, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
     '"max_completion_tokens": %s}' % RAW, "max_completion_tokens", "max_completion_tokens"),
    ("/v1/completions", COMPLETION % f'"seed": {RAW}', "seed", "seed"),
    ("/v1/completions", COMPLETION % f'"n": {RAW}', "n", "n"),
    ("/v1/completions", COMPLETION % f'"temperature": -{RAW}', "temperature", "temperature"),
    ("/v1/completions", COMPLETION % f'"logit_bias": {{"5": {RAW}}}', "logit_bias", "logit_bias['5']"),
    ("/v1/completions", COMPLETION % f'"logit_bias": {{"{RAW}": 1}}', "logit_bias", "logit_bias: a key"),
    ("/v1/completions", COMPLETION % f'"stop_token_ids": [3, {RAW}]', "stop_token_ids", "stop_token_ids[1]"),
    ("/v1/completions", COMPLETION % f'"tree": [[0], [{RAW}]], "speculative": "amphista"', "tree", "tree[1][0]"),
    ("/v1/completions", '{"model": "tiny", "prompt": [1, %s], "max_tokens": 2}' % RAW, "prompt", "prompt[1]"),
    ("/v1/completions", '{"model": "tiny", "prompt": [[1], [1, %s]], "max_tokens": 2}' % RAW, "prompt",
     "prompt[1][1]"),
    ("/tokenize", '{"model": "tiny", "prompt": [1, %s]}' % RAW, "prompt", "prompt[1]"),
    ("/detokenize", '{"model": "tiny", "tokens": [1, %s]}' % RAW, "tokens", "tokens[1]"),
])
def test_server_names_the_field_of_a_json_integer_too_long_to_read(server, path, body, param, named):
    err = error_of(call(server.url, path, raw=body.encode()), 400, DIGITS, param=param)
    assert err["message"].startswith(named), err
    assert "not valid JSON" not in err["message"], err


def test_server_integers_readable_but_huge(server):
    # 1000 digits: json reads them; past a float's range (temperature) the batch key's float() raised a 500
    for digits in (400, 1000):
        big = "1" + "0" * (digits - 1)
        error_of(call(server.url, "/v1/completions", raw=(COMPLETION % f'"temperature": {big}').encode()), 400,
                 f"{digits} digits", param="temperature")
    big = "1" + "0" * 999
    for field, named in (("seed", "seed"), ("top_k", "top_k"), ("stop_token_ids", "stop_token_ids[0]")):
        value = f"[{big}]" if field == "stop_token_ids" else big
        err = error_of(call(server.url, "/v1/completions", raw=(COMPLETION % f'"{field}": {value}').encode()), 400,
                       "1000 digits", param=field)
        assert err["message"].startswith(named), err
    # an ordinary body still works, and a body that is not JSON is still said to be so
    status, reply = call(server.url, "/v1/completions", raw=(COMPLETION % '"seed": 3').encode())
    assert status == 200, reply
    error_of(call(server.url, "/v1/completions", raw=b'{"model": 1'), 400, "not valid JSON")


def test_server_body_that_is_no_object(server):
    err = error_of(call(server.url, "/v1/completions", raw=f"[1, {RAW}]".encode()), 400, DIGITS)
    assert err["message"].startswith("the request body[1]"), err


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--seed", "--top-k", "--min-tokens", "--stop-token-id",
                                  "--max-seq-len", "--top-logprobs"])
def test_cli_int_flags(flag, capsys):
    from amphista_engine.cli import build_parser, main
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", flag, RAW])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: an integer of 5001 digits: far out of range" in err, err
    assert RAW not in err
    # ordinary values parse as int() parses them, and what int() refuses is still argparse's "invalid int value"
    assert getattr(build_parser().parse_args(["generate", "hi", flag, "1_0"]), "stop_token_ids" if flag ==
                   "--stop-token-id" else flag[2:].replace("-", "_")) in (10, [10])
    with pytest.raises(SystemExit):
        main(["generate", "hi", flag, "x"])
    assert f"argument {flag}: invalid int value: 'x'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [(["serve", "--port"], "--port"), (["serve", "--max-batch"], "--max-batch"),
                                        (["eval", "--questions", "q.jsonl", "--limit"], "--limit"),
                                        (["bench", "--repeats"], "--repeats"),
                                        (["train", "--data", "d", "--out", "o", "--steps"], "--steps"),
                                        (["distill", "--prompts", "p", "--out", "o", "--batch-size"], "--batch-size")])
def test_other_commands_int_flags(argv, flag, capsys):
    """serve, eval/bench and the training commands' integer flags: the number's length, not all its digits."""
    from amphista_engine.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv + [RAW])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: an integer of 5001 digits: far out of range" in err, err


def test_cli_logit_bias_token_id(tiny_hf_dir, capsys):
    from amphista_engine.cli import main
    code = main(["generate", "hi", "--model", str(tiny_hf_dir), "--device", "cpu", "--logit-bias", f"{RAW}=1",
                 "--temperature", "0", "--top-k", "0", "--top-p", "1", "--min-p", "0", "--repetition-penalty", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--logit-bias: the token id is an integer of 5001 digits" in err, err


"""Differential QA of `amphista generate` against Engine.generate (2026-12): a seeded sweep draws flag sets, runs the
CLI in-process on one engine (from_pretrained cached), records the options that reach stream_batch, and checks them
and the --json output against the API call with the options the flags document. Then one test per bug found."""
from __future__ import annotations

import contextlib
import io
import json
import random
import warnings

import pytest

from amphista_engine import Engine, cli
from amphista_engine.cli import build_parser, main

pytest.importorskip("transformers")        # tiny_hf_dir writes its checkpoint with it

PROMPTS = ["The quick brown fox", "List three colors:", "What is 2+2?"]
API_DEFAULTS = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, stop=None, seed=None,
                    chat=None, speculative=None, tree=None, presence_penalty=0.0, frequency_penalty=0.0,
                    logit_bias=None, ignore_eos=False, min_tokens=0, stop_token_ids=None, response_format=None,
                    logprobs=False, top_logprobs=0, include_stop_str_in_output=False, bad_words=None,
                    allowed_token_ids=None, truncate_prompt_tokens=None)


@pytest.fixture(scope="module")
def tiny_engine(tiny_hf_dir):
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256)


@pytest.fixture
def wired(tiny_engine, monkeypatch):
    """The CLI loads tiny_engine (template reset per run); the options each run passes are recorded."""
    loads, runs = [], []

    def from_pretrained(model, **options):
        loads.append(options)
        tiny_engine.chat_template = options.get("chat_template")
        return tiny_engine
    real = Engine.stream_batch

    def spy(self, prompts, max_new_tokens=256, **options):
        runs.append(dict(prompts=prompts, max_new_tokens=max_new_tokens, **options))
        return real(self, prompts, max_new_tokens, **options)
    monkeypatch.setattr(Engine, "from_pretrained", from_pretrained)
    monkeypatch.setattr(Engine, "stream_batch", spy)
    return loads, runs


def _run(argv, stdin=None):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if stdin is not None:
            old, cli.sys.stdin = cli.sys.stdin, io.StringIO(stdin)
        try:
            rc = main(argv)
        finally:
            if stdin is not None:
                cli.sys.stdin = old
    return rc, out.getvalue(), err.getvalue()


def _draw(rng, model):
    """(argv, the documented API options, prompt as the API takes it)."""
    n = rng.choice([1, 4, 12])
    argv, api = ["--model", model, "--device", "cpu", "--heads", "none", "--max-new-tokens", str(n)], {}
    api["max_new_tokens"] = n
    if rng.random() < 0.5:
        api.update(temperature=rng.choice([0.7, 1.2]), seed=rng.randrange(1000))
        argv += ["--temperature", str(api["temperature"]), "--seed", str(api["seed"])]
        for flag, key, values in (("--top-k", "top_k", [1, 8]), ("--top-p", "top_p", [0.5, 0.9]),
                                  ("--min-p", "min_p", [0.05, 0.2])):
            if rng.random() < 0.4:
                api[key] = rng.choice(values)
                argv += [flag, str(api[key])]
    for flag, key, values in (("--repetition-penalty", "repetition_penalty", [1.1, 1.3]),
                              ("--presence-penalty", "presence_penalty", [0.5, -0.5]),
                              ("--frequency-penalty", "frequency_penalty", [1.0, -0.5])):
        if rng.random() < 0.3:
            api[key] = rng.choice(values)
            argv += [flag, str(api[key])]
    if rng.random() < 0.3:
        api["stop"] = rng.sample(["a", "e", ".", " "], 2)
        argv += [x for s in api["stop"] for x in ("--stop", s)]
    if rng.random() < 0.3:
        api["logit_bias"] = {rng.randrange(60): rng.choice([-100.0, 5.0]) for _ in range(2)}
        argv += [x for k, v in api["logit_bias"].items() for x in ("--logit-bias", f"{k}={v}")]
    if rng.random() < 0.15:
        api["response_format"] = {"type": "regex", "regex": "[a-z ]+"}
        argv += ["--regex", "[a-z ]+"]
    else:
        if rng.random() < 0.2:
            api["ignore_eos"] = True
            argv += ["--ignore-eos"]
        if rng.random() < 0.3:
            api["min_tokens"] = rng.randint(0, n)
            argv += ["--min-tokens", str(api["min_tokens"])]
    if rng.random() < 0.2:
        api["stop_token_ids"] = rng.sample(range(1, 60), 2)
        argv += [x for i in api["stop_token_ids"] for x in ("--stop-token-id", str(i))]
    if "stop" in api and rng.random() < 0.5:
        api["include_stop_str_in_output"] = True
        argv += ["--include-stop-str-in-output"]
    if rng.random() < 0.2:
        api["bad_words"] = rng.sample(["the", "a", "fox"], 2)
        argv += [x for w in api["bad_words"] for x in ("--bad-word", w)]
    if rng.random() < 0.2:
        api["allowed_token_ids"] = rng.sample(range(3, 60), 8) + [2]
        argv += [x for i in api["allowed_token_ids"] for x in ("--allowed-token-id", str(i))]
    if rng.random() < 0.2:
        api["truncate_prompt_tokens"] = rng.randint(1, 6)
        argv += ["--truncate-prompt-tokens", str(api["truncate_prompt_tokens"])]
    api["chat"] = rng.choice([None, True, False])
    argv += {None: [], True: ["--chat"], False: ["--no-chat"]}[api["chat"]]
    prompt = rng.choice(PROMPTS)
    if api["chat"] is not False and rng.random() < 0.3:
        argv += ["--system", "Be brief."]
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    if api["chat"] is not False and rng.random() < 0.2:
        api["chat_template"] = "chatml"
        argv += ["--chat-template", "chatml"]
    if rng.random() < 0.7:
        argv += ["--json"]
        if rng.random() < 0.5:
            api["logprobs"] = True
            argv += ["--logprobs"]
            if rng.random() < 0.5:
                api["top_logprobs"] = 3
                argv += ["--top-logprobs", "3"]
    text = prompt if isinstance(prompt, str) else prompt[1]["content"]
    return ["generate", text, *argv], api, prompt


def test_seeded_sweep_of_generate_flags_equals_the_api(tiny_hf_dir, tiny_engine, wired, one_thread):
    loads, runs = wired
    rng, compared = random.Random(20261212), 0
    for case in range(120):        # every flag drawn in at least 9 of them (chat_template's 9 the fewest)
        argv, api, prompt = _draw(rng, str(tiny_hf_dir))
        loads.clear()
        runs.clear()
        rc, out, err = _run(argv)
        if rc != 0:       # the API refuses the same options (the CLI only said so before the load)
            with pytest.raises(Exception):
                tiny_engine.chat_template = api.pop("chat_template", None)
                tiny_engine.generate(prompt, **api)
            continue
        template = api.pop("chat_template", None)
        assert loads[-1].get("chat_template") == template, argv
        assert len(runs) == 1 and runs[0]["prompts"] == [prompt], argv
        want = dict(API_DEFAULTS, **api)
        got = {k: runs[0].get(k, API_DEFAULTS.get(k)) for k in want}
        got["stop_token_ids"] = got["stop_token_ids"] or None
        assert got == want, argv
        tiny_engine.chat_template = template
        res = tiny_engine.generate(prompt, **api)
        if "--json" in argv:
            cli_json, api_json = json.loads(out), res.to_dict()
            for key in ("text", "token_ids", "prompt_tokens", "finish_reason", "stop_reason", "token_logprobs",
                        "top_logprobs"):
                assert cli_json.get(key) == api_json.get(key), (key, argv)
            assert cli_json["stats"]["new_tokens"] == res.stats.new_tokens and cli_json["speculative"] is None
        else:
            assert out == res.text + "\n" and f"finish: {res.finish_reason}" in err, argv
        compared += 1
    assert compared >= 72


def test_a_prompt_on_stdin_keeps_its_trailing_spaces(tiny_hf_dir, wired):
    """`printf 'def add(a, b):\\n    ' | amphista generate - --no-chat` lost the indentation the answer goes on from
    (rstrip() took all trailing whitespace, the same prompt as an argument kept it): SmolLM2 answered
    '\\n    a += b' instead of ' return a + b'. Only the final line end (echo's, an editor's) goes."""
    _, runs = wired
    base = ["--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", "--max-new-tokens", "1", "--no-chat"]
    assert _run(["generate", "-", *base], stdin="def add(a, b):\n    ")[0] == 0
    assert runs[-1]["prompts"] == ["def add(a, b):\n    "]
    assert _run(["generate", "-", *base], stdin="hello  \r\n")[0] == 0
    assert runs[-1]["prompts"] == ["hello  "]


def test_chat_template_kwargs_with_no_chat_are_refused(tiny_hf_dir, capsys):
    """--chat-template-kwargs with --no-chat were parsed and did nothing (--chat-template there is refused)."""
    rc = main(["generate", "hi", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", "--no-chat",
               "--chat-template-kwargs", '{"enable_thinking": false}'])
    err = capsys.readouterr().err
    assert rc == 2 and "--chat-template-kwargs applies to the chat template, which --no-chat turns off" in err
    assert "loading" not in err


@pytest.mark.parametrize("extra, message", [
    (["--ignore-eos", "--regex", "[a-z]+"], "--ignore-eos does not mix with --regex"),
    (["--min-tokens", "2", "--json-object"], "--min-tokens does not mix with --json-object"),
    (["--regex="], "--regex: response_format type 'regex' needs"),
    (["--temperature", "nan"], "amphista: error: --temperature must be finite"),
    (["--seed", "-1"], "amphista: error: --seed must be an integer in [0, 2**64), got -1"),
])
def test_errors_name_the_flags_typed(tiny_hf_dir, capsys, extra, message):
    """The engine's words reached the shell: "ignore_eos does not mix with response_format" (after the load),
    "temperature must be...", "seed must be ... or None"."""
    rc = main(["generate", "hi", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "loading" not in err, err


def test_help_names_the_defaults_and_keys_that_differ():
    """chat's --max-new-tokens is 512 (the API's and generate's 256) with no help; --json's stop_reason key and
    weights' bytes were in the output but not in the list of keys."""
    sub = build_parser()._subparsers._group_actions[0].choices
    helps = {name: {a.dest: a.help for a in sub[name]._actions} for name in ("generate", "chat")}
    assert "(default 512)" in helps["chat"]["max_new_tokens"]
    assert "(default 256)" in helps["generate"]["max_new_tokens"]
    assert "stop_reason" in helps["generate"]["json"] and "bytes" in helps["generate"]["json"]


def test_vllm_options_have_flags_named_in_errors(tiny_hf_dir, capsys):
    """bad_words, allowed_token_ids, include_stop_str_in_output and truncate_prompt_tokens had no flag (the API and
    the server take them); their errors name the flags."""
    base = ["generate", "hi", "--model", str(tiny_hf_dir), "--device", "cpu", "--heads", "none", "--max-seq-len", "256",
            "--max-new-tokens", "4"]
    assert main([*base, "--allowed-token-id", "100000"]) == 2
    assert "--allowed-token-id: token id 100000 is not in the model's vocabulary" in capsys.readouterr().err
    assert main([*base, "--truncate-prompt-tokens", "0"]) == 2
    assert "--truncate-prompt-tokens must be an integer >= 1" in capsys.readouterr().err

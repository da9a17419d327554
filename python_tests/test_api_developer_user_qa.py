"""QA of the Python API as a developer integrating it (2026-12 pass): numpy integers as counts, results that compare,
print and serialize sensibly, a discoverable top-level surface, and docstrings that say what the fields hold. Each
test pins a bug or gap that pass found; all run on the tiny random checkpoint."""
from __future__ import annotations

import json
import typing

import numpy as np
import pytest

import amphista_engine
from amphista_engine import AmphistaError, Engine, InputError

pytest.importorskip("transformers")        # tiny_hf_dir writes its checkpoint with it
pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(tiny_amphista_engine):
    return tiny_amphista_engine


def test_numpy_integers_are_integers_for_counts(engine, tiny_hf_dir):
    """max_new_tokens=np.int64(4) (from an array, a config, a sweep) was refused as "must be a positive integer,
    got np.int64(4)", though sampling parameters and seeds take numpy's numbers; so was max_seq_len=np.int64(..)
    ("must be an integer, got int64 64"). They are taken, as Python ints, by every call."""
    want = engine.generate(PROMPT, 4, chat=False).token_ids
    assert engine.generate(PROMPT, np.int64(4), chat=False).token_ids == want
    assert engine.generate(PROMPT, max_new_tokens=np.int32(4), chat=False).token_ids == want
    assert "".join(engine.stream(PROMPT, np.uint8(4), chat=False)) == engine.last_result.text
    assert engine.last_result.token_ids == want
    assert [r.token_ids for r in engine.generate_batch([PROMPT], np.int64(4), chat=False)] == [want]
    # still refused where it is no positive integer, alike for the three calls
    for bad in (np.int64(0), np.float64(4.0), True, 0, -1):
        for call in (lambda: engine.generate(PROMPT, bad), lambda: engine.stream(PROMPT, bad),
                     lambda: engine.generate_batch([PROMPT], bad)):
            with pytest.raises(InputError, match="max_new_tokens must be a positive integer"):
                call()
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=np.int64(64),
                                 max_batch_size=np.int32(2))
    assert type(eng.max_seq_len) is int and eng.max_seq_len == 64
    assert len(eng.generate_batch([PROMPT, "Hello"], 3, chat=False)) == 2
    with pytest.raises(InputError, match="max_seq_len must be an integer, got float64"):
        Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=np.float64(64))


def test_results_compare_by_what_was_generated_and_print_short(engine):
    """Two identical greedy runs compared unequal (== took in the wall-clock timings of their stats), and the repr
    printed every prompt token id (a long chat history's thousands) before the finish reason and stats."""
    a = engine.generate(PROMPT, 5, chat=False)
    b = engine.generate(PROMPT, 5, chat=False)
    assert a == b
    assert a != engine.generate(PROMPT, 4, chat=False)              # other tokens: not equal
    assert a != engine.generate("Hello world", 5, chat=False)       # another prompt: not equal
    long = engine.generate("fox " * 40, 2, chat=False)
    assert len(long.prompt_token_ids) >= 40
    text = repr(long)
    assert "prompt_token_ids" not in text and "finish_reason=" in text and "stats=GenerationStats(" in text
    assert f"prompt_tokens={len(long.prompt_token_ids)}" in text     # the count is still shown
    assert "tensor" not in text and len(text) < 600
    # to_dict is plain JSON, round-trips, and carries the finish reasons the README lists
    for r in (a, long):
        d = r.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert d["finish_reason"] in ("eos", "length", "stop")
        assert d["stats"]["prompt_tokens"] == d["prompt_tokens"] == len(r.prompt_token_ids)


def test_the_top_level_surface_is_discoverable():
    """dir(amphista_engine) (and so a REPL's completion) showed the error classes but not Engine, and the type of
    GenerationResult.stats could not be imported from the package for an application's type hints."""
    names = dir(amphista_engine)
    assert {"Engine", "GenerationResult", "GenerationStats", "load_model", "__version__"} <= set(names)
    for name in amphista_engine.__all__:
        assert getattr(amphista_engine, name) is not None
    from amphista_engine import GenerationResult, GenerationStats
    assert typing.get_type_hints(GenerationResult)["stats"] is GenerationStats
    namespace: dict = {}
    exec("from amphista_engine import *", namespace)
    assert set(amphista_engine.__all__) <= set(namespace)
    import inspect

    from amphista_engine import errors
    classes = {n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, Exception)}
    assert classes <= set(amphista_engine.__all__)
    assert all(issubclass(getattr(amphista_engine, n), AmphistaError) for n in classes)
    from importlib.metadata import PackageNotFoundError, version
    try:
        assert amphista_engine.__version__ == version("amphista-engine")
    except PackageNotFoundError:
        pass


def test_public_classes_and_methods_say_what_they_hold():
    """Engine, GenerationResult and GenerationStats had no docstrings (help() showed the dataclass signature only,
    not what finish_reason can be or that times are milliseconds), nor had generate_batch."""
    from amphista_engine import GenerationResult, GenerationStats
    assert Engine.__doc__ and "del engine" in Engine.__doc__
    assert Engine.generate_batch.__doc__
    doc = GenerationResult.__doc__
    assert all(f'"{reason}"' in doc for reason in ("eos", "length", "stop"))
    assert "milliseconds" in GenerationStats.__doc__
    for method in (Engine.from_pretrained, Engine.generate, Engine.stream, Engine.generate_batch,
                   Engine.stream_batch, Engine.load_heads, Engine.encode_prompt, Engine.__init__):
        typing.get_type_hints(method)          # annotations resolve (no stale names)


def test_openai_content_parts_are_refused_with_the_reason(engine):
    """A message whose content is OpenAI's list of parts was refused as "has a list 'content'; expected a str",
    which leaves the developer to guess that parts are unsupported; the error now says so (the chat tests pin the
    refusal itself)."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    for call in (lambda: engine.generate(parts, 2), lambda: engine.stream(parts, 2),
                 lambda: engine.generate_batch([parts], 2)):
        with pytest.raises(InputError, match=r"has a list 'content'; expected a str \(content parts such as .* "
                                             r"are not supported: pass the text itself\)"):
            call()
    # the legal unusual shapes keep working: a tuple of messages, a system message only, extra keys
    # (a short system message: the tiny model's Vicuna format's default one outgrows its 128-token cache)
    system = {"role": "system", "content": "Be terse."}
    for messages in ((system, {"role": "user", "content": "Hi"}), [system],
                     [system, {"role": "user", "content": "Hi", "name": "ann"}]):
        assert engine.generate(messages, 2).finish_reason in ("eos", "length", "stop")

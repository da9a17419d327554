"""A misspelt option is named with the closest one the engine takes (it raised Python's TypeError naming
stream_batch, a method the caller never called), and stop takes None, a string or a list of strings only ({}, False
and 0 were read as "no stops", silently)."""
from __future__ import annotations

import pytest

from amphista_engine.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.mark.parametrize("method, call, words", [
    ("generate", lambda e: e.generate("hi", 2, temprature=0.7), "did you mean 'temperature'"),
    ("stream", lambda e: e.stream("hi", 2, max_tokens=3), "did you mean 'max_new_tokens'"),
    ("generate_batch", lambda e: e.generate_batch(["hi"], 2, stop_tokens=[3]), "did you mean 'stop_token_ids'"),
    ("generate", lambda e: e.generate("hi", 2, flux_capacitor=1), "its options: max_new_tokens, temperature"),
])
def test_an_unknown_option_is_named_with_the_closest_known_one(tiny_amphista_engine, method, call, words):
    with pytest.raises(InputError, match=f"{method}\\(\\) has no option") as e:
        call(tiny_amphista_engine)
    assert words in str(e.value)


@pytest.mark.parametrize("stop", [{}, False, 0, 1.5, {"a": 1}])
def test_stop_takes_none_a_string_or_a_list_only(tiny_amphista_engine, stop):
    engine = tiny_amphista_engine
    with pytest.raises(InputError, match="stop must be a string or a list of strings"):
        engine.generate("hi", 2, chat=False, stop=stop)
    plain = engine.generate("hi", 2, chat=False).token_ids
    assert engine.generate("hi", 2, chat=False, stop=None).token_ids == plain
    assert engine.generate("hi", 2, chat=False, stop=[]).token_ids == plain

"""User-side checks of what today's README says (sliding windows, --max-seq-len, number bounds, prompt_logprobs,
logprobs before every processor): what was found wrong in the code, kept as tests.

Number bounds of more than 15 significant digits are rounded inward each on its own node (structured.py,
_with_bound_points). Bounds that hold values as written but sit in different subschemas (a maximum beside an anyOf
holding the minimum) then meet in llguidance as an empty range, and the 400 quoted only its words: "minimum
(0.123456789012346) is greater than maximum (0.123456789012345)", numbers the request never wrote, with nothing
saying why. The same bounds in one node were already refused naming the rounding; now both are."""
from __future__ import annotations

import pytest

from amphista_engine.errors import InputError
from amphista_engine.structured import grammar_source


def _schema(schema):
    return {"type": "json_schema", "json_schema": {"schema": schema}}


@pytest.mark.parametrize("schema, named", [
    ({"type": "number", "maximum": 0.1234567890123456, "anyOf": [{"minimum": 0.1234567890123455}]},
     ("maximum 0.1234567890123456", "minimum 0.1234567890123455")),
    ({"allOf": [{"type": "number", "exclusiveMinimum": 0.1234567890123455},
                {"exclusiveMaximum": 0.1234567890123456}]},
     ("exclusiveMinimum 0.1234567890123455", "exclusiveMaximum 0.1234567890123456")),
])
def test_bounds_emptied_by_rounding_across_subschemas_name_the_rounding(schema, named):
    with pytest.raises(InputError) as e:
        grammar_source(_schema(schema))
    msg = str(e.value)
    assert "15 significant digits" in msg and "rounded inward" in msg, msg
    assert all(n in msg for n in named), msg


def test_an_empty_range_as_written_says_nothing_of_rounding():
    with pytest.raises(InputError) as e:
        grammar_source(_schema({"type": "number", "minimum": 0.5, "allOf": [{"maximum": 0.25}]}))
    assert "Unsatisfiable" in str(e.value) and "rounded" not in str(e.value)


def test_bounds_in_one_node_still_name_the_rounding():
    with pytest.raises(InputError, match="15 significant digits"):
        grammar_source(_schema({"type": "number", "minimum": 0.1234567890123455, "maximum": 0.1234567890123456}))

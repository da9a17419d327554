"""Errors the user can act on. Every one names the bad input; none is a deep torch trace."""
import json
import math
import sys
from collections.abc import Mapping

# An integer of more digits than this is refused by name wherever a user's value comes in: no option means anything
# near it, and Python may not even write it (int-to-str stops at 4300 digits by default, at 640 where it is set
# lowest: sys.set_int_max_str_digits), so a message quoting it raised Python's ValueError in its place.
HUGE_INT_DIGITS = sys.int_info.str_digits_check_threshold
_HUGE = 10 ** HUGE_INT_DIGITS
# how deep refuse_huge_ints looks into nested lists and dicts (a JSON schema's)
_DEPTH = 32


class AmphistaError(Exception):
    """Base class: catch this to handle any user-facing engine error."""


class ModelLoadError(AmphistaError, FileNotFoundError):
    """A model path, file or tensor cannot be loaded as a supported Llama checkpoint."""


class ConfigError(AmphistaError, ValueError):
    """A config or its weights disagree (shapes, sizes, unsupported options)."""


class InputError(AmphistaError, ValueError):
    """Bad generation input: empty prompt, prompt longer than the cache, bad sampling parameters."""


class CacheFullError(InputError):
    """The prompt, or the prompt plus max_new_tokens (and a tree's room), does not fit the KV cache.
    tree_room: the scratch slots of the speculative tree the request counted (0: none), for a caller that cuts
    max_new_tokens to fit (the server does) rather than reading it out of the message."""

    def __init__(self, message: str = "", tree_room: int = 0):
        super().__init__(message)
        self.tree_room = tree_room


class HeadsMismatchError(AmphistaError, ValueError):
    """Drafting heads were built for another target model."""


class NonFiniteError(AmphistaError, FloatingPointError):
    """The model's logits turned NaN or infinite (activations overflowed, e.g. in fp16): no token to trust."""


class LongInt(int):
    """An integer too long to read (a JSON body's, past Python's int-to-str limit) standing in with its count of
    digits: huge itself, so that refuse_huge_ints names where it stands, without building a number so long."""

    def __new__(cls, digits: int):
        x = super().__new__(cls, _HUGE)
        x.digits = digits
        return x


def int_digits(x: int) -> int:
    """The decimal digits of |x|, counted without writing it out (str() may refuse it)."""
    if isinstance(x, LongInt):
        return x.digits
    x = abs(int(x))
    if x < _HUGE:
        return len(str(x))
    d = int((x.bit_length() - 1) * math.log10(2)) + 1      # d or d + 1 exactly; float rounding may add one
    low = 10 ** (d - 1)
    return d - 1 if x < low else d + 1 if x >= 10 * low else d


def is_huge_int(x) -> bool:
    return isinstance(x, int) and not -_HUGE < x < _HUGE


def _huge_int_in(value, seen: set, depth: int = 0):
    """The first huge integer in value, its lists, tuples and dicts (keys too): (path steps, is a key, the int).
    seen: the containers looked into (each once: a list that holds itself twice would double the walk per level)."""
    if isinstance(value, int):
        return ([], False, value) if not -_HUGE < value < _HUGE else None
    if depth > _DEPTH or isinstance(value, (str, bytes, float)) or id(value) in seen:
        return None
    if isinstance(value, Mapping):
        seen.add(id(value))
        for k, v in value.items():
            if is_huge_int(k):
                return [], True, k
            found = _huge_int_in(v, seen, depth + 1)
            if found is not None:
                try:
                    found[0].insert(0, f"[{k!r:.40}]")
                except ValueError:      # a key that holds a huge int itself (a tuple)
                    found[0].insert(0, "[...]")
                return found
    elif isinstance(value, (list, tuple, set, frozenset)):
        try:        # a long list of numbers (token ids) at C speed; anything else is walked
            if -_HUGE < min(value) and max(value) < _HUGE:
                return None
        except Exception:       # noqa: BLE001 -- items that do not compare (lists, strings, arrays): walked
            pass
        seen.add(id(value))
        for i, v in enumerate(value):
            found = _huge_int_in(v, seen, depth + 1)
            if found is not None:
                found[0].insert(0, f"[{i}]")
                return found
    return None


def refuse_huge_ints(options: dict):
    """Raises InputError naming the first of options (name: value) that is or holds an integer of more
    than HUGE_INT_DIGITS digits, before any check writes it into a message. Python-level, on the call's values
    only: never per decoding step."""
    for name, value in options.items():
        found = _huge_int_in(value, set())
        if found is not None:
            steps, key, x = found
            what = f"{name}{''.join(steps)} " + ("has a key that is" if key else "is")
            raise InputError(f"{what} an integer of {int_digits(x)} digits: far out of range (no option takes an "
                             f"integer of more than {HUGE_INT_DIGITS} digits)")


def read_json(text):
    """json.loads(text), an integer of more than HUGE_INT_DIGITS digits read as a LongInt of its length, for
    refuse_huge_ints to name where it stands: past 4300 digits json.loads raised Python's own ValueError (its advice,
    sys.set_int_max_str_digits(), no help to a client), and a shorter one was quoted whole by the next check."""
    def number(digits: str) -> int:
        n = len(digits.lstrip("-"))
        return int(digits) if n <= HUGE_INT_DIGITS else LongInt(n)
    return json.loads(text, parse_int=number)

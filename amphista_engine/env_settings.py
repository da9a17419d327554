"""The package's run-time environment variables (AMPHISTA_*), read one way: surrounding whitespace and case do not
count, unset or empty means the variable's default, and a value the variable does not take is a ConfigError naming
the variable, the value as set and what it takes, never a silent default. The README's "Kernels and the backend
switch" section lists every variable. setup.py's build variables are not read here: setup.py runs before the
package exists."""
from __future__ import annotations

import os

from .errors import ConfigError

ON_WORDS = ("1", "true", "yes", "on")
OFF_WORDS = ("0", "false", "no", "off")
_SWITCH = {**dict.fromkeys(ON_WORDS, True), **dict.fromkeys(OFF_WORDS, False)}
_DEFAULT_WORD = {True: "on", False: "off", None: "auto"}


def env_text(name: str) -> str:
    """The variable's value without surrounding whitespace; "" when unset. For variables that are not switches
    or choices (a folder)."""
    return os.environ.get(name, "").strip()


def env_switch(name: str, default: bool | None, *, auto: bool = False, hint: str = "") -> bool | None:
    """A boolean switch: 1/true/yes/on -> True, 0/false/no/off -> False, unset or empty -> default. With auto=True
    the word "auto" is taken too and gives None (the caller decides; default None means unset is auto). Read on
    every call, so tests and benchmarks may flip the variable between calls. hint: appended to the error."""
    raw = os.environ.get(name)
    word = "" if raw is None else raw.strip().lower()
    if not word:
        return default
    if auto and word == "auto":
        return None
    on = _SWITCH.get(word)
    if on is None:
        takes = ("auto or " if auto else "") + "/".join(ON_WORDS) + " or " + "/".join(OFF_WORDS)
        raise ConfigError(f"{name}={raw!r}: use {takes} (any case; unset: {_DEFAULT_WORD[default]}){hint}")
    return on


def env_choice(name: str, choices: tuple[str, ...], default: str | None, *, message: str | None = None) -> str | None:
    """One of `choices` (lower-case words), matched in any case; unset or empty -> default. message: the error's
    text as a str.format template with {name}, {raw} and {choices}, for a variable whose other entry points
    already word their errors a certain way."""
    raw = os.environ.get(name)
    word = "" if raw is None else raw.strip().lower()
    if not word:
        return default
    if word in choices:
        return word
    template = message or "{name}={raw!r}: choose one of {choices}"
    raise ConfigError(template.format(name=name, raw=raw, choices=", ".join(choices)))

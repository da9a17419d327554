"""amphista-engine: speculative decoding with Amphista drafting heads on a lean Llama engine.

    from amphista_engine import Engine
    engine = Engine.from_pretrained("smollm2-135m")
    print(engine.generate("Name three primes.").text)
"""
__version__ = "0.1.0"

from .errors import (AmphistaError, CacheFullError, ConfigError, HeadsMismatchError, InputError,  # noqa: F401
                     ModelLoadError, NonFiniteError)


def __getattr__(name):
    # torch loads only when the engine is first used, so `amphista --help` and errors stay fast.
    if name in ("Engine", "GenerationResult"):
        from . import engine
        return getattr(engine, name)
    if name == "GenerationStats":     # the type of GenerationResult.stats, for an application's type hints
        from .generation import GenerationStats
        return GenerationStats
    if name == "parse_tool_calls":      # tools.py: no torch
        from .tools import parse_tool_calls
        return parse_tool_calls
    if name == "load_model":
        from .loading import load_model
        return load_model
    raise AttributeError(f"module 'amphista_engine' has no attribute {name!r}")


def __dir__():
    # The lazy names too: dir() and a REPL's completion showed the errors only, not Engine.
    return sorted(set(globals()) | set(__all__))


__all__ = ["Engine", "GenerationResult", "GenerationStats", "load_model", "parse_tool_calls", "AmphistaError", "ConfigError",
           "HeadsMismatchError", "InputError", "ModelLoadError", "CacheFullError", "NonFiniteError"]

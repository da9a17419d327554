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
    if name == "load_model":
        from .loading import load_model
        return load_model
    raise AttributeError(f"module 'amphista_engine' has no attribute {name!r}")


__all__ = ["Engine", "GenerationResult", "load_model", "AmphistaError", "ConfigError", "HeadsMismatchError",
           "InputError", "ModelLoadError", "CacheFullError", "NonFiniteError"]

"""Errors the user can act on. Every one names the bad input; none is a deep torch trace."""


class AmphistaError(Exception):
    """Base class: catch this to handle any user-facing engine error."""


class ModelLoadError(AmphistaError, FileNotFoundError):
    """A model path, file or tensor cannot be loaded as a supported Llama checkpoint."""


class ConfigError(AmphistaError, ValueError):
    """A config or its weights disagree (shapes, sizes, unsupported options)."""


class InputError(AmphistaError, ValueError):
    """Bad generation input: empty prompt, prompt longer than the cache, bad sampling parameters."""


class CacheFullError(InputError):
    """The prompt, or the prompt plus max_new_tokens (and a tree's room), does not fit the KV cache."""


class HeadsMismatchError(AmphistaError, ValueError):
    """Drafting heads were built for another target model."""


class NonFiniteError(AmphistaError, FloatingPointError):
    """The model's logits turned NaN or infinite (activations overflowed, e.g. in fp16): no token to trust."""

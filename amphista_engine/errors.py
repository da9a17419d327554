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

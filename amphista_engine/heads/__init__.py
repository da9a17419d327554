"""Drafting heads: Amphista (SAL + auto-embedding block) and the Medusa baseline, with their checkpoints."""
from .amphista import AmphistaHeads
from .checkpoint import (build_heads, lm_head_fingerprint, load_heads, load_medusa_checkpoint, new_heads,
                         random_heads, save_heads, weights_digest)
from .config import HeadsConfig
from .medusa import DraftHeads, MedusaHeads

__all__ = ["HeadsConfig", "AmphistaHeads", "MedusaHeads", "DraftHeads", "load_heads", "save_heads",
           "load_medusa_checkpoint", "random_heads", "new_heads", "build_heads", "lm_head_fingerprint",
           "weights_digest"]

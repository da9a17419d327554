"""Perplexity of a text under the engine's target, as llama.cpp's `llama-perplexity` measures it: the tokens are cut
into chunks of `ctx`, each chunk is one forward pass (its first token the BOS where the tokenizer adds one), and the
second half of each chunk is scored, so every scored token sees at least ctx / 2 tokens before it.

What it is for: checking a model port or a quantization (the same text through a Hugging Face folder, its GGUF, and
`quant='q4'` should give close perplexities), not speculative decoding, which never changes the target's outputs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import InputError
from ..generation import sequence_scores
from ..kernels.backend import use_backend
from ..values import is_integral


@dataclass
class PerplexityResult:
    ppl: float            # exp(mean NLL)
    ppl_stderr: float     # by the delta method, as llama.cpp reports it: ppl * std(NLL) / sqrt(n)
    nll: float            # mean negative log-likelihood per scored token (nats)
    tokens: int           # tokens scored
    chunks: int
    ctx: int

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"PPL = {self.ppl:.4f} +/- {self.ppl_stderr:.4f} ({self.tokens} tokens scored in {self.chunks} "
                f"chunks of {self.ctx})")


def check_ctx(ctx, max_seq_len: int) -> int:
    if isinstance(ctx, bool) or not is_integral(ctx) or not 4 <= ctx <= max_seq_len:
        raise InputError(f"ctx (the chunk length) must be an integer from 4 to the engine's max_seq_len "
                         f"({max_seq_len}), got {ctx!r}")
    return int(ctx)


def perplexity(engine, text: str, ctx: int | None = None, max_chunks: int | None = None,
               progress=None) -> PerplexityResult:
    """The perplexity of `text` (a str) under engine.model in chunks of `ctx` tokens (default: min(512, the engine's
    max_seq_len)); max_chunks: score the first N chunks only. progress(chunk, chunks, running_ppl) is called after
    each chunk."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("perplexity needs a non-empty text")
    ctx = check_ctx(min(512, engine.max_seq_len) if ctx is None else ctx, engine.max_seq_len)
    if max_chunks is not None and (isinstance(max_chunks, bool) or not is_integral(max_chunks) or max_chunks < 1):
        raise InputError(f"max_chunks must be a positive integer, got {max_chunks!r}")
    ids = engine.tokenizer.encode(text)
    chunks = len(ids) // ctx
    if chunks == 0:
        raise InputError(f"the text is {len(ids)} tokens, shorter than one chunk of ctx={ctx}: give a longer text "
                         f"or a smaller ctx")
    chunks = min(chunks, max_chunks or chunks)
    tok = engine.tokenizer
    bos = tok.bos_id if getattr(tok, "add_bos", False) else None
    first = ctx // 2
    nlls = []
    for c in range(chunks):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        # the logits at j score token j + 1: tokens first + 1 .. ctx - 1 (the forward the server's echo shares); on
        # the engine's own backend, as its calls run (Engine(backend=...)), and as prompt_logprobs, never beside
        # another thread's run on the engine (each would slow the other, and a server's run is a user's request)
        with engine._one_run(overtakes=False), use_backend(engine.backend):
            nlls.append(-sequence_scores(engine.model, chunk, first + 1)[0])
        if progress is not None:
            progress(c + 1, chunks, math.exp(torch.cat(nlls).mean().item()))
    nll = torch.cat(nlls)
    if not torch.isfinite(nll).all():
        raise InputError("the model gave non-finite log-probabilities on this text (its logits overflowed)")
    mean = nll.mean().item()
    std = nll.std().item() if nll.numel() > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl=ppl, ppl_stderr=ppl * std / math.sqrt(nll.numel()), nll=mean, tokens=nll.numel(),
                            chunks=chunks, ctx=ctx)

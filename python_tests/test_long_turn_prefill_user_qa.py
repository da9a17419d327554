"""QA as a chat user on the CPU with float weights (quant='none', fp32 or bf16) who pastes a long message (1,000-4,000
tokens) as a later turn (2026-12-05). With reuse_prefix=True (what `amphista chat` does) the prefill of the new tokens
after the r kept ones built the dense [1, T, kv_len] mask (ops.tree_mask_args: additive, in the model dtype, plus its
bool temporaries) and SDPA scored every new token against every slot, the masked half of the new block included; the
Amphista heads' SAL pass over the new tokens did the same. A first turn into an empty cache already attended causally
(AttentionSpec.empty_prefix). Such a turn now attends bottom-right causally over slots [0, r + T) without the mask
(AttentionSpec.kept_prefix, model.causal_after_prefix). SmolLM2-135M, quant='none', 1 thread, a ~2,000-token second
message after a 68-token first exchange (prefill ms, interleaved runs, default malloc):
  fp32 5,750 -> 4,500 ms, bf16 1,850 -> 1,450; with the Amphista heads fp32 6,240 -> 4,970, bf16 1,890 -> 1,450;
  after a ~2,000-token first message (r = 2,013, T = 4,004): fp32 7,740 -> 6,410, bf16 2,580 -> 2,380.
Peak RSS over the turn (MALLOC_MMAP_THRESHOLD_=131072, so freed buffers leave RSS): fp32 90 -> 73 MiB, bf16 47 -> 39.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amphista_engine import Engine
from amphista_engine import model as model_mod
from amphista_engine.heads import amphista as amphista_mod
from amphista_engine.heads import random_heads
from amphista_engine.kv_cache import KVCache
from amphista_engine.model import AttentionSpec, causal_after_prefix, causal_mask

from conftest import dense_mask_sizes, random_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread_module")

WORDS = ("the committee met on tuesday to discuss budget transport costs review contracts signed last two years "
         "members raised concerns about rising prices and chair proposed audit of every department report").split()


def document(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _force_dense(monkeypatch):
    """The path before the change: the kept prefix unknown, so a kept-prefix prefill builds the dense mask."""
    real = model_mod.prefill_mask_args

    def dense(spec, dtype):
        return real(dataclasses.replace(spec, kept_prefix=None), dtype)
    monkeypatch.setattr(model_mod, "prefill_mask_args", dense)
    monkeypatch.setattr(amphista_mod, "prefill_mask_args", dense)


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# ---- the attention itself ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r, T", [(0, 70), (1, 65), (37, 130), (300, 90)])
@pytest.mark.parametrize("flash", [True, False])
def test_causal_after_prefix_is_bottom_right_causal_attention(dtype, r, T, flash, monkeypatch):
    """New token i sees slots [0, r + i], GQA (4 query heads on 2 KV heads): against fp64 attention with the explicit
    mask, through the CPU's two merged flash calls and through SDPA's bottom-right causal bias (the other devices'
    path, and the CPU's where torch lacks the private flash op)."""
    if not flash:
        monkeypatch.setattr(model_mod, "_CPU_FLASH", None)
    g = torch.Generator().manual_seed(r + T)
    q = torch.randn(1, T, 4, 16, generator=g).to(dtype).transpose(1, 2)      # the strides the model passes
    k, v = (torch.randn(1, 2, r + T + 40, 16, generator=g).to(dtype) for _ in range(2))   # slots past r + T unread
    k[:, :, r + T:] = v[:, :, r + T:] = float("nan")
    with torch.inference_mode():
        got = causal_after_prefix(q, k, v, r)
    mask = torch.ones(T, r + T, dtype=torch.bool).tril_(r)
    want = F.scaled_dot_product_attention(q.double(), k[:, :, :r + T].double(), v[:, :, :r + T].double(),
                                          attn_mask=mask, enable_gqa=True)
    assert got.shape == want.shape and got.dtype == dtype
    assert rel_err(got, want) < {torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]


# ---- the target's prefill after a kept prefix ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r, T", [(40, 65), (150, 250)])
def test_a_kept_prefix_prefill_builds_no_dense_mask_and_gives_the_dense_paths_logits(dtype, r, T, monkeypatch):
    """r tokens in the cache, T > 64 new ones after them (AttentionSpec.kept_prefix, what PlainDecoder.prefill passes
    on a reuse_prefix turn): no dense mask, and every new token's logits those of the dense path (and of one forward
    over the whole sequence) up to rounding, the same argmax."""
    model = random_tiny_model(seed=2, vocab=64, dim=64, heads=4, kv_heads=2, inter=128, max_len=512, dtype=dtype)
    ids = torch.randint(0, 63, (1, r + T), generator=torch.Generator().manual_seed(1))

    def prefill(kept: bool):
        cache = KVCache.for_model(model.config, 1, 512, dtype, "cpu")
        with torch.inference_mode():
            model(ids[:, :r], torch.arange(r)[None], cache,
                  AttentionSpec(cache.length[:1], causal_mask(r, "cpu"), 512, empty_prefix=True))
            cache.length[:1] = r
            spec = AttentionSpec(cache.length[:1], causal_mask(T, "cpu"), 512, kept_prefix=r if kept else None)
            return model(ids[:, r:], torch.arange(r, r + T)[None], cache, spec)[0].float()

    dense = prefill(False)
    sizes = dense_mask_sizes(monkeypatch)
    got = prefill(True)
    assert sizes == [], f"dense attention masks over {sizes} new tokens"
    monkeypatch.undo()
    with torch.inference_mode():
        whole = model(ids, torch.arange(r + T)[None])[0, r:].float()
    assert rel_err(got, dense) < TOL[dtype] and rel_err(dense, whole) < TOL[dtype]
    agree = (got.argmax(-1) == dense.argmax(-1)).float().mean().item()
    # bf16: the two flash calls' outputs are rounded before their merge; a random model's near-tied logits may swap
    assert agree == 1.0 if dtype == torch.float32 else agree > 0.95


# ---- the Amphista heads' SAL pass over the new tokens --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sal_pass_after_resume_cache_builds_no_dense_mask_and_drafts_as_the_dense_path(dtype, monkeypatch):
    """AmphistaHeads.step after resume_cache(r) over M = 200 new entries (a speculative reuse_prefix turn's): no dense
    mask, the drafts (that step's and the next's) and the SAL cache entries those of the dense path; the kept prefix
    is used once: the next step's cache length has moved."""
    model = random_tiny_model(seed=3, vocab=64, dim=64, heads=4, kv_heads=2, inter=128, max_len=512, dtype=dtype)
    heads = random_heads("amphista", model, num_heads=3, seed=1)
    r, M = 90, 200
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, r + M + 3, 64, generator=g).to(dtype)
    toks = torch.randint(0, 63, (1, r + M + 3), generator=g)

    def run():
        heads.reset_cache(1, 512)
        with torch.inference_mode():
            heads.step(hidden[:, :r], toks[:, :r], torch.tensor([r]), 128)
            heads.resume_cache(r)
            draft = heads.step(hidden[:, r:r + M], toks[:, r:r + M], torch.tensor([M]), 384)
            after = heads.step(hidden[:, r + M:], toks[:, r + M:], torch.tensor([3]), 384)
        c = heads.sal_cache
        return draft.float(), after.float(), c.k[:, :1, :, :r + M + 3].float().clone(), int(c.length[0])

    with monkeypatch.context() as m:
        _force_dense(m)
        want = run()
    sizes = dense_mask_sizes(monkeypatch)
    got = run()
    assert max(sizes, default=0) <= 64, f"dense attention masks over {sizes} new entries"
    assert got[3] == want[3] == r + M + 3
    for a, b in zip(got[:3], want[:3]):
        assert rel_err(a, b) < TOL[dtype]
    assert heads._take_empty() is None


# ---- a chat turn through the engine --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_engines(tiny_hf_dir):
    """{dtype: (the engine a chat runs on, a fresh one per turn)}, float weights, random Amphista heads."""
    out = {}
    for dtype in ("fp32", "bf16"):
        pair = []
        for _ in range(2):
            e = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype=dtype, max_seq_len=512, quant="none")
            e.load_heads(random_heads("amphista", e.model, num_heads=3, seed=1))
            pair.append(e)
        out[dtype] = tuple(pair)
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("speculative", [None, "amphista"])
def test_a_long_later_message_prefills_without_a_dense_mask_and_answers_as_a_fresh_engine(chat_engines, dtype,
                                                                                         speculative, monkeypatch):
    """A short first exchange, then a pasted message of a few hundred tokens with reuse_prefix=True: only the new
    tokens are prefilled, through no dense mask over more than the kernels' 64 rows (target and SAL), and the answer
    is a fresh engine's given the whole message list."""
    chat, fresh = chat_engines[dtype]
    messages = [{"role": "user", "content": "Hello there."}]
    first = chat.generate(messages, max_new_tokens=6, reuse_prefix=True, speculative=speculative)
    messages += [{"role": "assistant", "content": first.text},
                 {"role": "user", "content": document(35, seed=5) + "\nWhat did the committee discuss?"}]
    sizes = dense_mask_sizes(monkeypatch)
    got = chat.generate(messages, max_new_tokens=8, reuse_prefix=True, speculative=speculative)
    assert max(sizes, default=0) <= 64, f"dense attention masks over {max(sizes)} new tokens"
    monkeypatch.undo()
    kept = got.stats.extra.get("prompt_tokens_reused", 0)
    assert kept > 5 and got.stats.prompt_tokens - kept > 200
    assert got.token_ids == fresh.generate(messages, max_new_tokens=8, speculative=speculative).token_ids

"""QA as a user with long prompts on the CPU (2026-12-05): a 1,500-6,000 token document to summarise or ask about,
with SmolLM2-135M-Instruct (trained on 8192 positions) or a tiny random Llama GGUF with a long context_length and its
transformers twin (test_own_gguf_user_qa.py's writer), 4-bit (quant auto) and float (fp32, bf16).

The answers were right at long positions: chunked 4-bit prefill == one forward == transformers, speculative greedy ==
plain greedy after the document (KV window buckets, the CPU's ordered-attention scratch slots, the Amphista heads'
SAL cache), a batch of one long and several short prompts == each prompt alone, chat turns reusing a long first
message == a fresh run. What was wrong:
- an unchunked prefill (float weights; the heads' SAL over the prompt on every model) built the dense
  [B, T, kv_len] attention mask, fp32 additive plus bool temporaries (a fp32 batch of 4 around a 6k-token prompt
  peaked 850 MiB over its cache, now 130), and SDPA could not skip the masked half (4k-token SmolLM2 prefill on
  1 thread: fp32 15.8 s -> 10.5 s, bf16 5.3 -> 3.1 s). A prefill into an empty cache now attends causally;
- a document longer than the model's trained context was told only to "raise max_seq_len" (to 65,683 for a 65k-token
  file on SmolLM2): past the trained positions RoPE is extrapolated; the error now says so and how short to make it;
- `amphista generate` said so in the API's names (max_seq_len, max_new_tokens), not the flags'.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from amphista_engine import CacheFullError, Engine
from amphista_engine.cli import main
from amphista_engine.generation import GenerationStats, PlainDecoder, kv_window, run
from amphista_engine.heads import random_heads
from amphista_engine.kernels.backend import use_backend
from amphista_engine.kv_cache import KVCache
from amphista_engine.model import AttentionSpec, causal_mask
from amphista_engine.sampling import SamplingParams
from amphista_engine.speculative import SpeculativeDecoder, TreeSpec

from conftest import dense_mask_sizes, needs_smollm2, random_tiny_model
from test_own_gguf_user_qa import hf_logits, rel_err, write_llama_gguf
from test_speculative import OracleHeads, _NoText

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread_module")

FOUR_BIT = {"token_embd": "Q8_0", "output": "Q8_0",
            **dict.fromkeys(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"), "Q4_0")}
WORDS = ("the committee met on tuesday to discuss budget transport costs review contracts signed last two years "
         "members raised concerns about rising prices and chair proposed audit of every department report").split()


def document(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """{"4bit": (path, transformers twin), "f32": ...}: tiny Llama GGUFs trained, per their metadata, on 4096
    positions (dims the 4-bit kernels take)."""
    d = tmp_path_factory.mktemp("long_gguf")
    out = {}
    for name, types in (("4bit", FOUR_BIT), ("f32", None)):
        hf = write_llama_gguf(d / f"{name}.gguf", dim=64, heads=2, kv_heads=1, layers=2, inter=128, ctx=4096,
                              types=types, seed=3)
        out[name] = (d / f"{name}.gguf", hf)
    return out


def prefill_logits(engine, ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """The last prompt token's logits from the engine's prefill: in `chunk`-token forwards (PlainDecoder's) or in
    one forward into the empty cache (causal, no mask)."""
    cache = engine._cache_for(1)
    cache.reset()
    T, tokens = len(ids), torch.tensor([ids])
    with torch.inference_mode():
        if chunk:
            dec = PlainDecoder(engine.model, cache, SamplingParams())
            return dec._prefill_chunks(tokens, torch.tensor([T]), 0, chunk)[0][0, -1].float()
        spec = AttentionSpec(cache.length[:1], causal_mask(T, "cpu"), kv_window(T, cache.max_seq_len),
                             empty_prefix=True)
        logits = engine.model(tokens, torch.arange(T)[None], cache, spec, logits_at=torch.tensor([[T - 1]]))
        return logits[0, -1].float()


# ---- a long document through the API: no dense mask, and the answer transformers gives --------------------------

@pytest.mark.parametrize("model, quant, dtype", [("4bit", "auto", None), ("f32", "none", "fp32"),
                                                 ("f32", "none", "bf16")])
def test_a_long_document_prefills_without_a_dense_mask_and_answers_as_transformers(ggufs, model, quant, dtype,
                                                                                    monkeypatch):
    """A ~1,900-token document (positions past 1,000, kv_len buckets of 128): the prefill built a dense fp32 mask
    over all its tokens (and the heads' SAL prefill another, 4-bit models included), now none past the kernels'
    64 rows. The first tokens are transformers' greedy ones (fp32: all of them; 4-bit: same argmax, logits within
    the int8 activations' error), chunked 4-bit prefill == one forward, speculative == plain, in a batch too."""
    path, hf = ggufs[model]
    engine = Engine.from_pretrained(str(path), device="cpu", max_seq_len=2304, quant=quant, dtype=dtype,
                                    max_batch_size=3)
    assert engine.quant == ("q4" if model == "4bit" else "none")
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
    doc = document(330) + " summarise:"
    ids = engine.encode_prompt(doc, chat=False)
    assert 1500 < len(ids) < 2200
    with torch.no_grad():
        want_logits = hf_logits(hf, ids)[-1]
        want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(ids):].tolist()

    sizes = dense_mask_sizes(monkeypatch)
    plain = engine.generate(doc, max_new_tokens=8, chat=False)
    spec = engine.generate(doc, max_new_tokens=8, chat=False, speculative="amphista")
    shorts = [document(5, seed=1), document(40, seed=2)]
    batch = engine.generate_batch([doc, *shorts], max_new_tokens=8, chat=False)
    spec_batch = engine.generate_batch([doc, *shorts], max_new_tokens=8, chat=False, speculative="amphista")
    assert max(sizes, default=0) <= 64, f"dense attention masks over {max(sizes)} new tokens"
    monkeypatch.undo()

    assert plain.token_ids == spec.token_ids == batch[0].token_ids == spec_batch[0].token_ids
    for short, b, s in zip(shorts, batch[1:], spec_batch[1:]):
        assert b.token_ids == s.token_ids == engine.generate(short, max_new_tokens=8, chat=False).token_ids
    if dtype == "fp32":
        assert plain.token_ids == want[:len(plain.token_ids)]
    # the prefill's logits, chunked (4-bit on the cpu backend) and in one forward, against transformers'
    chunk = engine.model.prefill_chunk(engine._cache_for(1))
    tol = {"4bit": 5e-2, "fp32": 1e-5, "bf16": 5e-2}[dtype or "4bit"]
    one = prefill_logits(engine, ids)
    for got in [one] + ([prefill_logits(engine, ids, chunk)] if chunk else []):
        assert rel_err(got, want_logits) < tol and got.argmax() == want_logits.argmax()
        assert rel_err(got, one) < tol


def test_chat_turns_on_a_long_first_message_reuse_it_and_answer_as_a_fresh_engine(ggufs):
    """reuse_prefix on top of a ~1,700-token first message: each turn prefills only what follows the kept history,
    and answers as an engine given the whole message list afresh (4-bit: chunked prefill from an offset)."""
    path, _ = ggufs["4bit"]
    chat, fresh = (Engine.from_pretrained(str(path), device="cpu", max_seq_len=2304) for _ in range(2))
    messages = [{"role": "user", "content": document(290, seed=4) + "\nWhat did the committee discuss?"}]
    for turn in range(3):
        got = chat.generate(messages, max_new_tokens=6, reuse_prefix=True)
        assert got.token_ids == fresh.generate(messages, max_new_tokens=6).token_ids
        if turn:
            assert got.stats.extra["prompt_tokens_reused"] > 1500
        messages += [{"role": "assistant", "content": got.text}, {"role": "user", "content": document(8, seed=turn)}]


# ---- speculative greedy == plain greedy far into the cache ------------------------------------------------------

@pytest.mark.parametrize("backend, dtype", [(None, torch.float32), ("torch", torch.bfloat16)])
def test_speculative_greedy_equals_plain_after_a_long_prompt(backend, dtype):
    """A 2,700-token prompt in a 2,900-slot cache (not a multiple of 512: the torch backend's ordered bf16
    attention puts its key windows in the scratch slots past it), drafts accepted several at a time (an oracle
    drafter), decoding up to the last slots: the same tokens as plain greedy decoding, batched with a short prompt
    too."""
    model = random_tiny_model(seed=5, max_len=4096, dtype=dtype)
    prompt = [int(t) for t in np.random.default_rng(5).integers(0, 63, 2700)]
    short = prompt[:9]
    tree, max_new, S = TreeSpec("tree-16", 3, "cpu"), 160, 2900

    def decode(heads=None, prompts=(prompt,)):
        cache = KVCache.for_model(model.config, len(prompts), S, dtype, "cpu")
        dec = (PlainDecoder(model, cache, SamplingParams()) if heads is None
               else SpeculativeDecoder(model, cache, heads, tree, SamplingParams()))
        stats = [GenerationStats() for _ in prompts]
        with use_backend(backend):
            list(run(dec, [list(p) for p in prompts], _NoText(), max_new, [], [], stats))
        return [r.ids for r in dec.rows], stats

    (full,), _ = decode()
    (short_full,), _ = decode(prompts=(short,))
    (got,), (stats,) = decode(OracleHeads(prompt + full, 64, 3))
    assert got == full and stats.tau > 1.5
    rows, _ = decode(OracleHeads(prompt + full, 64, 3), prompts=(prompt, short))
    assert rows == [full, short_full]


@needs_smollm2
def test_smollm2_answers_a_1000_token_document_speculatively_as_plainly():
    """The embedded model and its shipped Amphista heads, 4-bit (the default), a ~1,000-token document: the
    speculative answer is the plain one, with drafts accepted (the SAL cache ~1,000 positions in)."""
    engine = Engine.from_pretrained("smollm2-135m", device="cpu", max_seq_len=1536, heads="default")
    readme = engine.tokenizer.encode((Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8"))
    doc = engine.tokenizer.decode(readme[:1000])
    messages = [{"role": "user", "content": doc + "\n\nWhat does this document describe? One sentence."}]
    plain = engine.generate(messages, max_new_tokens=24)
    spec = engine.generate(messages, max_new_tokens=24, speculative="amphista")
    assert 1000 < plain.stats.prompt_tokens < 1100
    # tau > 1: drafts were accepted (how many depends on the README's text, the document here: 1.1-1.3)
    assert spec.token_ids == plain.token_ids and spec.stats.tau > 1.0


# ---- too long: what the user is told ----------------------------------------------------------------------------

def test_a_document_past_the_trained_context_is_told_how_short_to_make_it(ggufs):
    """A document longer than the model was trained on was told only to raise max_seq_len (to whatever it needed):
    past the trained positions RoPE is extrapolated. The error now names the trained length and the prompt length
    that fits it; within the trained length nothing changes. A cache the machine has no memory for is refused by
    name before anything is allocated."""
    path, _ = ggufs["f32"]
    engine = Engine.from_pretrained(str(path), device="cpu", max_seq_len=1024, quant="none")
    doc = document(800)
    n = len(engine.encode_prompt(doc, chat=False))
    assert n > 4096
    with pytest.raises(CacheFullError, match=re.escape(
            f"prompt is {n} tokens, longer than the cache (max_seq_len=1024): no room for an answer; shorten it or "
            f"raise max_seq_len (with max_new_tokens=16 it needs max_seq_len >= {n + 16}); but the model was trained "
            f"on 4096 positions (past them RoPE is extrapolated and answers degrade): keep the prompt to at most "
            f"4080 tokens")):
        engine.generate(doc, max_new_tokens=16, chat=False)
    fits = engine.tokenizer.decode(engine.encode_prompt(doc, chat=False)[:1000])
    m = len(engine.encode_prompt(fits, chat=False))
    with pytest.raises(CacheFullError, match=re.escape(f"exceeds the cache (max_seq_len=1024) by {m + 4000 - 1024}; "
                                                       "raise max_seq_len or lower max_new_tokens; but the model was "
                                                       f"trained on 4096 positions") + ".*at most 96 tokens"):
        engine.generate(fits, max_new_tokens=4000, chat=False)
    with pytest.raises(CacheFullError) as e:          # within the trained length: no such note
        engine.generate(fits, max_new_tokens=1000, chat=False)
    assert "trained" not in str(e.value)
    with pytest.raises(CacheFullError, match=r"max_seq_len=100000000 \(batch 1\) needs [\d.]+ GiB .* lower "
                                             r"max_seq_len"):
        Engine.from_pretrained(str(path), device="cpu", max_seq_len=10**8, quant="none")


def test_generate_from_stdin_names_the_flags_for_a_document_too_long(ggufs, monkeypatch, capsys):
    """`amphista generate - --max-seq-len 512 < doc.txt` said "raise max_seq_len ... with max_new_tokens=8": the
    API's names. A document that fits answers from stdin."""
    path, _ = ggufs["4bit"]
    args = ["generate", "-", "--model", str(path), "--device", "cpu", "--heads", "none", "--max-seq-len", "512",
            "--max-new-tokens", "8", "--no-chat"]
    monkeypatch.setattr("sys.stdin", io.StringIO(document(800)))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "max_seq_len" not in err and "max_new_tokens" not in err
    assert re.search(r"amphista: error: prompt is \d+ tokens, longer than the cache \(--max-seq-len=512\): no room "
                     r"for an answer; shorten it or raise --max-seq-len \(with --max-new-tokens=8 it needs "
                     r"--max-seq-len >= \d+\); but the model was trained on 4096 positions .* at most 4088 tokens",
                     err), err
    monkeypatch.setattr("sys.stdin", io.StringIO(document(60)))
    assert main(args) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() and re.search(r"prompt \d\d\d tok", cap.err), cap.err


def test_generate_names_a_too_long_prompt_before_timing_speculation(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    """With heads loaded, `amphista generate` on a CPU timed speculation (seconds) before the run found the prompt
    too long for the cache: the error now comes first, in the flags' names."""
    import amphista_engine.speculation_check as sc
    from amphista_engine.heads import save_heads
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=256)
    heads = random_heads("amphista", eng.model, num_heads=3, seed=1)
    heads.config.extra = {"tree_search": {"decoding_tau": {"chain-3": 2.0}}}
    save_heads(heads, tmp_path / "heads")
    timed = []
    monkeypatch.setattr(sc, "check_speculation", lambda *a, **k: timed.append(1) / 0)
    args = ["generate", "word " * 300, "--model", str(tiny_hf_dir), "--device", "cpu", "--heads",
            str(tmp_path / "heads"), "--max-seq-len", "128", "--max-new-tokens", "8", "--no-chat"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert timed == [] and "Traceback" not in err and "longer than the cache (--max-seq-len=128)" in err, err

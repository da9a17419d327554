"""QA of the cache room a run takes, as a user near max_seq_len / max_batch_size meets it (engine.py's room checks
and run setup, speculative.make_speculative_decoder's tree room): each test pins a bug found by this pass on the
tiny random checkpoint (fp32, CPU)."""
from __future__ import annotations

import re
import warnings

import pytest

from amphista_engine import Engine, InputError
from amphista_engine.errors import CacheFullError
from amphista_engine.heads import random_heads
from amphista_engine.speculative import SpeculativeDecoder

pytest.importorskip("transformers")      # tiny_hf_dir writes its checkpoint with it
pytestmark = pytest.mark.usefixtures("one_thread_module")

PROMPT = "The quick brown fox"


def _engine(tiny_hf_dir, max_seq_len: int, num_heads: int = 3) -> Engine:
    eng = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", max_seq_len=max_seq_len)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=num_heads, seed=1))
    return eng


def _auto_speculates(monkeypatch, tree="chain-3"):
    """As if the speed check found the heads faster here (the decision to test, not this machine's timing)."""
    monkeypatch.setattr(Engine, "resolve_speculation",
                        lambda self, s, t, *_: ("amphista", t or tree, None) if s == "auto" else (s, t, None))


def _n(eng, prompt=PROMPT) -> int:
    return len(eng.encode_prompt(prompt, chat=False))


def test_a_refused_call_neither_grows_the_cache_nor_drops_the_kept_chat_prefix(tiny_hf_dir):
    """A generate_batch refused for a prompt too long for the cache (or sampling settings the named speculative
    method cannot take) first grew the engine's KV cache to the batch's rows, then refused: memory paid for a call that
    failed, and the kept chat prefix dropped with the old cache (the next turn prefilled everything again)."""
    eng = _engine(tiny_hf_dir, 64)
    first = eng.generate(PROMPT, chat=False, max_new_tokens=4, reuse_prefix=True)
    cache = eng._cache
    assert cache is not None and cache.batch == 1
    tree = dict(speculative="amphista", tree="chain-3")
    refused = [(CacheFullError, [PROMPT, PROMPT * 30], 4, {}),             # prompt 1 is longer than the cache
               (CacheFullError, [PROMPT, PROMPT * 30], 4, tree),
               (CacheFullError, [PROMPT, PROMPT], 64 - _n(eng), tree),     # only the tree's room is missing
               # a sampling setting the method refuses (a penalty was one, until trees took penalties)
               (InputError, [PROMPT, PROMPT], 4, dict(tree, temperature=0.7, top_k=5, acceptance="typical"))]
    for error, prompts, new, kw in refused:
        with pytest.raises(error):
            eng.generate_batch(prompts, chat=False, max_new_tokens=new, **kw)
        assert eng._cache is cache and cache.batch == 1, kw       # not grown (nor reallocated)
    # the chat prefix the first run kept is still there to reuse
    second = eng.generate(PROMPT + first.text + " jumps", chat=False, max_new_tokens=4, reuse_prefix=True)
    assert second.stats.extra.get("prompt_tokens_reused", 0) > 0
    # a refused first run allocates nothing at all
    fresh = _engine(tiny_hf_dir, 64)
    with pytest.raises(CacheFullError):
        fresh.generate_batch([PROMPT, PROMPT * 30], chat=False, max_new_tokens=4)
    with pytest.raises(InputError, match="acceptance='typical'"):
        fresh.generate(PROMPT, chat=False, max_new_tokens=4, speculative="amphista", temperature=0.7, top_k=5,
                       acceptance="typical")
    assert fresh._cache is None
    # a call that is served still grows the cache to its batch, as documented
    assert len(eng.generate_batch([PROMPT, PROMPT], chat=False, max_new_tokens=3, speculative="amphista",
                                  tree="chain-3")) == 2 and eng._cache.batch == 2


@pytest.mark.parametrize("spec", [{}, dict(speculative="amphista", tree="chain-3")])
def test_a_stream_set_up_and_never_started_leaves_the_chat_prefix(tiny_hf_dir, spec):
    """engine.stream(..., reuse_prefix=True) took (and dropped) the kept prefix when the stream was made: a stream
    made and discarded unstarted, or closed before its first chunk, made the next turn prefill the whole
    conversation again, although nothing had touched the cache."""
    eng = _engine(tiny_hf_dir, 256)
    first = eng.generate(PROMPT, chat=False, max_new_tokens=8, reuse_prefix=True, **spec)
    second = PROMPT + first.text + " jumps over the lazy dog"
    fresh = eng.generate(second, chat=False, max_new_tokens=8, **spec)
    eng.generate(PROMPT, chat=False, max_new_tokens=8, reuse_prefix=True, **spec)
    unstarted = eng.stream(second, chat=False, max_new_tokens=8, reuse_prefix=True, **spec)
    del unstarted
    closed = eng.stream(second + " again", chat=False, max_new_tokens=8, reuse_prefix=True, **spec)
    closed.close()
    eng.stream_batch([second], chat=False, max_new_tokens=8, **spec)       # made, never run, not a reuse run
    res = eng.generate(second, chat=False, max_new_tokens=8, reuse_prefix=True, **spec)
    assert res.stats.extra.get("prompt_tokens_reused", 0) > 0
    assert res.token_ids == fresh.token_ids
    # a run that did start in between still turns the reuse off (it rewrote the cache)
    eng.generate(PROMPT, chat=False, max_new_tokens=8, reuse_prefix=True, **spec)
    eng.generate("Hello, world! def f(x):", chat=False, max_new_tokens=4, **spec)
    assert "prompt_tokens_reused" not in eng.generate(second, chat=False, max_new_tokens=8, reuse_prefix=True,
                                                      **spec).stats.extra


def test_one_new_token_takes_no_tree_room(tiny_hf_dir, monkeypatch):
    """max_new_tokens=1 comes from the prefill alone (no step, no tree), yet the speculative run reserved the tree's
    slots: a prompt that fits exactly with plain decoding was refused ("... + tree room (7) exceeds the cache; ...
    lower max_new_tokens", below 1), and speculative="auto" warned that it was decoding plainly."""
    n = _n(_engine(tiny_hf_dir, 64))
    eng = _engine(tiny_hf_dir, n + 1)                          # room for the prompt and one token, nothing more
    plain = eng.generate(PROMPT, chat=False, max_new_tokens=1)
    for tree in ("chain-3", "tree-16", "dynamic-4"):
        res = eng.generate(PROMPT, chat=False, max_new_tokens=1, speculative="amphista", tree=tree)
        assert (res.token_ids, res.finish_reason) == (plain.token_ids, "length") and res.stats.extra["tree"] == tree
    _auto_speculates(monkeypatch)
    asked = []
    real = Engine.resolve_speculation
    monkeypatch.setattr(Engine, "resolve_speculation", lambda self, *a: asked.append(a) or real(self, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no "decoding plainly"
        res = eng.generate(PROMPT, chat=False, max_new_tokens=1, speculative="auto")
    # and "auto" weighs nothing (its check times steps for seconds) for a token no step makes
    assert res.token_ids == plain.token_ids and "tree" not in res.stats.extra and not any(a[0] == "auto" for a in asked)
    roomy = _engine(tiny_hf_dir, 64)
    assert roomy.generate(PROMPT, chat=False, max_new_tokens=2, speculative="auto").stats.extra["tree"] == "chain-3"
    assert any(a[0] == "auto" for a in asked)
    with pytest.raises(CacheFullError, match=r"tree room \(7\) exceeds the cache \(max_seq_len=\d+\) by 8"):
        eng.generate(PROMPT, chat=False, max_new_tokens=2, speculative="amphista", tree="chain-3")   # a step runs


def test_a_small_dynamic_tree_reserves_only_the_depth_it_can_reach(tiny_hf_dir, monkeypatch):
    """dynamic-N is at most N - 1 deep, but the room reserved the heads' count: dynamic-2 on 3 heads reserved
    2 + 3 slots for a tree of 2 nodes, 1 deep (refusing answers that fit). The room it is given must still hold
    every slot a step writes: the verified nodes, and the accepted path the heads' cache takes."""
    eng = _engine(tiny_hf_dir, 64)
    n = _n(eng)
    seen = []
    step, heads_step = SpeculativeDecoder.step_device, eng.heads.step

    def watched(self, kv_len):          # a step writes the tree's nodes to the target's slots length..
        seen.append(int(self.cache.length[0]) + self.tree.num_nodes)
        return step(self, kv_len)

    def heads_watched(hidden, *rest):   # the heads write every entry given (padding too) from their length on
        seen.append(int(eng.heads.sal_cache.length[0]) + hidden.shape[1])
        return heads_step(hidden, *rest)
    monkeypatch.setattr(SpeculativeDecoder, "step_device", watched)
    monkeypatch.setattr(eng.heads, "step", heads_watched)
    plain = eng.generate(PROMPT, chat=False, max_new_tokens=64 - n)
    for tree, room in (("dynamic-2", 3), ("dynamic-3", 5), ("chain-3", 7)):
        seen.clear()
        new = 64 - n - room
        res = eng.generate(PROMPT, chat=False, max_new_tokens=new, speculative="amphista", tree=tree)
        assert res.token_ids == plain.token_ids[:new] and res.finish_reason == "length", tree
        assert seen and max(seen) <= 64, (tree, max(seen))
        with pytest.raises(CacheFullError, match=rf"tree room \({room}\) exceeds the cache \(max_seq_len=64\) by 1"):
            eng.generate(PROMPT, chat=False, max_new_tokens=new + 1, speculative="amphista", tree=tree)


def test_auto_near_the_cache_limit_says_what_would_let_it_speculate(tiny_hf_dir, monkeypatch):
    """speculative="auto" with no room for the tree warned "the tree needs 7 more cache slots than max_seq_len
    leaves" where max_seq_len left 2 (the tree's whole room, not the shortfall), and nothing of what would let the
    request speculate; each turn of a chat growing toward the limit got the same wrong number."""
    eng = _engine(tiny_hf_dir, 64)
    _auto_speculates(monkeypatch)
    n = _n(eng)
    for left in (2, 5):
        new = 64 - n - left
        with pytest.warns(UserWarning, match=re.escape(
                f"the tree needs 7 cache slots past prompt + max_new_tokens, but max_seq_len=64 leaves {left}; "
                f"decoding plainly (to speculate: max_new_tokens <= {new + left - 7} or max_seq_len >= "
                f"{64 + 7 - left})")) as got:
            res = eng.generate(PROMPT, chat=False, max_new_tokens=new, speculative="auto")
        assert "tree" not in res.stats.extra and len(got) == 1
        with warnings.catch_warnings():                       # the numbers it names do speculate
            warnings.simplefilter("error")
            res = eng.generate(PROMPT, chat=False, max_new_tokens=new + left - 7, speculative="auto")
        assert res.stats.extra["tree"] == "chain-3"
    # a prompt that leaves less than the tree's room whatever max_new_tokens is: only max_seq_len helps
    long = PROMPT + " jumps over the lazy dog" * 3
    m = _n(eng, long)
    assert 57 <= m <= 62                                      # 2 new tokens fit, the tree's 7 slots never do
    with pytest.warns(UserWarning, match=re.escape(f"leaves {62 - m}; decoding plainly (to speculate: max_seq_len "
                                                   f">= {m + 2 + 7})")):
        eng.generate(long, chat=False, max_new_tokens=2, speculative="auto")


def test_room_errors_name_the_numbers_and_what_to_do(tiny_hf_dir):
    """A prompt longer than the cache said only "no room for an answer" (nothing to do, no size that would serve
    it); an answer past the cache did not say by how much; a named speculative method refused for its tree's room
    alone did not say that plain decoding (or "auto") serves the request."""
    eng = _engine(tiny_hf_dir, 64)
    n = _n(eng)
    long = PROMPT * 30
    m = _n(eng, long)
    with pytest.raises(CacheFullError, match=re.escape(
            f"prompt is {m} tokens, longer than the cache (max_seq_len=64): no room for an answer; shorten it or "
            f"raise max_seq_len (with max_new_tokens=4 it needs max_seq_len >= {m + 4})")):
        eng.generate(long, chat=False, max_new_tokens=4)
    with pytest.raises(CacheFullError, match=re.escape(f"prompt 1 is {m} tokens")):
        eng.generate_batch([PROMPT, long], chat=False, max_new_tokens=4)
    with pytest.raises(CacheFullError, match=re.escape(
            f"prompt ({n} tokens) + max_new_tokens (100) exceeds the cache (max_seq_len=64) by {n + 36}; raise "
            f"max_seq_len or lower max_new_tokens")) as e:
        eng.generate(PROMPT, chat=False, max_new_tokens=100)
    assert "speculative" not in str(e.value)
    with pytest.raises(CacheFullError, match=r"tree room \(7\) exceeds the cache \(max_seq_len=64\) by 7; .*decode "
                                             r"plainly \(speculative=None, or 'auto'"):
        eng.generate(PROMPT, chat=False, max_new_tokens=64 - n, speculative="amphista", tree="chain-3")
    with pytest.raises(CacheFullError) as e:      # past the plain room too: plain decoding is no way out
        eng.generate(PROMPT, chat=False, max_new_tokens=64 - n + 1, speculative="amphista", tree="chain-3")
    assert "decode plainly" not in str(e.value) and "by 8" in str(e.value)


def test_a_batch_refused_for_memory_keeps_the_old_cache_and_the_chat_prefix(tiny_hf_dir, monkeypatch):
    """Growing the cache for a batch freed the old cache (and the kept chat prefix in it) before asking whether the
    larger one fits: a batch refused for memory cost the next chat turn a full prefill. Now the check comes first,
    counting the old cache as free, and only a batch that fits replaces it."""
    import amphista_engine.kv_cache as kv
    eng = _engine(tiny_hf_dir, 64)
    first = eng.generate(PROMPT, chat=False, max_new_tokens=4, reuse_prefix=True)
    cache = eng._cache
    seen = []

    def free_memory(device):        # just too little for a batch of 3 beside nothing else, plenty for 2
        seen.append(1)
        return 2 * cache.nbytes
    monkeypatch.setattr(kv, "available_memory", free_memory)
    with pytest.raises(CacheFullError, match="batch 3"):
        eng.generate_batch([PROMPT] * 3, chat=False, max_new_tokens=4)
    assert seen and eng._cache is cache
    second = eng.generate(PROMPT + first.text + " jumps", chat=False, max_new_tokens=4, reuse_prefix=True)
    assert second.stats.extra.get("prompt_tokens_reused", 0) > 0
    # the old cache's bytes count as free: a batch of 2 that fits only once they go is served
    rope = 3 * 64 * eng.config.head_dim * 4
    monkeypatch.setattr(kv, "available_memory", lambda device: cache.nbytes + rope)
    assert len(eng.generate_batch([PROMPT] * 2, chat=False, max_new_tokens=3)) == 2 and eng._cache.batch == 2

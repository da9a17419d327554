"""QA as a user bringing their own model (2026-12-07): `amphista perplexity`, SmolLM3's NoPE layers, YaRN and the
CPU 4-bit layer stack with Qwen's biases and q/k norms.

What held up (checked against transformers, not repeated here): perplexity on multilingual / emoji / CRLF text for
tiny Qwen2, Qwen3 (YaRN) and SmolLM3 at ctx 37, 101 and 255, with and without a BOS, fp32, bf16 and 4-bit; a
qwen2.5-0.5b-shaped random model at ctx 2048 (bf16: 4 s, ~1 GiB over the weights); YaRN with attention_factor,
mscale / mscale_all_dim, truncate false, beta_fast / beta_slow and original_max_position_embeddings at the top level
or in rope_scaling, past the original length; SmolLM3 with explicit no_rope_layers lists and intervals; greedy
answers of Qwen2 / Qwen3 / SmolLM3 (with YaRN) equal to transformers', speculative equal to plain, batches equal to
single rows on the 4-bit stack, whose Qwen logits equal the Python layer loop's. This file holds what did not."""
import json

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.cli import main
from amphista_engine.heads import random_heads
from amphista_engine.kernels import cpu_ops
from amphista_engine.kv_cache import KVCache
from amphista_engine.loading import load_model
from amphista_engine.model import AttentionSpec, causal_mask
from conftest import CORPUS, TINY_HF, save_sharp, write_tokenizer
from conftest import TINY_HF_COMMON as _OVER
from model_helpers import rel_err as _rel

transformers = pytest.importorskip("transformers")
needs_ext = pytest.mark.skipif(cpu_ops.load_extension() is None, reason="the cpu extension is not built")


@pytest.fixture(scope="module")
def smollm3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm3")
    torch.manual_seed(3)
    config = transformers.SmolLM3Config(**{**_OVER, "num_hidden_layers": 4, "pad_token_id": 0,
                                           "max_position_embeddings": 256})
    model = transformers.SmolLM3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "q_proj" in name or "k_proj" in name else 0.1)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, TINY_HF["vocab_size"])
    return path


@needs_ext
def test_smollm3_4bit_runs_the_cpu_layer_stack_and_batch_rows_equal_alone(smollm3_dir):
    """SmolLM3's NoPE layers (every 4th) made cpu_ops refuse the whole C++ stack: a 4-bit SmolLM3 ran the Python
    layer loop, whose one padded batch prefill gave a bf16 row other tokens than the same prompt alone (the 4-bit
    stack's promise in the README). The stack now runs the layers in runs of alike RoPE, the NoPE runs with rows
    that rotate by nothing."""
    engine = Engine.from_pretrained(str(smollm3_dir), device="cpu", dtype="bf16", max_seq_len=256, quant="q4")
    model, cfg = engine.model, engine.config
    assert cfg.nope_layers == (3,)
    assert cpu_ops.stack_runs(model.layers, model.norm, cfg, torch.bfloat16, model)
    assert model.prefill_chunk(engine._cache_for(1)) == cpu_ops.STACK_ROWS

    ids = torch.randint(0, TINY_HF["vocab_size"], (2, 23), generator=torch.Generator().manual_seed(5))

    def logits():
        cache = KVCache.for_model(cfg, 2, 128, torch.bfloat16, "cpu")
        spec = AttentionSpec(torch.zeros(2, dtype=torch.long), causal_mask(23, "cpu"), kv_len=32)
        with torch.inference_mode():
            first = model(ids, torch.arange(23)[None].expand(2, 23), cache, spec)
            prefix = torch.tensor([23, 17])                 # rows at other positions, a NoPE layer among them
            spec = AttentionSpec(prefix, causal_mask(5, "cpu"), kv_len=32)
            return first, model(ids[:, :5], prefix[:, None] + torch.arange(5)[None], cache, spec)

    real = cpu_ops.decoder_layers
    stack = logits()
    cpu_ops.decoder_layers = lambda *a: NotImplemented
    try:
        loop = logits()
    finally:
        cpu_ops.decoder_layers = real
    for s, lp in zip(stack, loop):
        assert _rel(s, lp) < 1e-2

    engine.load_heads(random_heads("amphista", model, num_heads=3, seed=1))
    prompts = ["Hello", CORPUS[:150], CORPUS[200:450], "def f(x):"]
    assert len(engine.encode_prompt(prompts[2], chat=False)) > 2 * cpu_ops.STACK_ROWS
    alone = [engine.generate(p, max_new_tokens=60, chat=False).token_ids for p in prompts]
    for speculative in ("none", "amphista"):
        batch = engine.generate_batch(prompts, max_new_tokens=60, chat=False, speculative=speculative)
        assert [r.token_ids for r in batch] == alone, speculative


def test_llama3_rope_scaling_without_its_original_length_is_read_as_transformers_reads_it(tmp_path):
    """A llama3 rope_scaling without original_max_position_embeddings: transformers takes max_position_embeddings,
    the engine took Llama 3's 8192 (other angles; logits ~2e-2 apart)."""
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_OVER, "max_position_embeddings": 64}))
    save_sharp(hf, tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c.pop("rope_parameters", None)
    c.update(rope_theta=10000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(c))
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert ref.config.rope_parameters["original_max_position_embeddings"] == 64
    loaded = load_model(str(tmp_path), dtype=torch.float32, device="cpu", max_seq_len=256)
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _rel(loaded.model(ids, torch.arange(200)[None]), ref(ids).logits) < 1e-5


def test_perplexity_chunks_flag_is_named_before_the_model_loads(tmp_path, capsys):
    """--chunks 0 was refused only after the load (seconds to minutes), as `max_chunks`, a name the CLI has not."""
    text = tmp_path / "t.txt"
    text.write_bytes(b"\xef\xbb\xbf" + CORPUS.replace("\n", "\r\n").encode())
    args = ["perplexity", "--model", str(tmp_path / "no-such-model"), "--file", str(text), "--max-seq-len", "128",
            "--ctx", "64"]
    for bad in ("0", "-3"):
        assert main(args + ["--chunks", bad]) == 2
        err = capsys.readouterr().err
        assert f"--chunks must be a positive integer, got {bad}" in err and "loading" not in err

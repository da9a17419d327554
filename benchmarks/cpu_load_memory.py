"""How much memory loading a 4-bit GGUF on the CPU takes: peak and resident RSS of a fresh process that runs
`Engine.from_pretrained(file, device="cpu")` and decodes a few tokens, against the file's size.

The file is a random Llama of Llama-3.2-1B's layer shapes (d 2048, 16 layers, GQA 32/8, SwiGLU 8192, tied
embeddings; SmolLM2's vocabulary and tokenizer, 49152 tokens) written here with gguf-py: layer linears Q4_0, the
embedding Q8_0, as llama.cpp's Q4_0 files store them (`--mixed`: Q4_K_M's layout of wider layers). Its outputs
are noise; its bytes are what counts. `--base`
runs the same measurement on another checkout (a git worktree) in alternating processes.

    python benchmarks/cpu_load_memory.py [--base COMMIT] [--quant auto,none] [--mixed | --hf] [--out DIR]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import hardware, md_table, write_results  # noqa: E402

SHAPE = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn=8192)

CHILD = r"""
import json, resource, sys, threading, time
anon = [0]


def sample():           # the peak of anonymous memory (RssAnon): what a load allocates, file pages aside
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                anon[0] = max(anon[0], int(line.split()[1]) / 1024)
        time.sleep(0.02)


threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
from amphista_engine import Engine
e = Engine.from_pretrained(sys.argv[1], device="cpu", dtype="fp32", max_seq_len=256, quant=sys.argv[2])
load_s = time.perf_counter() - t
resident = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
e.generate("Hello", max_new_tokens=4, ignore_eos=True, chat=False)
r = e.generate("Hello", max_new_tokens=32, ignore_eos=True, chat=False)
print(json.dumps({"load_s": load_s, "resident_mib": resident, "quant": e.quant, "tok_s": r.stats.decode_tokens_per_s,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "anon_peak_mib": anon[0]}))
"""


def wider(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v and ffn_down a Q4_K_M file stores Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def write_model(out: Path, mixed: bool = False) -> Path:
    import gguf
    import numpy as np

    from amphista_engine.gguf_file import read_gguf
    from amphista_engine.loading import resolve_model_path

    src = read_gguf(resolve_model_path("smollm2-135m"), tensors=False).meta
    d, L, H, KV, F = (SHAPE[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn"))
    hd, V = d // H, len(src["tokenizer.ggml.tokens"])
    w = gguf.GGUFWriter(str(out), "llama")
    for setter, v in (("block_count", L), ("context_length", 8192), ("embedding_length", d),
                      ("feed_forward_length", F), ("head_count", H), ("head_count_kv", KV), ("vocab_size", V)):
        getattr(w, "add_" + setter)(v)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_tokenizer_model(src["tokenizer.ggml.model"])
    w.add_tokenizer_pre(src.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(src["tokenizer.ggml.tokens"])
    w.add_token_types(src["tokenizer.ggml.token_type"])
    w.add_token_merges(src["tokenizer.ggml.merges"])
    w.add_bos_token_id(src["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(src["tokenizer.ggml.eos_token_id"])
    w.add_chat_template(src["tokenizer.chat_template"])
    rng = np.random.default_rng(0)

    def add(name, shape, qtype):
        x = rng.standard_normal(shape, dtype=np.float32) * 0.02
        if qtype is None:
            w.add_tensor(name, np.ones(shape, np.float32))
            return
        q = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, gguf.quants.quantize(x, q), raw_shape=gguf.quant_shape_to_byte_shape(x.shape, q),
                     raw_dtype=q)

    add("token_embd.weight", (V, d), "Q8_0")
    add("output_norm.weight", (d,), None)
    for i in range(L):
        for n, shape in (("attn_q", (H * hd, d)), ("attn_k", (KV * hd, d)), ("attn_v", (KV * hd, d)),
                         ("attn_output", (d, H * hd)), ("ffn_gate", (F, d)), ("ffn_up", (F, d)),
                         ("ffn_down", (d, F))):
            wide = mixed and n in ("attn_v", "ffn_down") and wider(i, L)
            add(f"blk.{i}.{n}.weight", shape, "Q5_0" if wide else "Q4_0")
        add(f"blk.{i}.attn_norm.weight", (d,), None)
        add(f"blk.{i}.ffn_norm.weight", (d,), None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_hf(out: Path) -> Path:
    """The same shapes as a Hugging Face folder: bf16 safetensors (one file), config.json, and a small byte-level
    BPE tokenizer (python_tests/conftest.py's; the vocabulary beyond it is never sampled from a prompt)."""
    import torch
    from safetensors.torch import save_file
    sys.path.insert(0, str(ROOT / "python_tests"))
    from conftest import write_tokenizer

    d, L, H, KV, F = (SHAPE[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn"))
    hd, V = d // H, 49152
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": d,
        "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).bfloat16()
    t = {"model.embed_tokens.weight": rnd(V, d), "model.norm.weight": torch.ones(d, dtype=torch.bfloat16)}
    for i in range(L):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": rnd(H * hd, d), p + "self_attn.k_proj.weight": rnd(KV * hd, d),
                  p + "self_attn.v_proj.weight": rnd(KV * hd, d), p + "self_attn.o_proj.weight": rnd(d, H * hd),
                  p + "mlp.gate_proj.weight": rnd(F, d), p + "mlp.up_proj.weight": rnd(F, d),
                  p + "mlp.down_proj.weight": rnd(d, F), p + "input_layernorm.weight": torch.ones(d).bfloat16(),
                  p + "post_attention_layernorm.weight": torch.ones(d).bfloat16()})
    save_file(t, str(out / "model.safetensors"))
    write_tokenizer(out, 1000)
    return out


def file_mib(model: Path) -> int:
    return round(sum(f.stat().st_size for f in ([model] if model.is_file() else model.iterdir())) / 2**20)


def measure(checkout: Path, model: Path, quant: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), quant], env=env, cwd=checkout,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{checkout}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="a commit to measure side by side (checked out in a temporary worktree)")
    ap.add_argument("--quant", default="auto,none")
    ap.add_argument("--model", help="a GGUF to load instead of writing the random 1B one")
    ap.add_argument("--hf", action="store_true", help="a Hugging Face folder (bf16 safetensors) of the same shapes")
    ap.add_argument("--mixed", action="store_true",
                    help="Q4_K_M's layout: attn_v and ffn_down of llama.cpp's use_more_bits layers wider (Q5_0 here, "
                         "gguf-py writes no Q6_K), the rest Q4_0")
    ap.add_argument("--out", default="bench_results/cpu_load_memory")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="amphista-mem-"))
    model = Path(args.model) if args.model else write_hf(tmp / "llama-1b-hf") if args.hf else \
        write_model(tmp / "llama-1b-q4.gguf", args.mixed)
    checkouts = [("this", ROOT)]
    if args.base:       # its own worktree and CPU extension, as checkout_ab.py builds them
        from benchmarks.checkout_ab import worktree
        checkouts.append(("base", worktree(args.base, Path(os.environ.get("TMPDIR", "/tmp")))))
    rows = []
    for quant in args.quant.split(","):
        for name, path in checkouts:
            r = measure(path, model, quant)
            rows.append({"checkout": name, "quant asked": quant, "quant ran": r["quant"],
                         "file MiB": file_mib(model), "peak RSS MiB": round(r["peak_mib"]),
                         "peak anonymous MiB": round(r["anon_peak_mib"]),
                         "resident after load MiB": round(r["resident_mib"]), "load s": round(r["load_s"], 1),
                         "decode tok/s": round(r["tok_s"], 1)})
            print(rows[-1], flush=True)
    meta = {"what": "RSS of a fresh process loading a random Llama-3.2-1B-shaped checkpoint, and its plain decoding speed "
                    "(32 tokens)", "file": "Hugging Face folder, bf16 safetensors" if args.hf else
            "Q4_K_M-like: Q5_0 attn_v/ffn_down in use_more_bits layers, Q4_0 else" if args.mixed else
            "Q4_0 layers, Q8_0 embedding",
            "shape": SHAPE, "base": args.base, "hardware": hardware("cpu"),
            "note": "peak RSS counts the file's memory-mapped pages (clean page cache, up to the file's size) while "
                    "the loader reads them (a Hugging Face folder's stay mapped while its bf16 weights are in use); resident "
                    "is after the load; peak anonymous memory (RssAnon, sampled every 20 ms) leaves file pages out"}
    write_results("cpu_load_memory", rows, meta, md_table(rows, list(rows[0])), Path(args.out))


if __name__ == "__main__":
    main()

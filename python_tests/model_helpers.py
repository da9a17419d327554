"""What the model-family tests share when they hold the engine's models against transformers' on the same weights:
the relative error of two logit tensors, the logits of one uncached forward (the engine's model and transformers'),
greedy answers (transformers' generate, the engine's plain and speculative runs) and, on a GPU, graphs against eager.

kernel_checks.rel_err is the kernel tests' version: it guards a zero reference, which a model's logits never are."""
from __future__ import annotations

import torch


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def forward_logits(model, ids):
    """[len(ids), V] logits of one uncached forward of the engine's model (a Transformer) over ids."""
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None])[0]


def loaded_logits(path, ids, max_seq_len):
    """forward_logits of the model load_model reads from path (a checkpoint folder or a GGUF file)."""
    from amphista_engine.loading import load_model
    return forward_logits(load_model(path, max_seq_len=max_seq_len).model, ids)


def hf_forward_logits(hf, ids):
    """[len(ids), V] logits of one forward of a transformers causal LM over ids."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def pretrained_logits(cls, path, ids):
    """hf_forward_logits of transformers' `cls` loaded from path in fp32."""
    return hf_forward_logits(cls.from_pretrained(path, dtype=torch.float32).eval(), ids)


def hf_greedy(hf, prompt, n):
    """transformers' greedy answer of exactly n tokens to the token ids `prompt` (the new ids only)."""
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                           pad_token_id=0)[0, len(prompt):].tolist()


def plain_and_speculative(engine, prompt, n):
    """The engine's greedy answers of exactly n tokens to `prompt` (token ids, no chat template): plain decoding's,
    then Amphista's over a dynamic-8 tree."""
    plain = engine.generate(prompt, chat=False, max_new_tokens=n, min_tokens=n, speculative="none").token_ids
    spec = engine.generate(prompt, chat=False, max_new_tokens=n, min_tokens=n, speculative="amphista",
                           tree="dynamic-8").token_ids
    return plain, spec


def cuda_logits(engine, hf, ids):
    """(the engine's, transformers') fp32 logits [1, len(ids), V] of one forward over ids on the GPU."""
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        return engine.model(x, torch.arange(len(ids), device="cuda")[None]).float(), hf(x).logits.float()


def graphs_and_eager_answers(path, prompt) -> dict:
    """{(graphs on?, method): token ids} of 60-token greedy answers to `prompt` on the GPU, plain ("none") and with
    random Amphista heads over a dynamic-8 tree, from an fp32 engine on path with and without CUDA graphs."""
    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    out = {}
    for graphs in (True, False):
        engine = Engine.from_pretrained(str(path), device="cuda", dtype="fp32", max_seq_len=256, cuda_graphs=graphs)
        engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
        for method in ("none", "amphista"):
            out[graphs, method] = engine.generate(prompt, chat=False, max_new_tokens=60, min_tokens=60,
                                                  speculative=method,
                                                  tree="dynamic-8" if method != "none" else None).token_ids
    return out


def tiny_engine_and_hf(tiny_hf_dir):
    """(an fp32 Engine on conftest's tiny checkpoint, 256 positions, batches of 2, random 3-head Amphista heads;
    transformers' LlamaForCausalLM on the same folder): what the logprob tests compare."""
    import transformers

    from amphista_engine import Engine
    from amphista_engine.heads import random_heads
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256, max_batch_size=2)
    engine.load_heads(random_heads("amphista", engine.model, num_heads=3, seed=1))
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    return engine, hf


# A speculative step's tree: (token, parent) per node, 0 the root (the step's next token)
TREE_NODES = [(42, -1), (7, 0), (99, 0), (5, 1), (250, 3), (64, 2)]


def tree_step_logits(m, prefix: list[int], nodes=TREE_NODES, max_seq_len: int = 128):
    """(logits [N, V] of one tree-verification step of `m` after prefilling `prefix` into a fresh fp32 cache, each
    node's path of tokens from the root): the nodes in their slots, siblings beside them, positions by depth, so
    node i's logits should be a plain forward's over prefix + paths[i]."""
    from amphista_engine.kv_cache import KVCache
    from amphista_engine.model import AttentionSpec, causal_mask
    P, N = len(prefix), len(nodes)
    anc = torch.zeros(N, N, dtype=torch.bool)
    paths = []
    for i, (tok, parent) in enumerate(nodes):
        anc[i, i] = True
        if parent >= 0:
            anc[i] |= anc[parent]
        paths.append([nodes[j][0] for j in range(i + 1) if anc[i, j]])
    depth = anc.sum(-1) - 1
    cache = KVCache.for_model(m.config, 1, max_seq_len, torch.float32, "cpu")
    with torch.no_grad():
        spec = AttentionSpec(torch.zeros(1, dtype=torch.long), causal_mask(P, "cpu"), P, empty_prefix=True)
        m(torch.tensor([prefix]), torch.arange(P)[None], cache, spec)
        spec = AttentionSpec(torch.tensor([P]), anc[None], P + N, decode=True)
        out = m(torch.tensor([[t for t, _ in nodes]]), (P + depth)[None], cache, spec)[0]
    return out, paths

"""The speculative decoder: draft with heads, verify a token tree in one target forward, accept, commit.

Same two calls as `PlainDecoder`: `prefill` returns the first (root) token; `step` returns up to
max_depth + 1 tokens per row and how many are real. Everything in a step stays on the device.
"""
from __future__ import annotations

import inspect
import json
import time
import warnings

import torch

from .acceptance import rejection_sample_accept
from .errors import ConfigError, InputError
from .generation import PlainDecoder, _sync, flag_no_token, flag_non_finite, kv_window
from .kernels import cpu_exact, cpu_packed, gpu_exact, ops
from .kernels.cpu_threads import on_pool
from .model import AttentionSpec
from .sampling import SamplingParams, answer_penalties
from .tree import (TOPK, TREES, TreeBuffers, build_tree, dynamic_tree, dynamic_tree_depth, get_tree_choices,
                   static_tree_tokens)

DEFAULT_TREE = "mc_sim_7b_63"
# On a GPU a static tree's step costs the same at any shape of 64 nodes (1.25x plain, 7B, H200), so the default is
# the heads' own 64-node tree where `tree-search` fitted one to the traffic: for the shipped heads mix-64 beat
# mc_sim_7b_63 on all 80 MT-Bench first turns (tau 2.486 vs 2.480 Amphista, 1.925 vs 1.911 Medusa;
# benchmarks/results/TRAINING.md, twenty-first session).
GPU_FITTED_TREE = "mix-64"
# A CPU verifies 64 nodes at ~3-4x the cost of a plain step, 16 at ~1.8 (AVX2 fp32, packed). This is the CPU tree
# when one is needed without timing; `--speculative auto` times the heads' recorded trees instead (speculation_check).
CPU_TREE = "tree-16"
# With 4-bit weights (kernels/cpu_quant.py) the int4 kernel pays per block of 4 rows: a 4-node step cost 1.8 plain
# steps, 16 nodes ~3.5 (benchmarks/results/cpu_q4_ab.md), so the untimed CPU tree is one block: the heads' fitted
# 4-node tree where they carry one, else a chain.
CPU_4BIT_TREE = "mix-4"
# A GPU verifies a batch's B x N tree rows at about a plain step's cost only while its products stay bound by
# reading the weights: an H100/H200 streams bf16 weights at ~3.3-4.8 TB/s and multiplies at ~990 TFLOP/s, so a
# product turns compute-bound from a few hundred rows. The untimed GPU tree of a batch keeps its rows within
# GPU_ROWS (B <= 4: the 64-node tree; 8: 32 nodes; ... 64: 4). A roofline bound, not yet a measurement:
# benchmarks/batch_tree_gpu.py times batch x tree on the next GPU run (GPU_SESSION.md).
GPU_ROWS = 256
GPU_BATCH_SIZES = (32, 16, 8, 4)


def gpu_batch_tree(num_heads: int, batch: int, heads_trees: dict | None = None) -> str:
    """The default GPU tree for a batch past GPU_ROWS // 64 rows: the largest of N = 32, 16, 8, 4 nodes with
    batch x N <= GPU_ROWS (4 past that), the heads' fitted mix-N where they carry one, else dynamic-N."""
    n = next((n for n in GPU_BATCH_SIZES if batch * n <= GPU_ROWS), GPU_BATCH_SIZES[-1])
    return f"mix-{n}" if f"mix-{n}" in (heads_trees or {}) else f"dynamic-{n}"


def default_tree(num_heads: int, device, heads_trees: dict | None = None, four_bit: bool = False,
                 batch: int = 1) -> str:
    if num_heads >= 4 and torch.device(device).type != "cpu":
        if batch * 64 > GPU_ROWS:
            return gpu_batch_tree(num_heads, batch, heads_trees)
        return GPU_FITTED_TREE if GPU_FITTED_TREE in (heads_trees or {}) else DEFAULT_TREE      # 4 deep
    if four_bit:
        return CPU_4BIT_TREE if CPU_4BIT_TREE in (heads_trees or {}) else f"chain-{min(3, num_heads)}"
    return CPU_TREE if num_heads >= 3 else f"chain-{num_heads}"     # tree-16 is 3 deep


ACCEPTANCE = ("auto", "greedy", "typical", "rejection")
# The drafting methods: trained heads, prompt lookup (prompt_lookup.py), or both in one tree.
METHODS = ("amphista", "medusa", "lookup", "amphista+lookup", "medusa+lookup")


def resolve_acceptance(acceptance: str, params: SamplingParams) -> str:
    """The acceptance rule a speculative run with these sampling parameters uses; InputError where they conflict.
    The engine asks before speculative="auto" is resolved, so a conflict is refused whether or not the run turns
    out speculative (on another machine, or with another max_seq_len, the same call would)."""
    if acceptance not in ACCEPTANCE:
        raise InputError(f"acceptance must be one of {ACCEPTANCE}, got {acceptance!r}")
    if acceptance == "auto":
        acceptance = "greedy" if params.greedy else "rejection"
    if acceptance == "rejection" and params.greedy:
        acceptance = "greedy"    # rejection sampling at T -> 0 is greedy acceptance
    if acceptance == "greedy" and not params.greedy:
        raise InputError(f"acceptance='greedy' keeps the target's argmax, so temperature={params.temperature} "
                         f"would sample only the first token; use 'rejection' (lossless) or 'typical' to sample")
    if acceptance == "typical" and (params.top_k or params.top_p < 1 or params.min_p):
        raise InputError("acceptance='typical' (Medusa's rule) samples from softmax(logits / temperature) and "
                         "takes no top_k / top_p / min_p; use acceptance='rejection' (lossless) for them")
    return acceptance


def _tree_file(path: str):
    """A .json file with a path list, or a `tree-search` result (its `trees` dict with one tree)."""
    from .text_files import read_utf8, user_path
    path = user_path(path)         # a quoted "~/t.json" (or --tree=~/t.json) reaches us as typed
    try:
        obj = json.loads(read_utf8(path))
    except FileNotFoundError:
        raise ConfigError(f"tree file not found: {path}") from None
    except OSError as e:          # a directory, no permission: the file, not a traceback
        raise ConfigError(f"tree file {path} cannot be read: {e.strerror or e}") from None
    except InputError as e:       # not UTF-8
        raise ConfigError(f"tree file {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"tree file {path} is not valid JSON: {e}") from None
    trees = obj.get("trees") if isinstance(obj, dict) else None
    if isinstance(trees, dict) and len(trees) == 1:
        obj = next(iter(trees.values()))
    if not isinstance(obj, list):
        several = (f"; it holds {len(trees)} trees ({', '.join(map(str, trees))}): save the one you want as a "
                   f"list of paths" if isinstance(trees, dict) and trees else "")
        raise ConfigError(f"tree file {path} must hold a JSON list of rank paths (or one tree-search tree){several}")
    return obj


class TreeSpec:
    """A static tree (built once, on the device) or a dynamic one of N nodes (built every step)."""

    def __init__(self, tree, num_heads: int, device, heads_trees: dict | None = None, four_bit: bool = False,
                 chain: int = 0):
        """tree: a shipped name, dynamic-N, a name from heads_trees (trees fitted to the loaded heads by
        `amphista tree-search --save`, e.g. tuned-63), a JSON path list, or a .json file holding one; None: the
        device's default (four_bit: a target with 4-bit CPU weights). chain: a prompt-lookup chain of that many
        nodes off the root beside the heads' (HeadsWithLookup; static trees only): `bare` is then the heads' tree
        alone, verified in a step where no row's lookup found a match."""
        if tree is None:
            tree = default_tree(num_heads, device, heads_trees, four_bit)
        self.name = tree if isinstance(tree, str) else "custom"
        if isinstance(tree, str) and heads_trees and tree in heads_trees:
            tree = heads_trees[tree]
        elif isinstance(tree, str) and tree.endswith(".json"):
            tree = _tree_file(tree)
        elif isinstance(tree, str) and tree.lstrip().startswith("["):     # a path list given on a command line
            try:
                tree = json.loads(tree)
            except ValueError as e:     # JSONDecodeError, or an integer past Python's 4300 digits
                raise ConfigError(f"tree {tree[:80]!r} is neither a tree name nor a JSON list of paths: {e}") from None
        elif isinstance(tree, str) and tree.startswith("tuned-"):
            raise ConfigError(f"tree {tree!r}: the loaded heads carry no such fitted tree "
                              f"(theirs: {', '.join(sorted(heads_trees or {})) or 'none'}); "
                              f"run `amphista tree-search --save` on them")
        self.static: TreeBuffers | None = None
        self.bare: TreeBuffers | None = None
        if chain and isinstance(tree, str) and tree.startswith("dynamic-"):
            raise ConfigError(f"tree {tree!r}: a prompt-lookup chain joins a static tree only (the heads' nodes and "
                              f"the chain's are laid out once); pick a static tree, e.g. 'tree-16' or 'mix-4'")
        if isinstance(tree, str) and tree.startswith("dynamic-"):
            n = tree.removeprefix("dynamic-")
            # int() would also take ' 8', '+8' and '1_6' (16): a name the heads' recorded taus never match
            if not (n.isascii() and n.isdigit()):
                raise ConfigError(f"dynamic tree must be 'dynamic-N' with N an integer, got {tree!r}")
            self.num_nodes = int(n)
            if not 2 <= self.num_nodes <= 512:
                raise ConfigError(f"dynamic tree size must be in [2, 512], got {self.num_nodes}")
            self.head_depth = None      # (set below)
            try:      # up front, as a static tree too deep for the heads: the first step would refuse it mid-run
                # the depth the tree can reach (N - 1 nodes below the root, at most one per head): it sizes a
                # step's tokens and cache room, and the CPU's exactness limit (dynamic-4 on 8 heads is 3 deep)
                self.max_depth = self.head_depth = dynamic_tree_depth(num_heads, TOPK, self.num_nodes)
            except ConfigError as e:
                raise ConfigError(f"tree {tree!r}: {e}") from None
        else:
            if isinstance(tree, str) and tree not in TREES:
                fitted = ", ".join(sorted(heads_trees or {})) or "none"
                raise ConfigError(f"unknown tree {tree!r}; choose a shipped tree ({', '.join(sorted(TREES))}), "
                                  f"dynamic-N with N in [2, 512], a tree fitted to the loaded heads ({fitted}), "
                                  f"a JSON list of rank paths, or a .json file holding one")
            self.static = build_tree(tree, TOPK, device)
            self.num_nodes, self.max_depth = self.static.num_nodes, self.static.max_depth
            if self.num_nodes < 2:        # the root alone: every step would pay the heads for nothing
                raise ConfigError(f"tree {self.name if self.name != 'custom' else tree!r} has no draft nodes; "
                                  f"give at least one path, e.g. [[0]]")
            self.head_depth = self.max_depth
            if chain:
                # the chain's nodes read a rank past the heads' top-k: the lookup's token at their depth (build)
                self.bare = self.static
                self.static = build_tree(get_tree_choices(tree) + [(TOPK,) * d for d in range(1, chain + 1)],
                                         TOPK + 1, device)
                self.num_nodes, self.max_depth = self.static.num_nodes, self.static.max_depth
                self.name = f"{self.name}+chain-{chain}"
            if self.head_depth > num_heads:
                raise ConfigError(f"tree {self.name!r} is {self.head_depth} deep but the heads draft only "
                                  f"{num_heads} tokens; pick a tree at most {num_heads} deep")

    def build(self, root: torch.Tensor, draft_logits: torch.Tensor, token_ids=None, chain=None,
              bare: bool = False) -> TreeBuffers:
        """Node tokens and layout for this step. draft_logits: [B, K, V']; token_ids maps a logit index to its
        token (heads with a draft vocabulary), None = identity. chain [B, L]: the prompt lookup's tokens for the
        chain's nodes; bare: verify `bare` in place of the whole tree."""
        if bare and self.bare.num_nodes == 1:         # a lookup alone with no match: the root (a plain step)
            self.bare.tokens = root[:, None]
            return self.bare
        if self.static is None:
            k = min(TOPK, draft_logits.shape[-1])
            values, slots = torch.log_softmax(draft_logits.float(), -1).topk(k, dim=-1)
            return dynamic_tree(root, (values, slots if token_ids is None else token_ids(slots)), self.num_nodes, k)
        top = draft_logits[:, :self.head_depth].topk(min(TOPK, draft_logits.shape[-1]), dim=-1).indices
        if token_ids is not None:
            top = token_ids(top)
        if top.shape[-1] < TOPK:     # vocabularies smaller than top-k: repeat (acceptance skips duplicates)
            top = torch.cat([top, top[..., -1:].expand(*top.shape[:-1], TOPK - top.shape[-1])], -1)
        tree = self.bare if bare else self.static
        if tree.topk > TOPK:         # rank TOPK at depth d: the chain's token there (depths past the heads' too)
            grown = top.new_zeros(top.shape[0], self.max_depth, TOPK + 1)
            grown[:, :top.shape[1], :TOPK] = top
            grown[:, :chain.shape[1], TOPK] = chain[:top.shape[0]]     # (the rows this step runs)
            top = grown
        tree.tokens = static_tree_tokens(tree, root, top)
        return tree


def _next_tokens(tokens: torch.Tensor, count: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """What the SAL pairs with each prefilled position's hidden state: the token at the next position, and after a
    row's last one (count - 1) the token its prefill sampled."""
    nxt = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], 1)
    return nxt.scatter_(1, (count - 1)[:, None], first[:, None])


class SpeculativeDecoder(PlainDecoder):
    def __init__(self, model, cache, heads, tree: TreeSpec, params: SamplingParams, acceptance: str = "auto",
                 profile: bool = False):
        super().__init__(model, cache, params)
        acceptance = resolve_acceptance(acceptance, params)
        self.heads, self.tree, self.acceptance, self.profile = heads, tree, acceptance, profile
        too_big = tree.max_depth > cpu_exact.MAX_DEPTH or tree.num_nodes > cpu_packed.CHUNKED_UP_TO
        if too_big and model.invariant_decode(cache):
            raise ConfigError(f"tree {tree.name!r} has {tree.num_nodes} nodes, {tree.max_depth} deep; "
                              f"{gpu_exact.ENV_VAR}=1 keeps greedy output exact for trees of at most 64 nodes, "
                              f"{gpu_exact.MAX_DEPTH} deep")
        half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(cache.k.dtype)
        rounds_bf16 = half is not None or getattr(model, "rounds_linear_inputs", False)
        if too_big and model.orders_decode(cache) and rounds_bf16:
            what = half or "4-bit (quant='q4')"
            # 4-bit layers round their inputs in fp32 too: only float weights in fp32 take any tree
            fix = ("fp32 with float weights (quant='none'; --dtype fp32 --quant none) takes any tree"
                   if getattr(model, "rounds_linear_inputs", False) else "fp32 takes any tree")
            raise ConfigError(f"tree {tree.name!r} has {tree.num_nodes} nodes, {tree.max_depth} deep; {what} CPU "
                              f"verification keeps greedy output exact for trees of at most "
                              f"{cpu_packed.CHUNKED_UP_TO} nodes, {cpu_exact.MAX_DEPTH} deep ({fix})")
        # Trees too big for the ordered layout (only fp32 with unrounded linears gets here) are verified as a
        # non-decode forward, i.e. on the SDPA path: exact in practice (fp32 rounding), not by construction.
        self._ordered_verify = not (too_big and model.orders_decode(cache))
        # Heads with a draft vocabulary score token subsets; any drafter without one scores token ids directly.
        self._token_ids = getattr(heads, "token_ids", None)
        draft_vocab = getattr(getattr(heads, "config", None), "draft_vocab_size", 0) or 0
        if tree.static is None and 0 < draft_vocab < TOPK:
            # a dynamic tree takes each head's top-min(TOPK, draft vocabulary): too few slots for its nodes was
            # refused only at the first step, after the prefill, naming a "top-3" the user never chose
            try:
                dynamic_tree_depth(tree.max_depth, draft_vocab, tree.num_nodes)
            except ConfigError as e:
                raise ConfigError(f"tree {tree.name!r}: the heads' draft vocabulary holds {draft_vocab} tokens, so "
                                  f"each head drafts its top {draft_vocab}: {e}") from None
        self._draft_ids = None          # the token of each draft slot, for penalties (set at prefill)
        # Drafts of the heads the tree reads only (a CPU pays each head's LM-head rows: mix-4's 2 of 4 heads saved
        # ~0.25 ms a step on SmolLM2's 4-bit heads), where the drafter takes a depth
        takes = "depth" in inspect.signature(heads.step).parameters
        self._depth = {"depth": tree.head_depth} if takes else {}
        self.tokens_per_step = tree.max_depth + 1
        self.times = {"draft": 0.0, "verify": 0.0, "accept": 0.0, "commit": 0.0}
        self.admits = False     # set by the engine before prefill: rows may join between steps (add_rows)
        # A drafter that says where it has no guess (prompt lookup's `found`): a CPU, which pays a tree by the node,
        # verifies the tree's `bare` part in a step no row has one for (the heads' tree; the root alone, a plain
        # step's cost, for a lookup alone); a GPU keeps the static tree its graphs replay (a chain costs it little)
        self._bare = False
        self.prediction = None  # each row's predicted output (token ids) for a drafter that reads one (prompt lookup)

    def _tick(self, phase: str, t0: float) -> float:
        if self.profile:
            _sync(self.device)
        t = time.perf_counter()
        self.times[phase] += (t - t0) * 1e3
        return t

    @on_pool
    @torch.inference_mode()
    def prefill(self, prompts):
        root = super().prefill(prompts)
        B, T = len(prompts), max(len(p) for p in prompts)
        r = self.prefix_reuse if B == 1 else 0
        count = self.cache.length[:B] - r
        # The SAL sees every prompt position: hidden state at t and the token the target put at t + 1 (after a
        # kept prefix, only the prefilled positions: the heads' cache holds the others from the previous run).
        hidden = self._prefill_hidden
        tokens = self._prefill_tokens
        nxt = _next_tokens(tokens, count, self.next)      # root may carry NON_FINITE, next never
        if hasattr(self.heads, "set_prediction"):
            self.heads.set_prediction(self.prediction)      # placed by the reset or resume below
        if r:
            self.heads.resume_cache(r)
        else:
            # rows for every cache row: a run that takes new prompts between steps (add_rows) may grow to them
            self.heads.reset_cache(max(B, self.cache.batch) if self.admits else B, self.cache.max_seq_len)
        self.draft = self.heads.step(hidden, nxt, count, kv_window(T, self.cache.max_seq_len), **self._depth)
        if self._token_ids is not None and (self.seen is not None or self.counts is not None or self.bias is not None) \
                and getattr(getattr(self.heads, "config", None), "draft_vocab_size", None) != 0:
            # Slots that stand for tokens (a draft vocabulary; a drafter that maps slots without declaring one has
            # the width of these first drafts: a 40-slot draft met [B, V] penalties in a torch size error). Made at
            # the prefill, never in a step a CUDA graph may be capturing; heads over every token need none.
            self._draft_ids = self._token_ids(torch.arange(self.draft.shape[-1], device=self.device))
        self.last_count = None          # (self.ongoing: set by PlainDecoder.prefill, kept by its keep_rows)
        return root

    @torch.inference_mode()
    def end_row(self, i: int):
        """Row i's answer is complete: its cache length stops advancing. The host loop drops ended rows only in
        bunches (keep_rows), so an ended row kept meanwhile would otherwise go on accepting up to max_depth + 1
        tokens a step past the room its prompt was given."""
        self.ongoing[i] = 0

    def can_drop_rows(self) -> bool:
        return super().can_drop_rows() and hasattr(self.heads, "keep_rows")    # a drafter of one's own may not

    @torch.inference_mode()
    def keep_rows(self, keep: list[int]):
        """As PlainDecoder's, with the drafts and the heads' own cache: a speculative row costs a tree of rows a
        step, so a batch whose answers end at different lengths otherwise verifies trees for rows that ended."""
        idx = super().keep_rows(keep)
        self.heads.keep_rows(idx)
        self.draft = self.draft[idx]
        if self.last_count is not None:
            self.last_count = self.last_count[idx]
        return idx

    def _on_prefill(self, tokens, hidden):
        self._prefill_tokens, self._prefill_hidden = tokens, hidden

    def row_capacity(self) -> int:
        """As PlainDecoder's, within the heads' own cache's rows too; a drafter without prefill_rows takes no new
        rows (the batch's own, its ended ones included, are all it has)."""
        if not hasattr(self.heads, "prefill_rows"):
            return 0
        sal = getattr(self.heads, "sal_cache", None)
        return min(super().row_capacity(), sal.batch if sal is not None else self.cache.batch)

    def _on_add_rows(self, idx, tmp, captured):
        """The new rows' drafts: the heads see their prompts as at a prefill, into their own cache's rows idx."""
        tokens, hidden = captured["tokens"], captured["hidden"]
        count = tmp.cache.length[:len(idx)]
        nxt = _next_tokens(tokens, count, tmp.next)
        kv_len = kv_window(tokens.shape[1], self.cache.max_seq_len)
        self.draft[idx] = self.heads.prefill_rows(idx, hidden, nxt, count, kv_len, **self._depth)
        if self.last_count is not None:
            self.last_count[idx] = 0

    @on_pool
    @torch.inference_mode()
    def step(self):
        if self.last_count is not None:            # already synced by the host loop: no extra wait
            self.host_len += int(self.last_count.max())
        self.forwards += 1
        self._advance_constraint()
        found = getattr(self.heads, "found", None)
        # (not under graphs: a replay runs the captured tree, whatever this step found)
        self._bare = (found is not None and self.tree.bare is not None and self.device.type == "cpu"
                      and "step_device" not in self.__dict__ and not bool(found[:self.next.shape[0]].any()))
        # One window serves the verify forward (N new slots) and the SAL update (at most D + 1 slots).
        return self.step_device(kv_window(self.host_len + self.tree.num_nodes, self.cache.max_seq_len))

    def step_device(self, kv_len: int):
        """Draft tree -> verify -> accept -> commit, on the device. State tensors (next token, drafts, cache
        lengths) are updated in place so a CUDA graph can capture and replay the whole step."""
        t0 = time.perf_counter()
        B, root, length = self.next.shape[0], self.next, self.cache.length[:self.next.shape[0]]
        draft = self.draft if self.constraint is None else self.constraint.first_head(self.draft, self._token_ids)
        draft = self._penalised_draft(draft)
        # (the lookup's arguments only where there is a lookup: a TreeSpec.build of the heads' own signature, a
        # test's spy too, serves every other drafter)
        chain = getattr(self.heads, "chain", None)
        lookup = {"chain": chain} if chain is not None else {}
        tree = self.tree.build(root, draft, self._token_ids, **lookup, **({"bare": True} if self._bare else {}))
        t0 = self._tick("draft", t0)

        positions = length[:, None] + (tree.depth if tree.batched else tree.depth.expand(B, -1))
        mask = tree.mask if tree.batched else tree.mask[None]
        spec = AttentionSpec(length, mask, kv_len, decode=self._ordered_verify)
        logits, hidden = self.model(tree.tokens, positions, self.cache, spec, return_hidden=True)
        t0 = self._tick("verify", t0)

        p = self.params
        scores = logits
        # the distribution plain decoding samples (a node's token is the row's produced + depth-th, after its own
        # path's tokens); logprobs stay the model's own
        logits = self._penalised(self._constrained(self._held_back(self._biased(logits, tree), tree.depth), tree),
                                 tree)
        if self.acceptance == "greedy":
            res = ops.greedy_accept(tree.tokens, logits, tree.retrieve)
        elif self.acceptance == "typical":
            res = ops.typical_accept(tree.tokens, logits, tree.retrieve, p.temperature, generator=self.generator)
        else:
            res = rejection_sample_accept(tree.tokens, logits, tree, p.temperature, p.top_k, p.top_p,
                                          generator=self.generator, min_p=p.min_p)
        t0 = self._tick("accept", t0)

        # Commit: the accepted path's K/V moves to contiguous slots after the prefix, for all layers at once.
        nodes = res.accepted_nodes.clamp(min=0)                              # [B, D+1]
        count = (res.accept_len + 1) * self.ongoing                         # ended rows stay where they are
        self.cache.compact(length[:, None] + nodes, length)
        # Emitted = the token after each accepted node (the next accepted node's, then the bonus): exactly
        # the "next token" the SAL pairs with each accepted hidden state. Padding (-1) only needs a valid id.
        out = res.emitted.clamp(min=0)
        rows = nodes.shape[1]
        if self.device.type == "cpu":
            # A CPU pays the heads' fusion and SAL by the row, and a step accepts ~2 of the tree's D + 1 rows: the
            # heads take only as many as some row accepted (the host reads this count after the step anyway; a
            # GPU keeps D + 1, the static shape its graphs replay)
            rows = max(int(count.max()), 1)
        acc_hidden = hidden.gather(1, nodes[:, :rows, None].expand(-1, -1, hidden.shape[-1]))
        length += count
        if self.produced is not None:
            self.produced += count
        self._record(out, count)
        self.draft.copy_(self.heads.step(acc_hidden, out[:, :rows], count, kv_len, **self._depth))
        self.next.copy_(res.next_token)
        if self.logprobs:
            # each emitted token's log-probability where the target put it: at the accepted node before it
            at = scores.gather(1, nodes[..., None].expand(-1, -1, scores.shape[-1]))
            self._score(at, out)       # rebound: re-pointed after a graph's replay (top_logprobs too)
        self.last_count = count
        if self.constraint is not None:
            self.emitted = (out, count)
        self._tick("commit", t0)
        # the model's own logits for overflow; the ones tokens were chosen from for a row with none left
        chosen_from = None if logits is scores else logits
        return flag_no_token(flag_non_finite(out, scores), chosen_from, res.accepted_nodes), count

    def _penalised_draft(self, draft: torch.Tensor) -> torch.Tensor:
        """The heads' guesses ranked under the answer's penalties (its tokens before the step, the same for every
        head): the heads learnt unpenalised text, and their top guesses are often the very tokens a penalty pushes
        down, so an unpenalised tree spends its nodes on tokens the target no longer picks (16 MT-Bench first turns,
        4-bit SmolLM2, mix-4, repetition_penalty 1.3: tau 1.17 -> 1.30; 1-2% lower under mild penalties, where the
        target still repeats: benchmarks/results/cpu_penalties_ab.md). The bias row (logit_bias, allowed_token_ids,
        one-token bad words) first, as plain decoding applies it: a banned token is no draft while others are left
        (-inf held at -1e4: a head with no allowed guess keeps finite scores to rank)."""
        ids = self._draft_ids
        if self.bias is not None:
            draft = draft.float() + (self.bias if ids is None else self.bias[ids]).clamp(min=-1e4)
        if self.seen is None and self.counts is None:
            return draft
        seen, counts = ((None if t is None else (t if ids is None else t[:, ids])[:, None])
                        for t in (self.seen, self.counts))          # the same for every head
        return answer_penalties(draft, seen, counts, self.params)

    def stats_extra(self) -> dict:
        kind = getattr(self.heads, "kind", None) or getattr(getattr(self.heads, "config", None), "kind", None)
        return {"method": kind, "tree": self.tree.name, "tree_nodes": self.tree.num_nodes,
                "acceptance": self.acceptance,
                "time_ms": {k: round(v, 3) for k, v in self.times.items()}}


def make_speculative_decoder(engine, batch: int, params: SamplingParams, method: str, tree,
                             acceptance: str = "auto", fits=None, tree_room: bool = True):
    """Returns (decoder, extra cache room it needs beyond prompt + max_new_tokens). fits(extra): the engine's room
    checks, called before its cache is allocated or grown (a refused call paid for a larger cache); where it returns
    False nothing is made: (None, extra). tree_room=False: no step runs (max_new_tokens=1), so no room is taken."""
    if method not in METHODS:
        raise InputError(f"speculative must be one of {', '.join(map(repr, METHODS))}, 'auto' or None ('none'), got "
                         f"{method!r}")
    if method == "lookup":          # drafts from the text itself: no heads
        drafter, spec = engine._lookup(tree)
    else:
        heads_kind = method.removesuffix("+lookup")
        if engine.heads is None:
            raise InputError(f"speculative={method!r} needs drafting heads: Engine.from_pretrained(..., "
                             f"heads=\"default\") for the shipped ones, heads=DIR for your own, or "
                             f"engine.load_heads(...); speculative='lookup' drafts without them")
        if engine.heads.config.kind != heads_kind:
            raise InputError(f"speculative={method!r} but the loaded heads are {engine.heads.config.kind} heads")
        if method.endswith("+lookup"):
            drafter, spec = engine._heads_with_lookup(tree, batch)
        else:
            drafter, spec = engine.heads, engine._tree_spec(tree, batch)
    # A step writes the tree's nodes and accepts at most its depth + 1 tokens (a dynamic-N tree: at most N - 1 deep)
    extra = spec.num_nodes + spec.max_depth if tree_room else 0
    if fits is not None and not fits(extra):
        return None, extra
    cache = engine._cache
    if cache is None or cache.batch < batch:
        # The decoder's own refusals (a tree too big for exact verification, an acceptance rule) read only the
        # cache's dtype and device: asked of a one-slot stand-in first, they come before the cache is allocated.
        from .kv_cache import KVCache
        c = engine.config
        SpeculativeDecoder(engine.model, KVCache(c.n_layers, 1, c.n_kv_heads, 1, c.head_dim, engine.dtype,
                                                 engine.device), drafter, spec, params, acceptance)
    dec = SpeculativeDecoder(engine.model, engine._cache_for(batch), drafter, spec, params, acceptance,
                             profile=getattr(engine, "profile", False))
    if "_checked_unpacked_rows" not in engine.__dict__:
        # Once per engine (its linears and dtype are fixed: no need to walk its modules every run), as a warning
        # rather than a refusal: the output is right up to those near-ties, and these setups are chosen on purpose
        # (fp16, an A/B without packing). Silent, fp16 SmolLM2 left plain greedy's tokens in 3 of 12 answers (128
        # tokens; bf16 without packing: 2 of 4 on mc_sim_7b_63).
        engine._checked_unpacked_rows = True
        if why := unpacked_rows(engine.model, dec.cache):
            warnings.warn(why, stacklevel=2)
    return dec, extra


def unpacked_rows(model, cache) -> str | None:
    """Why this CPU target's speculative greedy output can leave plain greedy output at a near-tie although its
    decode steps sum keys in position order (None where nothing says so): its float linear layers are torch's
    own, not cpu_packed's, and torch's CPU products round a row differently with the call's row count (fp16 at
    any count; bf16 past 32 rows, or for a lone row without AMX), so a tree node's logits are not plain decoding's.
    fp32 without AMPHISTA_EXACT_GREEDY promises no bits (its rounding keeps answers equal in practice)."""
    if cache.k.device.type != "cpu" or not model.orders_decode(cache):
        return None
    dtype = cache.k.dtype
    if not any(type(m) is torch.nn.Linear and m.weight.dtype == dtype for m in model.modules()):
        return None              # packed for oneDNN (cpu_packed) or on 4-bit / 8-bit codes (cpu_quant)
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    why = ("the engine packs bf16 and fp32 only" if dtype == torch.float16
           else f"{cpu_packed.ENV_VAR} is off" if not cpu_packed.requested()
           else f"oneDNN does not pack {name} on this CPU")
    return (f"the target's {name} linear layers are not packed for oneDNN ({why}): their products round a row "
            f"differently with the step's row count, so speculative output can leave plain decoding's tokens at a "
            f"near-tie; for token-for-token greedy output use dtype bf16 or fp32 with packing, or quant='q4'")

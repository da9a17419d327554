"""The static KV cache: allocated once, lengths kept on the device, writes and compaction by slot index."""
from __future__ import annotations

import torch

from .errors import CacheFullError
from .kernels import cpu_exact, ops


class KVCache:
    """K and V for every layer in one buffer each, [L, B, H_kv, S, D].

    One buffer for all layers lets compaction move an accepted path for every layer in one indexed copy.
    `length` [B] lives on the device so a decode step (or a CUDA graph replay) never asks the host.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device, scratch_slots: int = 0):
        """scratch_slots: slots past max_seq_len that hold no token, only a step's working copies
        (cpu_exact.scratch_slots)."""
        shape = (n_layers, batch, n_kv_heads, max_seq_len + scratch_slots, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_seq_len = max_seq_len
        self.batch = batch
        # Set when a run produced non-finite values: the next reset clears every slot. Lengths alone leave stale
        # K/V in the slots past them, which attention masks with weight 0, and the torch reference's 0 x NaN is NaN:
        # one overflowing run would otherwise poison every later one on the same engine.
        self.dirty = False

    @classmethod
    def for_model(cls, cfg, batch: int, max_seq_len: int, dtype, device) -> "KVCache":
        """A target model's cache; on the CPU with room for the ordered attention's key windows."""
        scratch = cpu_exact.scratch_slots(max_seq_len) if torch.device(device).type == "cpu" else 0
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim, dtype, device, scratch)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.length.nbytes

    @staticmethod
    def check_fits(cfg, batch: int, max_seq_len: int, dtype, device, freeable: int = 0):
        """Refuses, by name, a cache (with the RoPE table, built in fp32 for every position) that the device has
        no memory for: allocated, it would end in an out-of-memory kill on Linux with no message at all.
        freeable: bytes the caller frees before allocating (the cache this one replaces)."""
        device = torch.device(device)
        scratch = cpu_exact.scratch_slots(max_seq_len) if device.type == "cpu" else 0
        esize = torch.empty(0, dtype=dtype).element_size()
        kv = 2 * cfg.n_layers * batch * cfg.n_kv_heads * (max_seq_len + scratch) * cfg.head_dim * esize
        need = kv + 3 * max_seq_len * cfg.head_dim * 4       # the table's peak: angles, cos, sin, their concat
        free = available_memory(device)
        if free is not None and need > free + freeable:
            fewer = (f" or the batch of {batch} (max_batch_size, or fewer prompts per generate_batch)"
                     if batch > 1 else "")
            # a max_seq_len of hundreds of digits needs more bytes than a float holds (need / 2**30 overflowed)
            size = f"{need / 2**30:.1f} GiB" if need < 2**1000 else "more memory than any machine has"
            raise CacheFullError(f"max_seq_len={max_seq_len} (batch {batch}) needs {size} for the KV "
                                 f"cache and RoPE table, but {device.type} has {(free + freeable) / 2**30:.1f} GiB "
                                 f"free; lower max_seq_len{fewer}")

    def reset(self):
        self.length.zero_()
        if self.dirty:
            self.k.zero_()        # in place: CUDA graphs captured over these buffers stay valid
            self.v.zero_()
            self.dirty = False

    def write(self, layer: int, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, H, T, D] go to slots start[b] .. start[b] + T - 1 of each row."""
        ops.kv_write(self.k, self.v, layer, start, k, v)

    def write_qkv(self, layer: int, start: torch.Tensor, qkv: torch.Tensor, rope: torch.Tensor,
                  n_heads: int) -> torch.Tensor:
        """qkv: the fused QKV projection [B, T, (n_heads + 2 H_kv) D]; rope: [B or 1, T, D] rows of the RoPE
        table. Writes RoPE'd k and v like `write`; returns RoPE'd q [B, T, n_heads, D] (ops.qkv_rope_write)."""
        return ops.qkv_rope_write(qkv, rope, self.k, self.v, layer, start, n_heads, self.k.shape[2])

    def read(self, layer: int, kv_len: int, batch: int):
        return self.k[layer, :batch, :, :kv_len], self.v[layer, :batch, :, :kv_len]

    def keep_rows(self, keep: torch.Tensor):
        """Rows keep[i] move to row i (i < len(keep)), their lengths with them: a batch whose ended rows stop
        costing compute. Copies only each layer's slots up to the longest kept row (one host sync: a drop is rare)."""
        n = len(keep)
        T = min(int(self.length[keep].max()), self.max_seq_len) if n else 0
        # Layer by layer: the gather copies first (overlapping moves are safe), and its temporary is one layer's
        # kept rows. All layers at once it was all of them: ~30 GB past a 7B bf16 cache of 64 rows x 4096 slots,
        # an out-of-memory error mid-run on a GPU that held the cache itself.
        for buf in (self.k, self.v):
            for layer in buf:
                layer[:n, :, :T] = layer[keep, :, :T]
        self.length[:n] = self.length[keep]

    def compact(self, src: torch.Tensor, dst_start: torch.Tensor):
        """Copy slots src[b, m] to dst_start[b] + m for every layer at once (accepted tree path -> contiguous).

        src: [B, M] slot indices; entries past a row's accepted count may hold any valid slot: they land
        beyond the new length, where nothing reads them. Gathering first makes overlapping moves safe.
        """
        ops.kv_compact(self.k, self.v, src, dst_start)   # all layers, K and V, one launch on the kernel backends


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still allocate: free GPU memory, or the kernel's MemAvailable on Linux (None where
    neither is known: no check then)."""
    if device.type == "cuda":
        # The driver's free memory leaves out what torch's caching allocator holds unused (a long prefill's
        # activations, a dropped cache): it hands that out first, or frees it and retries, so it is free here too
        # (but for CUDA graphs' private pools: decode steps' few-row activations, small). Without it a cache that
        # fits was refused after any large run.
        held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + max(held, 0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

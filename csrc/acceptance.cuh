// Steps 4-5 of a decoding step on the device, without host synchronisation:
//  * greedy acceptance (acceptance.greedy_accept): argmax of every node's logits, then per batch row the
//    longest retrieve path whose every child token equals its parent's argmax (first such path on ties),
//    the bonus token (argmax at the path's last node) and the emitted tokens;
//  * KV compaction (KVCache.compact): the accepted path's slots move to contiguous slots after the prefix,
//    for every layer and for K and V, in one launch.
#pragma once

#include <algorithm>

#include "common.cuh"

namespace amphista {

struct GreedyAcceptParams {
  const int64_t* tokens;    // [B, N]
  const void* logits;       // [B, N, V] rows of V contiguous, row stride logits_sr (elements)
  const int64_t* retrieve;  // [B or 1, P, D1], batch stride retrieve_sb (0: shared)
  int64_t* pred;            // [B, N] workspace: argmax of every node's logits
  int64_t* accept_len;      // [B]
  int64_t* best_path;       // [B]
  int64_t* accepted_nodes;  // [B, D1]
  int64_t* next_token;      // [B]
  int64_t* emitted;         // [B, D1]
  int64_t B, N, V, P, D1;
  int64_t logits_sr;
  int64_t retrieve_sb;
};

struct KVCompactParams {
  void* k_buf;              // [L, B_max, H, S, D] contiguous
  void* v_buf;
  const int64_t* src;       // [B, M] source slots (clamped to [0, S))
  const int64_t* dst_start; // [B]: slot src[b, m] -> dst_start[b] + m (clamped to [0, S))
  int64_t L, B_max, B, H, S, D, M;
  int64_t elem_size;        // 2 or 4 (a byte move: dtype-agnostic)
};

// Host entry points (acceptance.cu). Arguments are validated by the binding.
cudaError_t greedy_accept(const GreedyAcceptParams& p, DType logits_dtype, cudaStream_t stream);
cudaError_t kv_compact(const KVCompactParams& p, cudaStream_t stream);
// Shared memory the compaction block needs: every source row is staged before any write.
inline int64_t kv_compact_smem_bytes(int64_t M, int64_t D, int64_t elem_size) { return M * D * elem_size; }
constexpr int64_t kKVCompactMaxSmem = 48 * 1024;

#ifdef __CUDACC__
namespace accept {

constexpr int kArgmaxThreads = 256;

// torch.argmax's order: NaN beats everything (the first NaN wins), then the larger value, then the lower index.
__device__ __forceinline__ bool better(float a, int64_t ia, float b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

// One block per row of V logits; 16-byte loads when the row allows them.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kArgmaxThreads) argmax_rows_kernel(const T* __restrict__ logits, int64_t* __restrict__ out,
                                                                     int64_t V, int64_t row_stride) {
  constexpr int kN = kVec ? Vec16<T>::kN : 1;
  const T* row = logits + static_cast<int64_t>(blockIdx.x) * row_stride;
  float best = -INFINITY;
  int64_t best_i = V;  // sentinel: loses every comparison against a real index with a value > -inf
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kN; i < V; i += static_cast<int64_t>(blockDim.x) * kN) {
    float f[kN];
    if constexpr (kVec) load16(row + i, f); else f[0] = to_float(row[i]);
#pragma unroll
    for (int j = 0; j < kN; ++j)
      if (best_i == V || better(f[j], i + j, best, best_i)) best = f[j], best_i = i + j;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, off);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, best_i, off);
    if (oi != V && (best_i == V || better(ob, oi, best, best_i))) best = ob, best_i = oi;
  }
  __shared__ float wb[kArgmaxThreads / 32];
  __shared__ int64_t wi[kArgmaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) wb[warp] = best, wi[warp] = best_i;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w)
      if (wi[w] != V && (best_i == V || better(wb[w], wi[w], best, best_i))) best = wb[w], best_i = wi[w];
    out[blockIdx.x] = best_i;
  }
}

// One block per batch row: every thread walks some retrieve paths; the block keeps the longest (lowest row on
// ties), then writes the AcceptResult fields exactly as acceptance._finish builds them.
__global__ void greedy_accept_kernel(const GreedyAcceptParams p) {
  const int64_t b = blockIdx.x;
  const int64_t* tok = p.tokens + b * p.N;
  const int64_t* pred = p.pred + b * p.N;
  const int64_t* ret = p.retrieve + b * p.retrieve_sb;
  // Key = accepted length in the high bits, inverted path index in the low bits: the max key is the
  // longest path, and among equally long ones the first (as argmax over lens does).
  unsigned long long key = 0;
  for (int64_t path = threadIdx.x; path < p.P; path += blockDim.x) {
    const int64_t* r = ret + path * p.D1;
    int64_t len = 0;
    for (int64_t d = 1; d < p.D1; ++d) {
      const int64_t child = r[d], parent = r[d - 1];
      // A -1 (or out-of-range id) ends the path; a mismatch ends the accepted prefix (cumprod in the reference).
      if (child < 0 || child >= p.N || parent < 0 || parent >= p.N || tok[child] != pred[parent]) break;
      ++len;
    }
    const unsigned long long k = (static_cast<unsigned long long>(len) << 32) | (0xffffffffull - static_cast<unsigned long long>(path));
    key = k > key ? k : key;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, key, off);
    key = o > key ? o : key;
  }
  __shared__ unsigned long long warp_keys[32];
  __shared__ int64_t s_len, s_best, s_next;
  if ((threadIdx.x & 31) == 0) warp_keys[threadIdx.x >> 5] = key;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) key = warp_keys[w] > key ? warp_keys[w] : key;
    const int64_t len = static_cast<int64_t>(key >> 32);
    const int64_t best = static_cast<int64_t>(0xffffffffull - (key & 0xffffffffull));
    const int64_t last = ret[best * p.D1 + len];
    s_len = len, s_best = best;
    s_next = (last >= 0 && last < p.N) ? pred[last] : pred[0];
    p.accept_len[b] = len;
    p.best_path[b] = best;
    p.next_token[b] = s_next;
  }
  __syncthreads();
  const int64_t len = s_len;
  const int64_t* r = ret + s_best * p.D1;
  for (int64_t d = threadIdx.x; d < p.D1; d += blockDim.x) {
    p.accepted_nodes[b * p.D1 + d] = d <= len ? r[d] : -1;
    // Emitted: the token of accepted node d + 1, then the bonus token, then -1.
    p.emitted[b * p.D1 + d] = d < len ? tok[r[d + 1]] : (d == len ? s_next : -1);
  }
}

template <typename T>
cudaError_t launch_greedy(const GreedyAcceptParams& p, cudaStream_t stream) {
  constexpr int kN = Vec16<T>::kN;
  const bool vec = p.V % kN == 0 && p.logits_sr % kN == 0 && reinterpret_cast<uintptr_t>(p.logits) % 16 == 0;
  const auto* logits = static_cast<const T*>(p.logits);
  const unsigned rows = static_cast<unsigned>(p.B * p.N);
  if (vec)
    argmax_rows_kernel<T, true><<<rows, kArgmaxThreads, 0, stream>>>(logits, p.pred, p.V, p.logits_sr);
  else
    argmax_rows_kernel<T, false><<<rows, kArgmaxThreads, 0, stream>>>(logits, p.pred, p.V, p.logits_sr);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int threads = static_cast<int>(std::min<int64_t>(256, (std::max(p.P, p.D1) + 31) / 32 * 32));
  greedy_accept_kernel<<<static_cast<unsigned>(p.B), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---- KV compaction: one block per (layer, row, head) and per buffer (blockIdx.y: 0 = K, 1 = V) ----------
// Sources are staged in shared memory before any write, so moves whose source and destination ranges
// overlap (they always do: the accepted nodes sit right after the prefix) read the old values.
template <typename W>
__global__ void kv_compact_kernel(const KVCompactParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  W* stage = reinterpret_cast<W*>(smem_raw);
  const int64_t row_words = p.D * p.elem_size / static_cast<int64_t>(sizeof(W));
  int64_t rest = blockIdx.x;
  const int64_t h = rest % p.H;
  rest /= p.H;
  const int64_t b = rest % p.B, layer = rest / p.B;
  char* buf = static_cast<char*>(blockIdx.y == 0 ? p.k_buf : p.v_buf);
  W* head = reinterpret_cast<W*>(buf + ((layer * p.B_max + b) * p.H + h) * p.S * p.D * p.elem_size);
  const int64_t total = p.M * row_words;
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int64_t m = i / row_words, w = i % row_words;
    const int64_t slot = min(max(p.src[b * p.M + m], int64_t(0)), p.S - 1);
    stage[i] = head[slot * row_words + w];
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
    const int64_t m = i / row_words, w = i % row_words;
    const int64_t slot = min(max(p.dst_start[b] + m, int64_t(0)), p.S - 1);
    head[slot * row_words + w] = stage[i];
  }
}

}  // namespace accept
#endif  // __CUDACC__

}  // namespace amphista

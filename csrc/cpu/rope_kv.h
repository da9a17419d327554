// The cached attention's input (ops.qkv_rope_write) and the accepted path's KV compaction (ops.kv_compact).
//
// qkv_rope_write: RoPE on q and k of the fused QKV projection at explicit positions (the rope rows gathered at
// each token's position), k and v written to the cache at slots start[b] + t, q returned. The rotation is the
// reference's op for op (x1 * cos - x2 * sin in fp32, rounded once to the dtype), so results equal torch's.
// Slots outside [0, S) are dropped, as on the GPU backends.
#pragma once

#include "common.h"

namespace amphista_cpu {

struct QkvRopeWriteArgs {
  const void* qkv;        // [B, T, (H + 2 H_kv) D]: q | k | v heads, each row contiguous
  int64_t qkv_sb, qkv_st;
  const float* rope;      // [B or 1, T, D] fp32 (cos | sin halves), each row contiguous
  int64_t rope_sb, rope_st;  // rope_sb = 0: one set of rows for the whole batch
  void* k_layer;          // the layer's cache [B_max, H_kv, S, D], (slot, element) contiguous
  void* v_layer;
  int64_t cache_sb, cache_sh, S;
  const int64_t* start;   // [B]
  void* q;                // [B, T, H, D] contiguous
  int64_t B, T, H, H_kv, D;
};

template <class L>
AMPHISTA_INLINE void rotate(const typename L::T* x, const float* cos, const float* sin, typename L::T* out,
                            int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = L::load(x, j), x2 = L::load(x, j + half);
    const float a = x1 * cos[j], b = x2 * sin[j], c = x2 * cos[j], d = x1 * sin[j];
    L::store(out, j, a - b);
    L::store(out, j + half, c + d);
  }
}

template <class L>
AMPHISTA_INLINE void qkv_rope_write_rows(const QkvRopeWriteArgs& a, int64_t r0, int64_t r1) {
  using T = typename L::T;
  const int64_t half = a.D / 2;
  for (int64_t r = r0; r < r1; ++r) {  // r = b * T + t
    const int64_t b = r / a.T, t = r % a.T;
    const T* row = static_cast<const T*>(a.qkv) + b * a.qkv_sb + t * a.qkv_st;
    const float* cos = a.rope + b * a.rope_sb + t * a.rope_st;
    const float* sin = cos + half;
    T* q = static_cast<T*>(a.q) + r * a.H * a.D;
    for (int64_t h = 0; h < a.H; ++h) rotate<L>(row + h * a.D, cos, sin, q + h * a.D, half);
    const int64_t slot = a.start[b] + t;
    if (slot < 0 || slot >= a.S) continue;
    for (int64_t h = 0; h < a.H_kv; ++h) {
      const int64_t at = b * a.cache_sb + h * a.cache_sh + slot * a.D;
      rotate<L>(row + (a.H + h) * a.D, cos, sin, static_cast<T*>(a.k_layer) + at, half);
      std::memcpy(static_cast<T*>(a.v_layer) + at, row + (a.H + a.H_kv + h) * a.D, size_t(a.D) * sizeof(T));
    }
  }
}


AMPHISTA_ISA_VARIANTS(qkv_rope_write_f32, QkvRopeWriteArgs, qkv_rope_write_rows<F32>(a, r0, r1))
AMPHISTA_ISA_VARIANTS(qkv_rope_write_bf16, QkvRopeWriteArgs, qkv_rope_write_rows<BF16>(a, r0, r1))

inline void qkv_rope_write(const QkvRopeWriteArgs& a, DType dtype, int64_t threads) {
  parallel_rows(a.B * a.T, 3 * (a.H + 2 * a.H_kv) * a.D, threads, [&](int64_t r0, int64_t r1) {
    if (dtype == DType::kFloat32) qkv_rope_write_f32(a, r0, r1);
    else qkv_rope_write_bf16(a, r0, r1);
  });
}

struct KvCompactArgs {
  void* k;                // [L, B_max, H_kv, S, D] contiguous
  void* v;
  const int64_t* src;     // [B, M] slot ids
  const int64_t* dst_start;  // [B]
  int64_t L, B_max, H_kv, S, D, B, M, elem_size;
};

// Slot src[b, m] -> slot dst_start[b] + m for every layer and head, sources clamped to [0, S) and destinations
// to S - 1 as the reference does. Each (layer, row, head) gathers its M sources before writing any, so moves
// that overlap (a path's nodes sit right after its destination) are safe.
inline void kv_compact(const KvCompactArgs& a, int64_t threads) {
  const int64_t row_bytes = a.D * a.elem_size;
  const int64_t planes = 2 * a.L * a.B * a.H_kv;  // (K or V, layer, row, head)
  parallel_rows(planes, a.M * a.D, threads, [&](int64_t p0, int64_t p1) {
    std::vector<char> staged(size_t(a.M * row_bytes));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t h = p % a.H_kv, b = (p / a.H_kv) % a.B, l = (p / (a.H_kv * a.B)) % a.L;
      const int64_t kv = p / (a.H_kv * a.B * a.L);
      char* plane = static_cast<char*>(kv == 0 ? a.k : a.v) + (((l * a.B_max + b) * a.H_kv + h) * a.S) * row_bytes;
      for (int64_t m = 0; m < a.M; ++m) {
        const int64_t s = std::min(std::max<int64_t>(a.src[b * a.M + m], 0), a.S - 1);
        std::memcpy(staged.data() + m * row_bytes, plane + s * row_bytes, size_t(row_bytes));
      }
      for (int64_t m = 0; m < a.M; ++m) {
        const int64_t d = std::min(std::max<int64_t>(a.dst_start[b] + m, 0), a.S - 1);
        std::memcpy(plane + d * row_bytes, staged.data() + m * row_bytes, size_t(row_bytes));
      }
    }
  });
}

}  // namespace amphista_cpu

// Per-token ops around attention: residual add + RMSNorm, RoPE at explicit positions, KV-cache writes at
// explicit slots (ops.add_rmsnorm, ops.rope, ops.kv_write; plain RMSNorm lives in rmsnorm.cuh).
//
// Positions and slots come from device tensors (rope rows gathered at each token's position, start[b]), so
// the same launch serves prefill, decoding and tree verification (nodes at prefix + depth, in any order) and
// a CUDA graph replays it with no host work.
#pragma once

#include <algorithm>

#include "common.cuh"

namespace amphista {

struct RopeParams {
  const void* x;         // [B, T, H, D], element strides below, last dim contiguous
  const float* rope;     // [B or 1, T, D] fp32 rows: cos | sin halves (model.rope_table rows)
  void* out;             // [B, T, H, D] contiguous
  int64_t B, T, H, D;
  int64_t x_sb, x_st, x_sh;
  int64_t rope_sb;       // T * D, or 0 when one row set serves every batch row
};

struct KVWriteParams {
  void* k_buf;           // [L, B_max, H, S, D] contiguous (KVCache.k)
  void* v_buf;
  const int64_t* start;  // [B]: token t of row b goes to slot start[b] + t
  const void* k;         // [B, H, T, D], element strides below, last dim contiguous
  const void* v;
  int64_t layer, L, B_max, B, H, T, S, D;
  int64_t k_sb, k_sh, k_st;
  int64_t v_sb, v_sh, v_st;
  int64_t elem_size;     // 2 or 4: the op only moves bytes, so it is dtype-agnostic
};

// Host entry points (norm_rope_kv.cu). Arguments are validated by the binding; they return the launch status.
cudaError_t rope(const RopeParams& p, DType dtype, cudaStream_t stream);
cudaError_t kv_write(const KVWriteParams& p, cudaStream_t stream);
// s = x + residual (rounded to the dtype), y = RMSNorm(s) * w. x, s, y [rows, d]; residual [res_rows, d],
// row r adds residual row r % res_rows (res_rows = rows, or the T of [T, d] broadcast over a batch).
cudaError_t add_rmsnorm(const void* x, const void* residual, const void* w, void* s, void* y, int64_t rows,
                        int64_t res_rows, int64_t d, float eps, DType dtype, cudaStream_t stream);

#ifdef __CUDACC__
namespace nrk {

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- RoPE: one thread rotates kN pairs (x1[i], x2[i]) of one (b, t, h) -------------------------------------
template <typename T, bool kVec>
__global__ void rope_kernel(const RopeParams p) {
  constexpr int kN = kVec ? Vec16<T>::kN : 1;
  const int64_t half = p.D / 2, groups = half / kN;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * p.T * p.H * groups) return;
  const int64_t col = (i % groups) * kN;
  int64_t rest = i / groups;
  const int64_t h = rest % p.H;
  rest /= p.H;
  const int64_t t = rest % p.T, b = rest / p.T;
  const T* xr = static_cast<const T*>(p.x) + b * p.x_sb + t * p.x_st + h * p.x_sh;
  const float* rr = p.rope + b * p.rope_sb + t * p.D;
  T* outr = static_cast<T*>(p.out) + ((b * p.T + t) * p.H + h) * p.D;
  float x1[kN], x2[kN], c[kN], s[kN];
  if constexpr (kVec) {
    load16(xr + col, x1);
    load16(xr + half + col, x2);
#pragma unroll
    for (int j = 0; j < kN; j += 4) {  // the table is fp32: 4 per 16-byte load
      const float4 cv = *reinterpret_cast<const float4*>(rr + col + j);
      const float4 sv = *reinterpret_cast<const float4*>(rr + half + col + j);
      c[j] = cv.x, c[j + 1] = cv.y, c[j + 2] = cv.z, c[j + 3] = cv.w;
      s[j] = sv.x, s[j + 1] = sv.y, s[j + 2] = sv.z, s[j + 3] = sv.w;
    }
  } else {
    x1[0] = to_float(xr[col]), x2[0] = to_float(xr[half + col]);
    c[0] = rr[col], s[0] = rr[half + col];
  }
  float o1[kN], o2[kN];
#pragma unroll
  for (int j = 0; j < kN; ++j) {  // model.apply_rope: [x1 cos - x2 sin, x2 cos + x1 sin], in fp32
    o1[j] = x1[j] * c[j] - x2[j] * s[j];
    o2[j] = x2[j] * c[j] + x1[j] * s[j];
  }
  if constexpr (kVec) {
    store16(outr + col, o1);
    store16(outr + half + col, o2);
  } else {
    outr[col] = from_float<T>(o1[0]);
    outr[half + col] = from_float<T>(o2[0]);
  }
}

template <typename T>
cudaError_t launch_rope(const RopeParams& p, cudaStream_t stream) {
  constexpr int kN = Vec16<T>::kN;
  const int64_t half = p.D / 2;
  const bool vec = half % kN == 0 && half % 4 == 0 && p.x_sb % kN == 0 && p.x_st % kN == 0 && p.x_sh % kN == 0 &&
                   aligned16(p.x) && aligned16(p.rope) && aligned16(p.out);
  const int64_t total = p.B * p.T * p.H * (half / (vec ? kN : 1));
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(ceil_div(total, threads));
  if (vec)
    rope_kernel<T, true><<<blocks, threads, 0, stream>>>(p);
  else
    rope_kernel<T, false><<<blocks, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---- KV write: a strided copy into cache slots; W is the access width in bytes ----------------------------
template <int W> struct Word;
template <> struct Word<16> { using type = uint4; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<2> { using type = uint16_t; };

template <int W>
__global__ void kv_write_kernel(const KVWriteParams p) {
  using Vt = typename Word<W>::type;
  const int64_t row_words = p.D * p.elem_size / W;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.B * p.H * p.T * row_words) return;
  const int64_t w = i % row_words;
  int64_t rest = i / row_words;
  const int64_t t = rest % p.T;
  rest /= p.T;
  const int64_t h = rest % p.H, b = rest / p.H;
  const int64_t slot = p.start[b] + t;
  if (slot < 0 || slot >= p.S) return;  // the reference's scatter would fault; never write outside the row
  const int64_t dst = (((p.layer * p.B_max + b) * p.H + h) * p.S + slot) * p.D * p.elem_size + w * W;
  const int64_t ks = (b * p.k_sb + h * p.k_sh + t * p.k_st) * p.elem_size + w * W;
  const int64_t vs = (b * p.v_sb + h * p.v_sh + t * p.v_st) * p.elem_size + w * W;
  *reinterpret_cast<Vt*>(static_cast<char*>(p.k_buf) + dst) = *reinterpret_cast<const Vt*>(static_cast<const char*>(p.k) + ks);
  *reinterpret_cast<Vt*>(static_cast<char*>(p.v_buf) + dst) = *reinterpret_cast<const Vt*>(static_cast<const char*>(p.v) + vs);
}

// Widest access such that every address the copy touches is a multiple of it.
inline int copy_width(int64_t row_bytes, std::initializer_list<int64_t> byte_offsets,
                      std::initializer_list<const void*> ptrs) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = row_bytes % w == 0;
    for (int64_t o : byte_offsets) ok = ok && o % w == 0;
    for (const void* q : ptrs) ok = ok && reinterpret_cast<uintptr_t>(q) % w == 0;
    if (ok) return w;
  }
  return 0;
}

// ---- residual add + RMSNorm: one block per row ----------------------------------------------------------
template <typename T, bool kVec>
__global__ void add_rmsnorm_kernel(const T* x, const T* residual, const T* __restrict__ w, T* s, T* y, int64_t res_rows,
                                   int64_t d, float eps) {
  constexpr int kN = kVec ? Vec16<T>::kN : 1;
  const int64_t r = blockIdx.x;
  const T* xr = x + r * d;
  const T* rr = residual + (r % res_rows) * d;
  T* sr = s + r * d;
  T* yr = y + r * d;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kN;
  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x * kN; i < d; i += step) {
    float a[kN], c[kN];
    if constexpr (kVec) {
      load16(xr + i, a);
      load16(rr + i, c);
    } else {
      a[0] = to_float(xr[i]), c[0] = to_float(rr[i]);
    }
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      a[j] = to_float(from_float<T>(a[j] + c[j]));  // s is a tensor of the dtype: normalise the rounded sum
      sum_sq += a[j] * a[j];
    }
    if constexpr (kVec) store16(sr + i, a); else sr[i] = from_float<T>(a[0]);
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / static_cast<float>(d) + eps);
  for (int64_t i = threadIdx.x * kN; i < d; i += step) {  // reads back only what this thread wrote
    float a[kN], g[kN];
    if constexpr (kVec) {
      load16(sr + i, a);
      load16(w + i, g);
    } else {
      a[0] = to_float(sr[i]), g[0] = to_float(w[i]);
    }
#pragma unroll
    for (int j = 0; j < kN; ++j) a[j] = round_to<T>(a[j] * inv_rms) * g[j];  // rounded before w, as the reference
    if constexpr (kVec) store16(yr + i, a); else yr[i] = from_float<T>(a[0]);
  }
}

template <typename T>
cudaError_t launch_add_rmsnorm(const void* x, const void* residual, const void* w, void* s, void* y, int64_t rows,
                               int64_t res_rows, int64_t d, float eps, cudaStream_t stream) {
  constexpr int kN = Vec16<T>::kN;
  const bool vec = d % kN == 0 && aligned16(x) && aligned16(residual) && aligned16(w) && aligned16(s) && aligned16(y);
  const int64_t accesses = vec ? d / kN : d;
  const int threads = static_cast<int>(std::min<int64_t>(1024, (accesses + 31) / 32 * 32));
  const auto* xt = static_cast<const T*>(x);
  const auto* rt = static_cast<const T*>(residual);
  const auto* wt = static_cast<const T*>(w);
  if (vec)
    add_rmsnorm_kernel<T, true><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        xt, rt, wt, static_cast<T*>(s), static_cast<T*>(y), res_rows, d, eps);
  else
    add_rmsnorm_kernel<T, false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        xt, rt, wt, static_cast<T*>(s), static_cast<T*>(y), res_rows, d, eps);
  return cudaGetLastError();
}

}  // namespace nrk
#endif  // __CUDACC__

}  // namespace amphista

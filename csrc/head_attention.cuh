// The Auto-embedding Block's attention core (ops.head_attention after its RMSNorm and QKV projection):
// bi-directional, unmasked multi-head attention across the K head slots of each request.
//
// qkv [R, K, 3, n_heads, hd] contiguous (the nn.Linear output viewed per slot: q | k | v, heads
// concatenated), out [R, K, n_heads * hd] contiguous (heads concatenated, ready for the output projection).
// K <= 64 slots, hd <= 256. One block per request (row r), one warp per head at a time: a request's whole
// problem is K x K scores per head (K = 4 or 5 in practice), far too small to split across blocks, and one
// launch for the batch replaces SDPA's reshapes, its mask-free dispatch and the transposes around it.
// Each lane owns hd / 32 elements of a head; the online softmax runs over the K key slots in fp32.
#pragma once

#include "common.cuh"

namespace amphista {

constexpr int kHeadAttnMaxSlots = 64;
constexpr int kHeadAttnMaxHeadDim = 256;

// Host entry point (head_attention.cu). Arguments are validated by the binding.
cudaError_t head_attention(const void* qkv, void* out, int64_t rows, int64_t slots, int64_t n_heads,
                           int64_t head_dim, float scale, DType dtype, cudaStream_t stream);

#ifdef __CUDACC__
namespace head_attn {

constexpr int kWarps = 4;
constexpr int kPerLane = kHeadAttnMaxHeadDim / 32;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__global__ void __launch_bounds__(32 * kWarps) head_attention_kernel(const T* __restrict__ qkv, T* __restrict__ out,
                                                                   int slots, int n_heads, int hd, float scale) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t d = static_cast<int64_t>(n_heads) * hd;
  const T* base = qkv + static_cast<int64_t>(blockIdx.x) * slots * 3 * d;  // this request's [K, 3, d]
  T* obase = out + static_cast<int64_t>(blockIdx.x) * slots * d;
  const float scale_log2 = scale * kLog2e;

  for (int h = warp; h < n_heads; h += kWarps) {
    for (int i = 0; i < slots; ++i) {
      const T* q = base + static_cast<int64_t>(i) * 3 * d + static_cast<int64_t>(h) * hd;
      float qf[kPerLane], acc[kPerLane];
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int e = lane + 32 * u;
        qf[u] = e < hd ? to_float(q[e]) : 0.f;
        acc[u] = 0.f;
      }
      float m = -INFINITY, l = 0.f;
      for (int j = 0; j < slots; ++j) {
        const T* k = base + static_cast<int64_t>(j) * 3 * d + d + static_cast<int64_t>(h) * hd;
        const T* v = k + d;
        float s = 0.f;
#pragma unroll
        for (int u = 0; u < kPerLane; ++u) {
          const int e = lane + 32 * u;
          if (e < hd) s += qf[u] * to_float(k[e]);
        }
        s = warp_sum(s) * scale_log2;  // every lane holds the score
        const float m_new = fmaxf(m, s);
        const float alpha = exp2f(m - m_new);  // m = -inf on the first slot: alpha = 0
        const float pj = exp2f(s - m_new);
        l = l * alpha + pj;
#pragma unroll
        for (int u = 0; u < kPerLane; ++u) {
          const int e = lane + 32 * u;
          acc[u] = acc[u] * alpha + (e < hd ? pj * to_float(v[e]) : 0.f);
        }
        m = m_new;
      }
      const float inv = 1.f / l;  // l >= 1: the maximum slot contributes exp2(0)
      T* o = obase + static_cast<int64_t>(i) * d + static_cast<int64_t>(h) * hd;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int e = lane + 32 * u;
        if (e < hd) o[e] = from_float<T>(acc[u] * inv);
      }
    }
  }
}

template <typename T>
cudaError_t launch(const void* qkv, void* out, int64_t rows, int64_t slots, int64_t n_heads, int64_t hd, float scale,
                   cudaStream_t stream) {
  head_attention_kernel<T><<<static_cast<unsigned>(rows), 32 * kWarps, 0, stream>>>(
      static_cast<const T*>(qkv), static_cast<T*>(out), static_cast<int>(slots), static_cast<int>(n_heads),
      static_cast<int>(hd), scale);
  return cudaGetLastError();
}

}  // namespace head_attn
#endif  // __CUDACC__

}  // namespace amphista

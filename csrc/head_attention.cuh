// The Auto-embedding Block's attention core (ops.head_attention after its RMSNorm and QKV projection):
// bi-directional, unmasked multi-head attention across the K head slots of each request.
//
// qkv [R, K, 3, n_heads, hd] contiguous (the nn.Linear output viewed per slot: q | k | v, heads
// concatenated), out [R, K, n_heads * hd] contiguous (heads concatenated, ready for the output projection).
// K <= 64 slots, hd <= 256. One warp per (request, head, query slot): a request's whole problem is K x K scores
// per head (K = 4 or 5 in practice), so the cost is latency, not work. A block per request walking its heads
// in turn chained K * K dependent loads per head (88 us on the Llama-7B shape, H200, 2026-12-04b); here every
// warp issues the K and V rows of kSlotsAhead key slots before it uses any, and all warps run at once. Each
// lane owns hd / 32 elements (strided by 32: coalesced, any hd); the online softmax runs in fp32.
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
constexpr int kSlotsAhead = 4;  // key slots whose K and V rows a warp has in flight together
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int kPerLane>  // kPerLane = ceil(hd / 32), at most kHeadAttnMaxHeadDim / 32
__global__ void __launch_bounds__(32 * kWarps) head_attention_kernel(const T* __restrict__ qkv, T* __restrict__ out,
                                                                   int64_t rows, int slots, int n_heads, int hd,
                                                                   float scale) {
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);  // (request, head, slot)
  if (w >= rows * n_heads * slots) return;  // warp-uniform: the shuffles below see full warps
  const int i = static_cast<int>(w % slots);
  const int h = static_cast<int>((w / slots) % n_heads);
  const int64_t r = w / (static_cast<int64_t>(slots) * n_heads);
  const int64_t d = static_cast<int64_t>(n_heads) * hd;
  const T* base = qkv + r * slots * 3 * d + static_cast<int64_t>(h) * hd;  // head h's q of slot 0
  const float scale_log2 = scale * kLog2e;

  float qf[kPerLane], acc[kPerLane];
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int e = lane + 32 * u;
    qf[u] = e < hd ? to_float(base[static_cast<int64_t>(i) * 3 * d + e]) : 0.f;
    acc[u] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  for (int j0 = 0; j0 < slots; j0 += kSlotsAhead) {
    float kf[kSlotsAhead][kPerLane], vf[kSlotsAhead][kPerLane];
#pragma unroll
    for (int a = 0; a < kSlotsAhead; ++a) {
      const bool ok = j0 + a < slots;
      const T* k = base + static_cast<int64_t>(j0 + a) * 3 * d + d;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int e = lane + 32 * u;
        kf[a][u] = ok && e < hd ? to_float(k[e]) : 0.f;
        vf[a][u] = ok && e < hd ? to_float(k[d + e]) : 0.f;
      }
    }
#pragma unroll
    for (int a = 0; a < kSlotsAhead; ++a) {
      if (j0 + a >= slots) break;  // warp-uniform
      float s = 0.f;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) s += qf[u] * kf[a][u];
      s = warp_sum(s) * scale_log2;  // every lane holds the score
      const float m_new = fmaxf(m, s);
      const float alpha = exp2f(m - m_new);  // m = -inf on the first slot: alpha = 0
      const float pj = exp2f(s - m_new);
      l = l * alpha + pj;
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) acc[u] = acc[u] * alpha + pj * vf[a][u];
      m = m_new;
    }
  }
  const float inv = 1.f / l;  // l >= 1: the maximum slot contributes exp2(0)
  T* o = out + (r * slots + i) * d + static_cast<int64_t>(h) * hd;
#pragma unroll
  for (int u = 0; u < kPerLane; ++u) {
    const int e = lane + 32 * u;
    if (e < hd) o[e] = from_float<T>(acc[u] * inv);
  }
}

template <typename T>
cudaError_t launch(const void* qkv, void* out, int64_t rows, int64_t slots, int64_t n_heads, int64_t hd, float scale,
                   cudaStream_t stream) {
  const int64_t blocks = ceil_div(rows * n_heads * slots, kWarps);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const auto run = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
        static_cast<const T*>(qkv), static_cast<T*>(out), rows, static_cast<int>(slots), static_cast<int>(n_heads),
        static_cast<int>(hd), scale);
    return cudaGetLastError();
  };
  // Registers sized to the head: kf / vf hold kSlotsAhead * kPerLane floats each.
  if (hd <= 64) return run(head_attention_kernel<T, 2>);
  if (hd <= 128) return run(head_attention_kernel<T, 4>);
  return run(head_attention_kernel<T, kHeadAttnMaxHeadDim / 32>);
}

}  // namespace head_attn
#endif  // __CUDACC__

}  // namespace amphista

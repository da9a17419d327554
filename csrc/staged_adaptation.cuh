// Input of Amphista's Staged Adaptation Layers (ops.fused_sal_input): the fusion u = W_fuse [h ; E(x)]
// needs the row [h_t ; E(x_{t+1})] in W_fuse's dtype. This kernel builds it in one pass: it gathers the
// embedding row of each token and writes it next to the (cast) hidden state, replacing embedding lookup,
// two casts and a concatenation (four launches and three temporaries). The matmul that follows is cuBLAS's.
//
// hidden [M, d] (fp32/fp16/bf16, rows contiguous), tokens [M] int64, emb [V, d] in the output dtype,
// out [M, 2d] contiguous in the output dtype. A token outside [0, V) gives a zero embedding half (the torch
// reference would stop the device with an indexing assert).
#pragma once

#include "common.cuh"

namespace amphista {

// Host entry point (staged_adaptation.cu). Arguments are validated by the binding.
cudaError_t sal_concat(const void* hidden, DType hidden_dtype, const int64_t* tokens, const void* emb, void* out,
                       DType out_dtype, int64_t rows, int64_t d, int64_t vocab, cudaStream_t stream);

#ifdef __CUDACC__
namespace sal {

// One thread writes kN consecutive output elements (16 bytes when kVec). d % kN == 0 in the vector path,
// so a group never straddles the h | E(x) boundary.
template <typename Th, typename Tw, bool kVec>
__global__ void sal_concat_kernel(const Th* __restrict__ hidden, const int64_t* __restrict__ tokens,
                                  const Tw* __restrict__ emb, Tw* __restrict__ out, int64_t rows, int64_t d,
                                  int64_t vocab) {
  constexpr int kN = kVec ? Vec16<Tw>::kN : 1;
  const int64_t groups_per_row = 2 * d / kN;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * groups_per_row) return;
  const int64_t r = i / groups_per_row, col = (i % groups_per_row) * kN;
  float f[kN];
  if (col < d) {
    const Th* src = hidden + r * d + col;
#pragma unroll
    for (int j = 0; j < kN; ++j) f[j] = to_float(src[j]);  // coalesced across the warp; the store is the 16-byte op
  } else {
    const int64_t tok = tokens[r];
    if (tok >= 0 && tok < vocab) {
      const Tw* src = emb + tok * d + (col - d);
      if constexpr (kVec) {
        load16(src, f);
      } else {
        f[0] = to_float(src[0]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kN; ++j) f[j] = 0.f;
    }
  }
  if constexpr (kVec) {
    store16(out + r * 2 * d + col, f);
  } else {
    out[r * 2 * d + col] = from_float<Tw>(f[0]);
  }
}

template <typename Th, typename Tw>
cudaError_t launch(const void* hidden, const int64_t* tokens, const void* emb, void* out, int64_t rows, int64_t d,
                   int64_t vocab, cudaStream_t stream) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = d % 8 == 0 && aligned(emb) && aligned(out);
  const int threads = 256;
  const int64_t total = rows * 2 * d / (vec ? Vec16<Tw>::kN : 1);
  const unsigned blocks = static_cast<unsigned>(ceil_div(total, threads));
  if (vec)
    sal_concat_kernel<Th, Tw, true><<<blocks, threads, 0, stream>>>(
        static_cast<const Th*>(hidden), tokens, static_cast<const Tw*>(emb), static_cast<Tw*>(out), rows, d, vocab);
  else
    sal_concat_kernel<Th, Tw, false><<<blocks, threads, 0, stream>>>(
        static_cast<const Th*>(hidden), tokens, static_cast<const Tw*>(emb), static_cast<Tw*>(out), rows, d, vocab);
  return cudaGetLastError();
}

}  // namespace sal
#endif  // __CUDACC__

}  // namespace amphista

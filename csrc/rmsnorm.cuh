// Fused RMSNorm: out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w, rows contiguous of length d.
//
// fp32/fp16/bf16 in and out (x, w and out share one dtype), fp32 accumulation; the normalised row
// is rounded to the dtype before the weight scales it, as the reference (Llama's RMSNorm) does. One block per row: a row (d <= a few 10^4) fits comfortably in one SM's bandwidth
// share and the reduction stays in-block. out may be x itself (in place): each thread writes only
// elements it has already read, and every read of the sum-of-squares pass finishes before the
// block-wide reduction returns.
#pragma once

#include <algorithm>

#include "common.cuh"

namespace amphista {

// Host entry point (defined in rmsnorm.cu, plain C++ so bindings.cpp can call it).
// Arguments are assumed validated; returns the launch status.
cudaError_t rmsnorm(const void* x, const void* w, void* out, int64_t rows, int64_t d, float eps,
                    DType dtype, cudaStream_t stream);

#ifdef __CUDACC__
// kVec: 16-byte accesses; requires d % Vec16<T>::kN == 0 and 16-byte aligned x, w, out.
template <typename T, bool kVec>
__global__ void rmsnorm_kernel(const T* x, const T* __restrict__ w, T* out, int64_t d, float eps) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * d;  // 64-bit: rows * d can pass 2^31
  const T* xr = x + base;
  T* outr = out + base;
  constexpr int kN = kVec ? Vec16<T>::kN : 1;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kN;

  float sum_sq = 0.f;
  for (int64_t i = threadIdx.x * kN; i < d; i += step) {
    if constexpr (kVec) {
      float v[kN];
      load16(xr + i, v);
#pragma unroll
      for (int j = 0; j < kN; ++j) sum_sq += v[j] * v[j];
    } else {
      const float v = to_float(xr[i]);
      sum_sq += v * v;
    }
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / static_cast<float>(d) + eps);

  // Second pass re-reads x: the row was just touched, so it comes from L1/L2, and keeping it in
  // registers instead would cap d by the register file.
  for (int64_t i = threadIdx.x * kN; i < d; i += step) {
    if constexpr (kVec) {
      float v[kN], g[kN];
      load16(xr + i, v);
      load16(w + i, g);
#pragma unroll
      for (int j = 0; j < kN; ++j) v[j] = round_to<T>(v[j] * inv_rms) * g[j];
      store16(outr + i, v);
    } else {
      outr[i] = from_float<T>(round_to<T>(to_float(xr[i]) * inv_rms) * to_float(w[i]));
    }
  }
}

template <typename T>
cudaError_t launch_rmsnorm(const T* x, const T* w, T* out, int64_t rows, int64_t d, float eps,
                           cudaStream_t stream) {
  constexpr int kN = Vec16<T>::kN;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vec = d % kN == 0 && aligned(x) && aligned(w) && aligned(out);
  // One thread per access, rounded up to whole warps (block_sum needs that), at most 1024.
  const int64_t accesses = vec ? d / kN : d;
  const int threads = static_cast<int>(std::min<int64_t>(1024, (accesses + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(rows));  // rows <= INT32_MAX checked by the caller
  if (vec)
    rmsnorm_kernel<T, true><<<grid, threads, 0, stream>>>(x, w, out, d, eps);
  else
    rmsnorm_kernel<T, false><<<grid, threads, 0, stream>>>(x, w, out, d, eps);
  return cudaGetLastError();
}
#endif  // __CUDACC__

}  // namespace amphista

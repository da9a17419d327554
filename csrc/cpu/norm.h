// RMSNorm, optionally fused with the residual add before it (ops.rmsnorm, ops.add_rmsnorm).
//
// Rounding as the torch reference (kernels/reference.py): s = x + residual rounded to the dtype; the norm in
// fp32, s * rsqrt(mean(s^2) + eps), rounded to the dtype, then times w, rounded again. fp32 differs from
// torch's F.rms_norm only in the order of the sum of squares.
#pragma once

#include <cmath>

#include "common.h"

namespace amphista_cpu {

struct NormArgs {
  const void* x;         // [rows, d] contiguous
  const void* residual;  // [rows, d] contiguous, or nullptr: plain RMSNorm
  const void* w;         // [d]
  void* sum;             // [rows, d]: x + residual (unused without residual)
  void* out;             // [rows, d]
  int64_t rows, d;
  float eps;
};

// One row: out = round(s * rsqrt(mean(s^2) + eps)) * w. out may be s (in place: each element is read before
// it is written).
template <class L>
AMPHISTA_INLINE void norm_one(const typename L::T* s, const typename L::T* w, typename L::T* out, int64_t d,
                              float eps) {
  float part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      const float v = L::load(s, j + k);
      part[k] += v * v;
    }
  for (int64_t k = 0; j + k < d; ++k) {
    const float v = L::load(s, j + k);
    part[k] += v * v;
  }
  float total = 0.f;
  for (int64_t k = 0; k < kLanes; ++k) total += part[k];
  const float inv = 1.f / std::sqrt(total / float(d) + eps);
  for (int64_t k = 0; k < d; ++k) L::store(out, k, L::round(L::load(s, k) * inv) * L::load(w, k));
}

template <class L>
AMPHISTA_INLINE void norm_rows(const NormArgs& a, int64_t r0, int64_t r1) {
  using T = typename L::T;
  const T* w = static_cast<const T*>(a.w);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.d;
    T* out = static_cast<T*>(a.out) + r * a.d;
    const T* s = x;
    if (a.residual != nullptr) {
      const T* res = static_cast<const T*>(a.residual) + r * a.d;
      T* sum = static_cast<T*>(a.sum) + r * a.d;
      for (int64_t j = 0; j < a.d; ++j) L::store(sum, j, L::load(x, j) + L::load(res, j));
      s = sum;
    }
    norm_one<L>(s, w, out, a.d, a.eps);
  }
}

AMPHISTA_ISA_VARIANTS(norm_rows_f32, NormArgs, norm_rows<F32>(a, r0, r1))
AMPHISTA_ISA_VARIANTS(norm_rows_bf16, NormArgs, norm_rows<BF16>(a, r0, r1))

inline void rmsnorm(const NormArgs& a, DType dtype, int64_t threads) {
  parallel_rows(a.rows, 3 * a.d, threads, [&](int64_t r0, int64_t r1) {
    if (dtype == DType::kFloat32) norm_rows_f32(a, r0, r1);
    else norm_rows_bf16(a, r0, r1);
  });
}

}  // namespace amphista_cpu

// Shared pieces of the CPU kernels (amphista_engine._cpu): element types, vector-unit variants, row threading.
//
// Why these kernels exist: on a CPU a decode step's small ops (norms, RoPE, cache writes, compaction) are
// each several torch ops of ~3-6 us dispatch overhead over a few kilobytes of data; one C++ call does the work
// of each in about the overhead of one. Matmuls stay with torch (oneDNN, the int4 kernel).
//
// Every kernel computes each row on its own, with a fixed summation order, so a token's result is the same
// bits whatever else is in the call (a plain step or any tree): what speculative == plain greedy rests on.
// Built without -ffast-math and with -ffp-contract=off for the same reason: the compiler may vectorise
// element-wise loops, never reorder a sum.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "thread_pool.h"

#define AMPHISTA_INLINE inline __attribute__((always_inline))

// One copy of each hot loop per vector unit, picked once at run time: the module is built without -march and
// still uses AVX-512 or AVX2 where the CPU has them. (GCC's target_clones picks "arch=" clones by CPU
// model, not by feature, so an AMD CPU would get the baseline; hence this small dispatch.)
#if defined(__x86_64__) && defined(__GNUC__)
#define AMPHISTA_X86 1
#define AMPHISTA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi2")))
#define AMPHISTA_TARGET_AVX2 __attribute__((target("avx2,fma,bmi2")))
#else
#define AMPHISTA_X86 0
#define AMPHISTA_TARGET_AVX512
#define AMPHISTA_TARGET_AVX2
#endif

namespace amphista_cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
#if AMPHISTA_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

// The variant every kernel runs: the best this CPU has, or a lower one set by use_isa (tests check that every
// variant gives the same bits: they run the same operations in the same order, only wider).
inline Isa& chosen_isa() {
  static Isa chosen = detect_isa();
  return chosen;
}

inline Isa isa() { return chosen_isa(); }

inline bool use_isa(Isa wanted) {
  if (int(wanted) > int(detect_isa())) return false;
  chosen_isa() = wanted;
  return true;
}

inline const char* isa_name() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// name(const Args&, r0, r1) running `call` (which sees a, r0, r1) in the variant for this CPU's vector unit.
#define AMPHISTA_ISA_VARIANTS(name, Args, call)                                                          \
  AMPHISTA_TARGET_AVX512 inline void name##_avx512(const Args& a, int64_t r0, int64_t r1) { call; }      \
  AMPHISTA_TARGET_AVX2 inline void name##_avx2(const Args& a, int64_t r0, int64_t r1) { call; }          \
  inline void name##_baseline(const Args& a, int64_t r0, int64_t r1) { call; }                           \
  inline void name(const Args& a, int64_t r0, int64_t r1) {                                             \
    switch (isa()) {                                                                                    \
      case Isa::kAvx512: name##_avx512(a, r0, r1); break;                                               \
      case Isa::kAvx2: name##_avx2(a, r0, r1); break;                                                   \
      default: name##_baseline(a, r0, r1);                                                              \
    }                                                                                                   \
  }

// Element type codes. Must match DTYPE_CODES in amphista_engine/_ext.py (the CUDA module's codes).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

AMPHISTA_INLINE float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch's .to(torch.bfloat16); NaN stays NaN (quiet).
AMPHISTA_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);  // a select, so loops vectorise
}

// Storage type T, loaded to and stored from fp32. round() is what a store then load does to a value: torch
// rounds every op's output to the tensor dtype, and the kernels round at the same points.
struct F32 {
  using T = float;
  static AMPHISTA_INLINE float load(const T* p, int64_t i) { return p[i]; }
  static AMPHISTA_INLINE void store(T* p, int64_t i, float v) { p[i] = v; }
  static AMPHISTA_INLINE float round(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  static AMPHISTA_INLINE float load(const T* p, int64_t i) { return bf16_to_float(p[i]); }
  static AMPHISTA_INLINE void store(T* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
  static AMPHISTA_INLINE float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};

// exp(x) without a library call or a branch, so that the loops around it vectorise: Cody-Waite range reduction
// and a degree-6 polynomial (Cephes expf's coefficients), ~1-2 ulp over the clamped range (callers never pass
// a masked score: below -87.3 it returns ~1e-38, not 0). n = round(x / ln 2) by the 1.5 * 2^23 trick.
AMPHISTA_INLINE float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// Sums in a fixed order that still vectorises: 16 running partial sums (element i into partial i % 16), then a
// pairwise tree over the partials. The same inputs in the same order give the same bits in every variant.
constexpr int64_t kLanes = 16;

AMPHISTA_INLINE float reduce_lanes(float* part) {
  for (int64_t k = 0; k < 8; ++k) part[k] += part[k + 8];
  for (int64_t k = 0; k < 4; ++k) part[k] += part[k + 4];
  for (int64_t k = 0; k < 2; ++k) part[k] += part[k + 2];
  return part[0] + part[1];
}

// A multiply then an add, each rounded (no FMA: -ffp-contract=off, and explicit fmaf measured 2x slower here).
AMPHISTA_INLINE float dot(const float* a, const float* b, int64_t n) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) part[k] += a[i + k] * b[i + k];
  for (int64_t k = 0; i + k < n; ++k) part[k] += a[i + k] * b[i + k];
  return reduce_lanes(part);
}

// Who runs parallel_for's threads. kOpenMP: OpenMP's; the module links libgomp.so.1 by soname, which is the copy
// torch's CPU wheels load first, so these kernels and torch's ops share one pool of threads (two spinning pools
// fight over the cores). kOwn: thread_pool.h, which never waits for a descheduled worker, for steps whose every
// big op is one of these kernels while torch's ops run on one thread (kernels/cpu_threads.py switches to it
// around such steps). A process-wide setting, as the threads are.
enum class PoolKind : int { kOpenMP = 0, kOwn = 1 };

inline std::atomic<int>& chosen_pool() {
  static std::atomic<int> chosen{int(PoolKind::kOpenMP)};
  return chosen;
}

// fn(u0, u1) over [0, units) in contiguous ranges, on up to `threads` threads with at least min_units units each
// (units are independent: the split never changes a result). Without OpenMP, kOpenMP runs on the calling thread.
template <class Fn>
void parallel_for(int64_t units, int64_t min_units, int64_t threads, Fn fn) {
  const int64_t n = std::min({threads, units / std::max<int64_t>(min_units, 1), int64_t(256)});
  if (n <= 1) {
    fn(int64_t(0), units);
    return;
  }
  if (chosen_pool().load(std::memory_order_relaxed) == int(PoolKind::kOwn)) {
    ThreadPool::instance().run(units, n, fn);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(int(n))
  {
    const int64_t team = omp_get_num_threads(), t = omp_get_thread_num();  // the team may be smaller than n
    const int64_t chunk = (units + team - 1) / team;
    const int64_t u0 = t * chunk, u1 = std::min(units, u0 + chunk);
    if (u0 < u1) fn(u0, u1);
  }
#else
  fn(int64_t(0), units);
#endif
}

// parallel_for by rows of a given cost: threads only once each gets ~64K element-ops (a few microseconds).
template <class Fn>
void parallel_rows(int64_t rows, int64_t work_per_row, int64_t threads, Fn fn) {
  constexpr int64_t kMinWork = int64_t(1) << 16;
  parallel_for(rows, (kMinWork + work_per_row - 1) / std::max<int64_t>(work_per_row, 1), threads, fn);
}

}  // namespace amphista_cpu

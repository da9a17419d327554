// Shared pieces of the CPU kernels (amphista_engine._cpu): element types, vector-unit clones, row threading.
//
// Why these kernels exist: on a CPU a decode step's small ops (norms, RoPE, cache writes, compaction) are
// each several torch ops of ~3-6 us dispatch overhead over a few kilobytes of data; one C++ call does the work
// of each in about the overhead of one. Matmuls and attention stay with torch (oneDNN, the int4 kernel, flash).
//
// Every kernel computes each row on its own, with a fixed summation order, so a token's result is the same
// bits whatever else is in the call (a plain step or any tree): what speculative == plain greedy rests on.
// Built without -ffast-math and with -ffp-contract=off for the same reason: the compiler may vectorise
// element-wise loops, never reorder a sum.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

// One copy of a hot loop per vector unit, picked at load time (GCC function multiversioning): the module is
// built once, without -march, and still uses AVX2 / AVX-512 where the CPU has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define AMPHISTA_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AMPHISTA_CPU_CLONES
#endif
#define AMPHISTA_INLINE inline __attribute__((always_inline))

namespace amphista_cpu {

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

// fn(r0, r1) over row ranges: one thread for small work (thread start-up costs more than the rows), up to
// `threads` for big calls such as a prefill. Rows are independent, so the split never changes a result.
template <class Fn>
void parallel_rows(int64_t rows, int64_t work_per_row, int64_t threads, Fn fn) {
  // Starting a thread costs ~50-100 us on a small VM: only calls of about a millisecond or more are split.
  constexpr int64_t kMinWork = int64_t(1) << 21;  // work units (about element-ops) per thread
  const int64_t by_work = std::max<int64_t>(1, rows * work_per_row / kMinWork);
  const int64_t n = std::min({threads, rows, by_work});
  if (n <= 1) {
    fn(int64_t(0), rows);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(size_t(n - 1));
  const int64_t chunk = (rows + n - 1) / n;
  for (int64_t t = 1; t < n; ++t) {
    const int64_t r0 = t * chunk, r1 = std::min(rows, r0 + chunk);
    if (r0 < r1) pool.emplace_back(fn, r0, r1);
  }
  fn(int64_t(0), std::min(rows, chunk));
  for (auto& th : pool) th.join();
}

}  // namespace amphista_cpu

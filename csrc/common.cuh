// Shared pieces of every kernel: dtype codes, CUDA error checks, 16-byte vector access, reductions.
//
// The top half is plain C++ so that bindings.cpp (built by the host compiler, never by nvcc) can
// include it; everything that needs nvcc sits under __CUDACC__.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// Helpers callable from host and device code (bindings.cpp is compiled by the host compiler only).
#ifdef __CUDACC__
#define AMPHISTA_HD __host__ __device__
#else
#define AMPHISTA_HD
#endif

namespace amphista {

// Element type codes. Must match DTYPE_CODES in amphista_engine/_ext.py.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool dtype_known(int64_t code) { return code >= 0 && code <= 2; }

inline int64_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

AMPHISTA_HD inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error at ") + file + ":" + std::to_string(line) + ": " +
                           cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") from `" + expr + "`");
}

}  // namespace amphista

// Host-side only: throws std::runtime_error (pybind11 turns it into a Python RuntimeError).
#define AMPHISTA_CUDA_CHECK(expr)                                                 \
  do {                                                                            \
    const cudaError_t amphista_err_ = (expr);                                     \
    if (amphista_err_ != cudaSuccess)                                             \
      ::amphista::throw_cuda_error(amphista_err_, #expr, __FILE__, __LINE__);     \
  } while (0)

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace amphista {

// Scalar conversions; all arithmetic happens in fp32.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
// v rounded to T and back: where the reference holds an intermediate as a tensor of the dtype
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// Elements per 16-byte access: 4 fp32 or 8 fp16/bf16. One 128-bit load per thread is what
// saturates memory bandwidth; the pointer must be 16-byte aligned (callers check).
template <typename T> struct Vec16 { static constexpr int kN = 16 / sizeof(T); };

// Two 16-bit values packed in one 32-bit word <-> two floats.
__device__ __forceinline__ float2 unpack2(uint32_t w, __half) {
  __half2 h; *reinterpret_cast<uint32_t*>(&h) = w; return __half22float2(h);
}
__device__ __forceinline__ float2 unpack2(uint32_t w, __nv_bfloat16) {
  __nv_bfloat162 h; *reinterpret_cast<uint32_t*>(&h) = w; return __bfloat1622float2(h);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __half) {
  __half2 h = __floats2half2_rn(a, b); return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b); return *reinterpret_cast<uint32_t*>(&h);
}

// Load 16 bytes at p (16-byte aligned) and widen to Vec16<T>::kN floats.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&f)[Vec16<T>::kN]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) { const float2 t = unpack2(w[i], T{}); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
  }
}

// Round Vec16<T>::kN floats to T and store them as one 16-byte write at p (16-byte aligned).
template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&f)[Vec16<T>::kN]) {
  uint32_t w[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(f[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = pack2(f[2 * i], f[2 * i + 1], T{});
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Asynchronous 16-byte global -> shared copies (sm_80+): no registers hold the data in flight, so a block can
// have a whole tile outstanding. pred = false zero-fills the 16 bytes and reads nothing (src-size 0); gmem
// must still be a valid address. Groups: commit after issuing, wait<n> = all but the newest n groups landed
// in this thread's view (a __syncthreads() then publishes them to the block).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(pred ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the whole block, returned to every thread. blockDim.x must be a multiple of 32 and
// every thread must call it (full-mask shuffles, __syncthreads).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

}  // namespace amphista
#endif  // __CUDACC__

// Instantiates the RMSNorm kernels (one translation unit per op keeps rebuilds small).
#include "rmsnorm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace amphista {

cudaError_t rmsnorm(const void* x, const void* w, void* out, int64_t rows, int64_t d, float eps,
                    DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_rmsnorm(static_cast<const float*>(x), static_cast<const float*>(w),
                            static_cast<float*>(out), rows, d, eps, stream);
    case DType::kFloat16:
      return launch_rmsnorm(static_cast<const __half*>(x), static_cast<const __half*>(w),
                            static_cast<__half*>(out), rows, d, eps, stream);
    case DType::kBFloat16:
      return launch_rmsnorm(static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(w),
                            static_cast<__nv_bfloat16*>(out), rows, d, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace amphista

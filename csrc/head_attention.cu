// Instantiates the AEB head-attention kernel for fp32, fp16 and bf16.
#include "head_attention.cuh"

namespace amphista {

cudaError_t head_attention(const void* qkv, void* out, int64_t rows, int64_t slots, int64_t n_heads,
                           int64_t head_dim, float scale, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return head_attn::launch<float>(qkv, out, rows, slots, n_heads, head_dim, scale, stream);
    case DType::kFloat16: return head_attn::launch<__half>(qkv, out, rows, slots, n_heads, head_dim, scale, stream);
    case DType::kBFloat16:
      return head_attn::launch<__nv_bfloat16>(qkv, out, rows, slots, n_heads, head_dim, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace amphista

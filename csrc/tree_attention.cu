// Instantiates the tree-attention kernels: {fp16, bf16} x head dim {64, 128}.
#include "tree_attention.cuh"

namespace amphista {

cudaError_t tree_attention(const TreeAttentionParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kFloat16) {
    if (p.D == 64) return tree_attn::launch<__half, 64>(p, stream);
    if (p.D == 128) return tree_attn::launch<__half, 128>(p, stream);
  } else if (dtype == DType::kBFloat16) {
    if (p.D == 64) return tree_attn::launch<__nv_bfloat16, 64>(p, stream);
    if (p.D == 128) return tree_attn::launch<__nv_bfloat16, 128>(p, stream);
  }
  return cudaErrorInvalidValue;  // the binding rejects these before we get here
}

}  // namespace amphista

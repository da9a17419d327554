// Instantiates the SAL input kernel: hidden {fp32, fp16, bf16} x output {fp32, fp16, bf16}.
#include "staged_adaptation.cuh"

namespace amphista {

namespace {
template <typename Tw>
cudaError_t by_hidden(const void* hidden, DType hidden_dtype, const int64_t* tokens, const void* emb, void* out,
                      int64_t rows, int64_t d, int64_t vocab, cudaStream_t stream) {
  switch (hidden_dtype) {
    case DType::kFloat32: return sal::launch<float, Tw>(hidden, tokens, emb, out, rows, d, vocab, stream);
    case DType::kFloat16: return sal::launch<__half, Tw>(hidden, tokens, emb, out, rows, d, vocab, stream);
    case DType::kBFloat16: return sal::launch<__nv_bfloat16, Tw>(hidden, tokens, emb, out, rows, d, vocab, stream);
  }
  return cudaErrorInvalidValue;
}
}  // namespace

cudaError_t sal_concat(const void* hidden, DType hidden_dtype, const int64_t* tokens, const void* emb, void* out,
                       DType out_dtype, int64_t rows, int64_t d, int64_t vocab, cudaStream_t stream) {
  switch (out_dtype) {
    case DType::kFloat32: return by_hidden<float>(hidden, hidden_dtype, tokens, emb, out, rows, d, vocab, stream);
    case DType::kFloat16: return by_hidden<__half>(hidden, hidden_dtype, tokens, emb, out, rows, d, vocab, stream);
    case DType::kBFloat16:
      return by_hidden<__nv_bfloat16>(hidden, hidden_dtype, tokens, emb, out, rows, d, vocab, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace amphista

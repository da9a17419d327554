// Instantiates RoPE and residual-add RMSNorm for fp32/fp16/bf16, and the byte-moving KV write.
#include "norm_rope_kv.cuh"

namespace amphista {

cudaError_t rope(const RopeParams& p, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return nrk::launch_rope<float>(p, stream);
    case DType::kFloat16: return nrk::launch_rope<__half>(p, stream);
    case DType::kBFloat16: return nrk::launch_rope<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t kv_write(const KVWriteParams& p, cudaStream_t stream) {
  const int64_t e = p.elem_size;
  const int w = nrk::copy_width(p.D * e, {p.k_sb * e, p.k_sh * e, p.k_st * e, p.v_sb * e, p.v_sh * e, p.v_st * e},
                                {p.k_buf, p.v_buf, p.k, p.v});
  const int64_t total = p.B * p.H * p.T * (w ? p.D * e / w : 0);
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(ceil_div(total, threads));
  switch (w) {
    case 16: nrk::kv_write_kernel<16><<<blocks, threads, 0, stream>>>(p); break;
    case 8: nrk::kv_write_kernel<8><<<blocks, threads, 0, stream>>>(p); break;
    case 4: nrk::kv_write_kernel<4><<<blocks, threads, 0, stream>>>(p); break;
    case 2: nrk::kv_write_kernel<2><<<blocks, threads, 0, stream>>>(p); break;
    default: return cudaErrorMisalignedAddress;  // the binding checks element alignment, so unreachable
  }
  return cudaGetLastError();
}

cudaError_t add_rmsnorm(const void* x, const void* residual, const void* w, void* s, void* y, int64_t rows,
                        int64_t res_rows, int64_t d, float eps, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return nrk::launch_add_rmsnorm<float>(x, residual, w, s, y, rows, res_rows, d, eps, stream);
    case DType::kFloat16: return nrk::launch_add_rmsnorm<__half>(x, residual, w, s, y, rows, res_rows, d, eps, stream);
    case DType::kBFloat16:
      return nrk::launch_add_rmsnorm<__nv_bfloat16>(x, residual, w, s, y, rows, res_rows, d, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace amphista

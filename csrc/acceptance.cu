// Instantiates greedy acceptance for fp32/fp16/bf16 logits and the byte-moving KV compaction.
#include "acceptance.cuh"

namespace amphista {

cudaError_t greedy_accept(const GreedyAcceptParams& p, DType logits_dtype, cudaStream_t stream) {
  switch (logits_dtype) {
    case DType::kFloat32: return accept::launch_greedy<float>(p, stream);
    case DType::kFloat16: return accept::launch_greedy<__half>(p, stream);
    case DType::kBFloat16: return accept::launch_greedy<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

namespace {
template <typename W>
cudaError_t launch_compact(const KVCompactParams& p, cudaStream_t stream) {
  const int64_t words = p.M * p.D * p.elem_size / static_cast<int64_t>(sizeof(W));
  const int threads = static_cast<int>(std::min<int64_t>(256, (words + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(p.L * p.B * p.H), 2);
  const size_t smem = static_cast<size_t>(kv_compact_smem_bytes(p.M, p.D, p.elem_size));
  accept::kv_compact_kernel<W><<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}
}  // namespace

cudaError_t kv_compact(const KVCompactParams& p, cudaStream_t stream) {
  const int64_t row_bytes = p.D * p.elem_size;
  const auto fits = [&](int64_t w) {
    return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(p.k_buf) % w == 0 &&
           reinterpret_cast<uintptr_t>(p.v_buf) % w == 0;
  };
  if (fits(16)) return launch_compact<uint4>(p, stream);
  if (fits(8)) return launch_compact<uint2>(p, stream);
  if (fits(4)) return launch_compact<uint32_t>(p, stream);
  if (fits(2)) return launch_compact<uint16_t>(p, stream);
  return cudaErrorMisalignedAddress;  // the binding checks element alignment, so unreachable
}

}  // namespace amphista

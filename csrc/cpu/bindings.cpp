// Thin pybind11 module amphista_engine._cpu: the CPU kernels of csrc/cpu/*.h. Like the CUDA module it never
// links libtorch: tensors cross as addresses (tensor.data_ptr()), sizes, element strides and a dtype code, so
// one build serves any torch. The typed wrappers that check tensors and decline what a kernel cannot take are
// amphista_engine/kernels/cpu_ops.py; here every scalar is checked again, so a wrong call raises a ValueError
// naming the argument instead of reading or writing out of bounds.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "acceptance.h"
#include "common.h"
#include "decoder.h"
#include "norm.h"
#include "quant_matmul.h"
#include "rope_kv.h"
#include "tree_attention.h"
#include "tree_build.h"

namespace py = pybind11;
using namespace amphista_cpu;

namespace {

[[noreturn]] void bad_arg(const char* name, const std::string& why) {
  throw py::value_error(std::string("amphista_engine._cpu: argument '") + name + "' " + why);
}

void* ptr(int64_t address, const char* name) {
  if (address == 0) bad_arg(name, "is a null address");
  return reinterpret_cast<void*>(static_cast<uintptr_t>(address));
}

int64_t size(int64_t v, const char* name) {
  if (v <= 0) bad_arg(name, "must be positive, got " + std::to_string(v));
  if (v > (int64_t(1) << 40)) bad_arg(name, "is implausibly large: " + std::to_string(v));
  return v;
}

int64_t stride(int64_t v, const char* name) {
  if (v < 0 || v > (int64_t(1) << 40)) bad_arg(name, "must be a non-negative element stride, got " + std::to_string(v));
  return v;
}

// The kernels are instantiated for fp32 and bf16 (the CPU's decode dtypes); fp16 stays with torch.
DType float_dtype(int64_t code, const char* name) {
  if (code != int64_t(DType::kFloat32) && code != int64_t(DType::kBFloat16))
    bad_arg(name, "must be 0 (float32) or 2 (bfloat16), got " + std::to_string(code));
  return static_cast<DType>(code);
}

int64_t threads(int64_t n) { return size(n, "threads"); }

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "amphista-engine CPU kernels (csrc/cpu); call through amphista_engine.kernels.ops";

  m.def("isa", []() { return std::string(isa_name()); }, "the vector-unit variant the kernels run: avx512, avx2, baseline");
  m.def("set_pool", [](const std::string& name) {
    if (name != "own" && name != "omp") bad_arg("name", "must be own or omp, got " + name);
    const int was = chosen_pool().exchange(int(name == "own" ? PoolKind::kOwn : PoolKind::kOpenMP));
    return std::string(was == int(PoolKind::kOwn) ? "own" : "omp");
  }, py::arg("name"), "the threads parallel kernels run on: own (csrc/cpu/thread_pool.h) or omp; returns the previous");
  m.def("pool_workers", []() { return ThreadPool::instance().workers(); },
        "worker threads the own pool has started in this process (the caller is not one)");
  m.def("use_isa", [](const std::string& name) {
    const Isa wanted = name == "avx512" ? Isa::kAvx512 : name == "avx2" ? Isa::kAvx2 : name == "baseline" ? Isa::kBaseline
                                                                                                       : Isa(-1);
    if (int(wanted) < 0) bad_arg("name", "must be avx512, avx2 or baseline, got " + name);
    if (!use_isa(wanted)) bad_arg("name", "asks for " + name + ", which this CPU does not have");
  }, py::arg("name"), "run the kernels' variant for `name` (at most what this CPU has; for tests)");

  m.def("rmsnorm", [](int64_t x, int64_t residual, int64_t w, int64_t sum, int64_t out, int64_t rows, int64_t d,
                      double eps, int64_t dtype, int64_t nthreads) {
    const DType dt = float_dtype(dtype, "dtype");
    if (!(eps >= 0.0)) bad_arg("eps", "must be >= 0");
    NormArgs a{ptr(x, "x"), residual ? ptr(residual, "residual") : nullptr, ptr(w, "w"),
               residual ? ptr(sum, "sum") : nullptr, ptr(out, "out"), size(rows, "rows"), size(d, "d"), float(eps)};
    py::gil_scoped_release unlocked;
    rmsnorm(a, dt, threads(nthreads));
  }, py::arg("x"), py::arg("residual"), py::arg("w"), py::arg("sum"), py::arg("out"), py::arg("rows"), py::arg("d"),
     py::arg("eps"), py::arg("dtype"), py::arg("threads"),
     "out = RMSNorm(s) * w with s = x + residual written to sum (residual 0: s = x) over [rows, d] rows");

  m.def("qkv_rope_write", [](int64_t qkv, int64_t qkv_sb, int64_t qkv_st, int64_t rope, int64_t rope_sb,
                             int64_t rope_st, int64_t k_layer, int64_t v_layer, int64_t cache_sb, int64_t cache_sh,
                             int64_t S, int64_t start, int64_t q, int64_t B, int64_t T, int64_t H, int64_t H_kv,
                             int64_t D, int64_t dtype, int64_t nthreads) {
    const DType dt = float_dtype(dtype, "dtype");
    QkvRopeWriteArgs a{ptr(qkv, "qkv"), stride(qkv_sb, "qkv_sb"), stride(qkv_st, "qkv_st"),
                       static_cast<const float*>(ptr(rope, "rope")), stride(rope_sb, "rope_sb"),
                       stride(rope_st, "rope_st"), ptr(k_layer, "k_layer"), ptr(v_layer, "v_layer"),
                       stride(cache_sb, "cache_sb"), stride(cache_sh, "cache_sh"), size(S, "S"),
                       static_cast<const int64_t*>(ptr(start, "start")), ptr(q, "q"), size(B, "B"), size(T, "T"),
                       size(H, "H"), size(H_kv, "H_kv"), size(D, "D")};
    if (a.D % 2) bad_arg("D", "must be even (RoPE rotates halves)");
    if (a.H % a.H_kv) bad_arg("H", "must be a multiple of H_kv");
    if (a.qkv_st < (a.H + 2 * a.H_kv) * a.D) bad_arg("qkv_st", "is shorter than a (H + 2 H_kv) D row");
    if (a.cache_sh < a.S * a.D) bad_arg("cache_sh", "is shorter than S * D");
    py::gil_scoped_release unlocked;
    qkv_rope_write(a, dt, threads(nthreads));
  }, py::arg("qkv"), py::arg("qkv_sb"), py::arg("qkv_st"), py::arg("rope"), py::arg("rope_sb"), py::arg("rope_st"),
     py::arg("k_layer"), py::arg("v_layer"), py::arg("cache_sb"), py::arg("cache_sh"), py::arg("S"), py::arg("start"),
     py::arg("q"), py::arg("B"), py::arg("T"), py::arg("H"), py::arg("H_kv"), py::arg("D"), py::arg("dtype"),
     py::arg("threads"), "RoPE on q and k, k and v to cache slots start[b] + t, q to `q`");

  m.def("tree_attention", [](int64_t q, int64_t q_sb, int64_t q_sh, int64_t q_sn, int64_t k, int64_t v,
                             int64_t kv_sb, int64_t kv_sh, int64_t prefix_len, int64_t bits, int64_t bits_sb,
                             int64_t out, int64_t B, int64_t H, int64_t H_kv, int64_t N, int64_t D, int64_t S,
                             double scale, int64_t dtype, int64_t nthreads, int64_t window) {
    const DType dt = float_dtype(dtype, "dtype");
    TreeAttentionArgs a{ptr(q, "q"), stride(q_sb, "q_sb"), stride(q_sh, "q_sh"), stride(q_sn, "q_sn"), ptr(k, "k"),
                        ptr(v, "v"), stride(kv_sb, "kv_sb"), stride(kv_sh, "kv_sh"),
                        static_cast<const int64_t*>(ptr(prefix_len, "prefix_len")),
                        static_cast<const int64_t*>(ptr(bits, "bits")), stride(bits_sb, "bits_sb"), ptr(out, "out"),
                        size(B, "B"), size(H, "H"), size(H_kv, "H_kv"), size(N, "N"), size(D, "D"), size(S, "S"),
                        float(scale)};
    if (a.N > 64) bad_arg("N", "must be <= 64 (one uint64 of ancestor bits per token)");
    if (a.D > kMaxDynamicD) bad_arg("D", "must be <= " + std::to_string(kMaxDynamicD));
    if (a.H % a.H_kv) bad_arg("H", "must be a multiple of H_kv");
    if (a.S < a.N) bad_arg("S", "is smaller than N");
    if (a.kv_sh < a.S * a.D) bad_arg("kv_sh", "is shorter than S * D");
    if (!(std::isfinite(scale) && scale > 0)) bad_arg("scale", "must be a finite number > 0");
    if (window < 0) bad_arg("window", "must be >= 0 (0: no sliding window)");
    a.window = window;
    py::gil_scoped_release unlocked;
    tree_attention(a, dt, threads(nthreads));
  }, py::arg("q"), py::arg("q_sb"), py::arg("q_sh"), py::arg("q_sn"), py::arg("k"), py::arg("v"), py::arg("kv_sb"),
     py::arg("kv_sh"), py::arg("prefix_len"), py::arg("bits"), py::arg("bits_sb"), py::arg("out"), py::arg("B"),
     py::arg("H"), py::arg("H_kv"), py::arg("N"), py::arg("D"), py::arg("S"), py::arg("scale"), py::arg("dtype"),
     py::arg("threads"), py::arg("window") = 0,
     "attention of N new tokens over the cache prefix and their ancestors, keys in position order; window > 0: a "
     "token at position prefix_len + depth sees only keys at positions > its own - window");

  m.def("kv_compact", [](int64_t k, int64_t v, int64_t src, int64_t dst_start, int64_t L, int64_t B_max,
                         int64_t H_kv, int64_t S, int64_t D, int64_t B, int64_t M, int64_t elem_size,
                         int64_t nthreads) {
    KvCompactArgs a{ptr(k, "k"), ptr(v, "v"), static_cast<const int64_t*>(ptr(src, "src")),
                    static_cast<const int64_t*>(ptr(dst_start, "dst_start")), size(L, "L"), size(B_max, "B_max"),
                    size(H_kv, "H_kv"), size(S, "S"), size(D, "D"), size(B, "B"), size(M, "M"),
                    size(elem_size, "elem_size")};
    if (a.B > a.B_max) bad_arg("B", "exceeds B_max");
    if (a.elem_size != 2 && a.elem_size != 4) bad_arg("elem_size", "must be 2 or 4");
    py::gil_scoped_release unlocked;
    kv_compact(a, threads(nthreads));
  }, py::arg("k"), py::arg("v"), py::arg("src"), py::arg("dst_start"), py::arg("L"), py::arg("B_max"),
     py::arg("H_kv"), py::arg("S"), py::arg("D"), py::arg("B"), py::arg("M"), py::arg("elem_size"),
     py::arg("threads"), "slot src[b, m] -> dst_start[b] + m, every layer, K and V");

  m.def("quantize_activations", [](int64_t x, int64_t x_stride, int64_t rows, int64_t K, int64_t dtype, int64_t xq,
                                   int64_t sx, int64_t isum) {
    const DType dt = float_dtype(dtype, "dtype");
    if (size(K, "K") % kQuantGroup) bad_arg("K", "must be a multiple of 32");
    if (stride(x_stride, "x_stride") < K) bad_arg("x_stride", "is shorter than K");
    QuantizeArgs a{ptr(x, "x"), x_stride, static_cast<int8_t*>(ptr(xq, "xq")), static_cast<float*>(ptr(sx, "sx")),
                   static_cast<int32_t*>(ptr(isum, "isum")), size(rows, "rows"), K};
    py::gil_scoped_release unlocked;
    quantize_activations(a, dt);
  }, py::arg("x"), py::arg("x_stride"), py::arg("rows"), py::arg("K"), py::arg("dtype"), py::arg("xq"), py::arg("sx"),
     py::arg("isum"), "x [rows, K] -> int8 xq, per-32 scales sx and sums isum (what quant_linear computes first)");

  m.def("quant_linear", [](int64_t bits, int64_t x, int64_t x_stride, int64_t rows, int64_t K, int64_t dtype,
                           int64_t codes, int64_t scales, int64_t N, int64_t out, int64_t out_stride,
                           int64_t nthreads) {
    const DType dt = float_dtype(dtype, "dtype");
    if (bits != 4 && bits != 8) bad_arg("bits", "must be 4 or 8, got " + std::to_string(bits));
    if (size(K, "K") % kQuantGroup) bad_arg("K", "must be a multiple of 32");
    if (stride(x_stride, "x_stride") < K) bad_arg("x_stride", "is shorter than K");
    if (stride(out_stride, "out_stride") < size(N, "N")) bad_arg("out_stride", "is shorter than N");
    const void* xp = ptr(x, "x");
    const QuantMatmulArgs a{nullptr, nullptr, nullptr, nullptr, static_cast<const uint8_t*>(ptr(codes, "codes")),
                            ptr(scales, "scales"), ptr(out, "out"), out_stride, size(rows, "rows"), K, N, dt};
    const int64_t nt = threads(nthreads);
    py::gil_scoped_release unlocked;
    quant_linear(int(bits), xp, x_stride, a, nt);
  }, py::arg("bits"), py::arg("x"), py::arg("x_stride"), py::arg("rows"), py::arg("K"), py::arg("dtype"),
     py::arg("codes"), py::arg("scales"), py::arg("N"), py::arg("out"), py::arg("out_stride"), py::arg("threads"),
     "out [rows, N] = x [rows, K] @ w.T for w packed by cpu_ops.pack_int4 (bits 4) or pack_int8 (bits 8)");

  // The layer table's row width: Python checks it, so that an extension built from older sources (another
  // LayerField order) declines the stack instead of reading its addresses as other fields.
  m.def("decoder_layer_fields", [] { return int64_t(kLayerFields); });

  m.def("decoder_layers", [](int64_t x, int64_t h, int64_t table, int64_t final_norm, int64_t rope, int64_t rope_sb,
                             int64_t k_cache, int64_t v_cache, int64_t start, int64_t bits, int64_t bits_sb,
                             int64_t L, int64_t B, int64_t T, int64_t d, int64_t H, int64_t H_kv, int64_t D,
                             int64_t I, int64_t B_max, int64_t S, double eps, int64_t dtype, int64_t nthreads,
                             int64_t rope_local, int64_t window, bool gelu) {
    DecoderArgs a{ptr(x, "x"), ptr(h, "h"), static_cast<const int64_t*>(ptr(table, "table")),
                  ptr(final_norm, "final_norm"), static_cast<const float*>(ptr(rope, "rope")), stride(rope_sb, "rope_sb"),
                  ptr(k_cache, "k_cache"), ptr(v_cache, "v_cache"), static_cast<const int64_t*>(ptr(start, "start")),
                  static_cast<const int64_t*>(ptr(bits, "bits")), stride(bits_sb, "bits_sb"), size(L, "L"),
                  size(B, "B"), size(T, "T"), size(d, "d"), size(H, "H"), size(H_kv, "H_kv"), size(D, "D"),
                  size(I, "I"), size(B_max, "B_max"), size(S, "S"), float(eps), float_dtype(dtype, "dtype")};
    a.rope_local = rope_local ? static_cast<const float*>(ptr(rope_local, "rope_local")) : nullptr;
    a.window = window;
    a.gelu = gelu;
    if (window < 0) bad_arg("window", "must be >= 0 (0: no sliding window)");
    if (a.T > 64) bad_arg("T", "must be <= 64 (one uint64 of ancestor bits per token)");
    if (a.B > a.B_max) bad_arg("B", "exceeds B_max");
    if (a.H % a.H_kv) bad_arg("H", "must be a multiple of H_kv");
    if (a.D % 2 || a.D > kMaxDynamicD) bad_arg("D", "must be even and <= " + std::to_string(kMaxDynamicD));
    if (a.d % kQuantGroup || a.I % kQuantGroup || (a.H * a.D) % kQuantGroup)
      bad_arg("d", "d, I and H * D must be multiples of 32 (the 4-bit groups)");
    if (a.S < a.T) bad_arg("S", "is smaller than T");
    if (!(eps >= 0.0)) bad_arg("eps", "must be >= 0");
    const int64_t nt = threads(nthreads);
    py::gil_scoped_release unlocked;
    decoder_layers(a, nt);
  }, py::arg("x"), py::arg("h"), py::arg("table"), py::arg("final_norm"), py::arg("rope"), py::arg("rope_sb"),
     py::arg("k_cache"), py::arg("v_cache"), py::arg("start"), py::arg("bits"), py::arg("bits_sb"), py::arg("L"),
     py::arg("B"), py::arg("T"), py::arg("d"), py::arg("H"), py::arg("H_kv"), py::arg("D"), py::arg("I"),
     py::arg("B_max"), py::arg("S"), py::arg("eps"), py::arg("dtype"), py::arg("threads"),
     py::arg("rope_local") = 0, py::arg("window") = 0, py::arg("gelu") = false,
     "a 4-bit model's decoder layers over x [B * T, d] in place (h = the final norm of x), K/V to the cache");

  m.def("greedy_accept", [](int64_t tokens, int64_t logits, int64_t retrieve, int64_t retrieve_sb,
                            int64_t retrieve_rows, int64_t pred,
                            int64_t accept_len, int64_t best_path, int64_t accepted_nodes, int64_t next_token,
                            int64_t emitted, int64_t B, int64_t N, int64_t V, int64_t P, int64_t D1, int64_t dtype,
                            int64_t nthreads) {
    const DType dt = float_dtype(dtype, "dtype");
    GreedyAcceptArgs a{static_cast<const int64_t*>(ptr(tokens, "tokens")), ptr(logits, "logits"),
                       static_cast<const int64_t*>(ptr(retrieve, "retrieve")), stride(retrieve_sb, "retrieve_sb"),
                       static_cast<int64_t*>(ptr(pred, "pred")), static_cast<int64_t*>(ptr(accept_len, "accept_len")),
                       static_cast<int64_t*>(ptr(best_path, "best_path")),
                       static_cast<int64_t*>(ptr(accepted_nodes, "accepted_nodes")),
                       static_cast<int64_t*>(ptr(next_token, "next_token")), static_cast<int64_t*>(ptr(emitted, "emitted")),
                       size(B, "B"), size(N, "N"), size(V, "V"), size(P, "P"), size(D1, "D1")};
    const int64_t nt = threads(nthreads), rows = size(retrieve_rows, "retrieve_rows");
    py::gil_scoped_release unlocked;
    return greedy_accept(a, rows, dt, nt);
  }, py::arg("tokens"), py::arg("logits"), py::arg("retrieve"), py::arg("retrieve_sb"), py::arg("retrieve_rows"),
     py::arg("pred"),
     py::arg("accept_len"), py::arg("best_path"), py::arg("accepted_nodes"), py::arg("next_token"), py::arg("emitted"),
     py::arg("B"), py::arg("N"), py::arg("V"), py::arg("P"), py::arg("D1"), py::arg("dtype"), py::arg("threads"),
     "greedy tree acceptance: argmax per node, longest matching retrieve path (first on ties), bonus token; False "
     "(nothing written) when retrieve holds a node id outside [-1, N) or a path without its root");

  m.def("dynamic_tree", [](int64_t values, int64_t indices, int64_t root, int64_t B, int64_t K, int64_t k, int64_t N,
                           int64_t tokens, int64_t depth, int64_t parent, int64_t rank, int64_t bits, int64_t mask,
                           int64_t retrieve) {
    if (size(N, "N") < 2) bad_arg("N", "must be at least 2, got " + std::to_string(N));
    DynamicTreeArgs a{static_cast<const float*>(ptr(values, "values")), static_cast<const int64_t*>(ptr(indices, "indices")),
                      static_cast<const int64_t*>(ptr(root, "root")), size(B, "B"), size(K, "K"), size(k, "k"), N,
                      static_cast<int64_t*>(ptr(tokens, "tokens")), static_cast<int64_t*>(ptr(depth, "depth")),
                      static_cast<int64_t*>(ptr(parent, "parent")), static_cast<int64_t*>(ptr(rank, "rank")),
                      bits == 0 ? nullptr : static_cast<int64_t*>(ptr(bits, "bits")),
                      static_cast<bool*>(ptr(mask, "mask")), static_cast<int64_t*>(ptr(retrieve, "retrieve"))};
    py::gil_scoped_release unlocked;
    return dynamic_tree(a);
  }, py::arg("values"), py::arg("indices"), py::arg("root"), py::arg("B"), py::arg("K"), py::arg("k"), py::arg("N"),
     py::arg("tokens"), py::arg("depth"), py::arg("parent"), py::arg("rank"), py::arg("bits"), py::arg("mask"),
     py::arg("retrieve"),
     "dynamic token tree per row (tree.dynamic_tree's buffers); bits 0: none (N > 64); False (outputs not to be "
     "trusted) on a NaN score");
}

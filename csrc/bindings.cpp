// Thin pybind11 module amphista_engine._C. It never links libtorch: tensors cross as raw device
// addresses (Python ints from tensor.data_ptr()), sizes, element strides, a dtype code and the CUDA stream
// handle (torch.cuda.current_stream().cuda_stream), so one build serves any torch on the same driver.
// Every argument is checked here, before any CUDA call: a bad pointer handed to a kernel is a sticky device
// fault that kills the whole CUDA context, so it must never reach the launch. What the kernels compute is
// documented in their headers; the typed Python wrappers are amphista_engine/kernels/cuda_ops.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "acceptance.cuh"
#include "binding_args.h"
#include "common.cuh"
#include "head_attention.cuh"
#include "norm_rope_kv.cuh"
#include "rmsnorm.cuh"
#include "staged_adaptation.cuh"
#include "tree_attention.cuh"

#ifndef AMPHISTA_CUDA_ARCHS
#define AMPHISTA_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using amphista::DType;
using namespace amphista_bind;

namespace {

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridYZ = 65535;
const double kMaxFloat = std::numeric_limits<float>::max();

void rmsnorm(py::object x_ptr, py::object w_ptr, py::object out_ptr, py::object rows_o, py::object d_o,
             py::object eps_o, py::object dtype_o, py::object stream_o) {
  const DType dtype = as_dtype(dtype_o);  // first: the pointer checks need the element size
  const int64_t esize = amphista::dtype_size(dtype);
  const int64_t rows = as_int(rows_o, "rows");
  const int64_t d = as_int(d_o, "d");
  if (rows <= 0) bad_arg("rows", "must be positive, got " + std::to_string(rows));
  if (d <= 0) bad_arg("d", "must be positive, got " + std::to_string(d));
  if (rows > kMaxGridX) bad_arg("rows", "exceeds 2^31-1 (one CUDA block per row), got " + std::to_string(rows));
  if (d > std::numeric_limits<int64_t>::max() / esize / rows) bad_arg("d", "times rows overflows 64-bit bytes");
  const float eps = as_float(eps_o, "eps", 0.0, kMaxFloat);
  const void* x = as_ptr(x_ptr, "x_ptr", esize);
  const void* w = as_ptr(w_ptr, "w_ptr", esize);
  void* out = as_ptr(out_ptr, "out_ptr", esize);
  const cudaStream_t stream = as_stream(stream_o);
  launch("rmsnorm kernel launch", [&] { return amphista::rmsnorm(x, w, out, rows, d, eps, dtype, stream); });
}

void add_rmsnorm(py::object x_ptr, py::object residual_ptr, py::object w_ptr, py::object s_ptr, py::object y_ptr,
                 py::object rows_o, py::object res_rows_o, py::object d_o, py::object eps_o, py::object dtype_o,
                 py::object stream_o) {
  const DType dtype = as_dtype(dtype_o);
  const int64_t esize = amphista::dtype_size(dtype);
  const int64_t rows = as_size(rows_o, "rows");
  const int64_t res_rows = as_size(res_rows_o, "res_rows");
  const int64_t d = as_size(d_o, "d");
  require(rows <= kMaxGridX, "rows", "exceeds 2^31-1 (one CUDA block per row)");
  require(rows % res_rows == 0, "res_rows", "must divide rows (the residual repeats over the leading dims), got " +
                                                std::to_string(res_rows) + " for " + std::to_string(rows) + " rows");
  const float eps = as_float(eps_o, "eps", 0.0, kMaxFloat);
  const void* x = as_ptr(x_ptr, "x_ptr", esize);
  const void* r = as_ptr(residual_ptr, "residual_ptr", esize);
  const void* w = as_ptr(w_ptr, "w_ptr", esize);
  void* s = as_ptr(s_ptr, "s_ptr", esize);
  void* y = as_ptr(y_ptr, "y_ptr", esize);
  const cudaStream_t stream = as_stream(stream_o);
  launch("add_rmsnorm kernel launch",
         [&] { return amphista::add_rmsnorm(x, r, w, s, y, rows, res_rows, d, eps, dtype, stream); });
}

void rope(py::object x_ptr, py::object rope_ptr, py::object out_ptr, py::object B_o, py::object T_o, py::object H_o,
          py::object D_o, py::object x_strides_o, py::object rope_sb_o, py::object dtype_o, py::object stream_o) {
  const DType dtype = as_dtype(dtype_o);
  const int64_t esize = amphista::dtype_size(dtype);
  amphista::RopeParams p{};
  p.B = as_size(B_o, "B");
  p.T = as_size(T_o, "T");
  p.H = as_size(H_o, "H");
  p.D = as_size(D_o, "D");
  require(p.D % 2 == 0, "D", "must be even (rotate-half RoPE), got " + std::to_string(p.D));
  require(product({p.B, p.T, p.H, p.D}) <= (int64_t(1) << 40), "B", "times T * H * D is implausibly large");
  const auto xs = as_strides<3>(x_strides_o, "x_strides");
  p.x_sb = xs[0], p.x_st = xs[1], p.x_sh = xs[2];
  p.rope_sb = as_int(rope_sb_o, "rope_sb");
  require(p.rope_sb == 0 || p.rope_sb == p.T * p.D, "rope_sb",
          "must be 0 (rows shared by the batch) or T * D = " + std::to_string(p.T * p.D) + ", got " + std::to_string(p.rope_sb));
  p.x = as_ptr(x_ptr, "x_ptr", esize);
  p.rope = static_cast<const float*>(as_ptr(rope_ptr, "rope_ptr", 4));
  p.out = as_ptr(out_ptr, "out_ptr", esize);
  const cudaStream_t stream = as_stream(stream_o);
  launch("rope kernel launch", [&] { return amphista::rope(p, dtype, stream); });
}

void kv_write(py::object k_buf_ptr, py::object v_buf_ptr, py::object start_ptr, py::object k_ptr, py::object v_ptr,
              py::object layer_o, py::object L_o, py::object B_max_o, py::object B_o, py::object H_o, py::object T_o,
              py::object S_o, py::object D_o, py::object k_strides_o, py::object v_strides_o, py::object dtype_o,
              py::object stream_o) {
  const DType dtype = as_dtype(dtype_o);
  amphista::KVWriteParams p{};
  p.elem_size = amphista::dtype_size(dtype);
  p.L = as_size(L_o, "L");
  p.layer = as_int_in(layer_o, "layer", 0, p.L - 1);
  p.B_max = as_size(B_max_o, "B_max");
  p.B = as_int_in(B_o, "B", 1, p.B_max);
  p.H = as_size(H_o, "H");
  p.T = as_size(T_o, "T");
  p.S = as_size(S_o, "S");
  p.D = as_size(D_o, "D");
  require(product({p.L, p.B_max, p.H, p.S, p.D}) <= (int64_t(1) << 40), "S", "cache size is implausibly large");
  const auto ks = as_strides<3>(k_strides_o, "k_strides");
  const auto vs = as_strides<3>(v_strides_o, "v_strides");
  p.k_sb = ks[0], p.k_sh = ks[1], p.k_st = ks[2];
  p.v_sb = vs[0], p.v_sh = vs[1], p.v_st = vs[2];
  p.k_buf = as_ptr(k_buf_ptr, "k_buf_ptr", p.elem_size);
  p.v_buf = as_ptr(v_buf_ptr, "v_buf_ptr", p.elem_size);
  p.start = static_cast<const int64_t*>(as_ptr(start_ptr, "start_ptr", 8));
  p.k = as_ptr(k_ptr, "k_ptr", p.elem_size);
  p.v = as_ptr(v_ptr, "v_ptr", p.elem_size);
  const cudaStream_t stream = as_stream(stream_o);
  launch("kv_write kernel launch", [&] { return amphista::kv_write(p, stream); });
}

void kv_compact(py::object k_buf_ptr, py::object v_buf_ptr, py::object src_ptr, py::object dst_start_ptr,
                py::object L_o, py::object B_max_o, py::object B_o, py::object H_o, py::object S_o, py::object D_o,
                py::object M_o, py::object dtype_o, py::object stream_o) {
  const DType dtype = as_dtype(dtype_o);
  amphista::KVCompactParams p{};
  p.elem_size = amphista::dtype_size(dtype);
  p.L = as_size(L_o, "L");
  p.B_max = as_size(B_max_o, "B_max");
  p.B = as_int_in(B_o, "B", 1, p.B_max);
  p.H = as_size(H_o, "H");
  p.S = as_size(S_o, "S");
  p.D = as_size(D_o, "D");
  p.M = as_size(M_o, "M");
  require(product({p.L, p.B, p.H}) <= kMaxGridX, "L",
          "times B * H exceeds the grid (one block per layer, row and head)");
  require(product({p.L, p.B_max, p.H, p.S, p.D}) <= (int64_t(1) << 40), "S", "cache size is implausibly large");
  // product(), not kv_compact_smem_bytes(): M * D * elem_size could wrap to a small value and pass.
  require(product({p.M, p.D, p.elem_size}) <= amphista::kKVCompactMaxSmem, "M",
          "times D is too large: the moved rows of one head must fit in 48 KiB of shared memory");
  p.k_buf = as_ptr(k_buf_ptr, "k_buf_ptr", p.elem_size);
  p.v_buf = as_ptr(v_buf_ptr, "v_buf_ptr", p.elem_size);
  p.src = static_cast<const int64_t*>(as_ptr(src_ptr, "src_ptr", 8));
  p.dst_start = static_cast<const int64_t*>(as_ptr(dst_start_ptr, "dst_start_ptr", 8));
  const cudaStream_t stream = as_stream(stream_o);
  launch("kv_compact kernel launch", [&] { return amphista::kv_compact(p, stream); });
}

void tree_attention(py::object q_ptr, py::object k_ptr, py::object v_ptr, py::object prefix_len_ptr,
                    py::object bits_ptr, py::object out_ptr, py::object work_o_ptr, py::object work_ml_ptr,
                    py::object counters_ptr,
                    py::object B_o, py::object H_o, py::object H_kv_o, py::object N_o, py::object D_o,
                    py::object kv_len_o, py::object S_o, py::object q_strides_o, py::object k_strides_o,
                    py::object v_strides_o, py::object bits_sb_o, py::object num_splits_o, py::object scale_o,
                    py::object dtype_o, py::object stream_o, py::object positions_ptr, py::object pos_sb_o,
                    py::object window_o) {
  const DType dtype = as_half_dtype(dtype_o);
  amphista::TreeAttentionParams p{};
  p.B = as_size(B_o, "B");
  p.H = as_size(H_o, "H");
  p.H_kv = as_size(H_kv_o, "H_kv");
  require(p.H % p.H_kv == 0, "H_kv", "must divide H (GQA), got H=" + std::to_string(p.H) + ", H_kv=" + std::to_string(p.H_kv));
  p.N = as_int_in(N_o, "N", 1, 64);  // one uint64 ancestor row per node
  p.D = as_int(D_o, "D");
  require(p.D == 64 || p.D == 128, "D", "must be 64 or 128 (the compiled head dims), got " + std::to_string(p.D));
  const int64_t S = as_size(S_o, "S");
  p.kv_len = as_int_in(kv_len_o, "kv_len", 1, S);
  require(product({p.B, p.H_kv}) <= kMaxGridYZ, "B", "times H_kv exceeds 65535 (grid y)");
  require(amphista::ceil_div(p.N * (p.H / p.H_kv), 64) <= kMaxGridX, "N", "times H / H_kv is too large");
  const auto qs = as_strides<3>(q_strides_o, "q_strides");
  const auto ks = as_strides<3>(k_strides_o, "k_strides");
  const auto vs = as_strides<3>(v_strides_o, "v_strides");
  for (int64_t st : qs) require(st % 2 == 0, "q_strides", "must be even (q is read 4 bytes at a time)");
  for (int64_t st : ks) require(st % 8 == 0, "k_strides", "must be multiples of 8 elements (16-byte loads)");
  for (int64_t st : vs) require(st % 8 == 0, "v_strides", "must be multiples of 8 elements (16-byte loads)");
  p.q_sb = qs[0], p.q_sh = qs[1], p.q_sn = qs[2];
  p.k_sb = ks[0], p.k_sh = ks[1], p.k_ss = ks[2];
  p.v_sb = vs[0], p.v_sh = vs[1], p.v_ss = vs[2];
  p.bits_sb = as_int(bits_sb_o, "bits_sb");
  require(p.bits_sb == 0 || p.bits_sb >= p.N, "bits_sb", "must be 0 (one tree for every row) or >= N");
  p.num_splits = as_int_in(num_splits_o, "num_splits", 1, kMaxGridYZ);
  p.scale = as_float(scale_o, "scale", 0.0, 1e6);
  p.q = as_ptr(q_ptr, "q_ptr", 4);
  p.k = as_ptr(k_ptr, "k_ptr", 16);
  p.v = as_ptr(v_ptr, "v_ptr", 16);
  p.prefix_len = static_cast<const int64_t*>(as_ptr(prefix_len_ptr, "prefix_len_ptr", 8));
  p.bits = static_cast<const int64_t*>(as_ptr(bits_ptr, "bits_ptr", 8));
  p.out = as_ptr(out_ptr, "out_ptr", 4);
  if (p.num_splits > 1) {
    p.work_o = static_cast<float*>(as_ptr(work_o_ptr, "work_o_ptr", 8));
    p.work_ml = static_cast<float*>(as_ptr(work_ml_ptr, "work_ml_ptr", 4));
  } else {
    p.work_o = static_cast<float*>(as_opt_ptr(work_o_ptr, "work_o_ptr", 8));
    p.work_ml = static_cast<float*>(as_opt_ptr(work_ml_ptr, "work_ml_ptr", 4));
  }
  p.counters = static_cast<int*>(as_opt_ptr(counters_ptr, "counters_ptr", 4));  // used by num_splits > 1 only
  // 0: no sliding window; the bound keeps window + N + 64 (the kernel's key span) far from overflow
  p.window = as_int_in(window_o, "window", 0, int64_t(1) << 40);
  if (p.window > 0) {
    p.positions = static_cast<const int64_t*>(as_ptr(positions_ptr, "positions_ptr", 8));
    p.pos_sb = as_int(pos_sb_o, "pos_sb");
    require(p.pos_sb == 0 || p.pos_sb >= p.N, "pos_sb", "must be 0 (one set of positions for every row) or >= N");
  } else {
    p.positions = static_cast<const int64_t*>(as_opt_ptr(positions_ptr, "positions_ptr", 8));
    p.pos_sb = 0;
  }
  const cudaStream_t stream = as_stream(stream_o);
  launch("tree_attention kernel launch", [&] { return amphista::tree_attention(p, dtype, stream); });
}

void head_attention(py::object qkv_ptr, py::object out_ptr, py::object rows_o, py::object slots_o,
                    py::object n_heads_o, py::object head_dim_o, py::object scale_o, py::object dtype_o,
                    py::object stream_o) {
  const DType dtype = as_dtype(dtype_o);
  const int64_t esize = amphista::dtype_size(dtype);
  const int64_t rows = as_size(rows_o, "rows");
  require(rows <= kMaxGridX, "rows", "exceeds 2^31-1");
  const int64_t slots = as_int_in(slots_o, "slots", 1, amphista::kHeadAttnMaxSlots);
  // The kernel takes n_heads as an int: a larger value was truncated there and its warps read past qkv.
  const int64_t n_heads = as_int_in(n_heads_o, "n_heads", 1, std::numeric_limits<int32_t>::max());
  const int64_t hd = as_int_in(head_dim_o, "head_dim", 1, amphista::kHeadAttnMaxHeadDim);
  require(product({rows, slots, 3, n_heads, hd}) <= (int64_t(1) << 40), "n_heads",
          "times the other sizes is implausibly large");
  const float scale = as_float(scale_o, "scale", 0.0, 1e6);
  const void* qkv = as_ptr(qkv_ptr, "qkv_ptr", esize);
  void* out = as_ptr(out_ptr, "out_ptr", esize);
  const cudaStream_t stream = as_stream(stream_o);
  launch("head_attention kernel launch",
         [&] { return amphista::head_attention(qkv, out, rows, slots, n_heads, hd, scale, dtype, stream); });
}

void sal_concat(py::object hidden_ptr, py::object hidden_dtype_o, py::object tokens_ptr, py::object emb_ptr,
                py::object out_ptr, py::object dtype_o, py::object rows_o, py::object d_o, py::object vocab_o,
                py::object stream_o) {
  const DType hdt = as_dtype(hidden_dtype_o, "hidden_dtype");
  const DType dtype = as_dtype(dtype_o);
  const int64_t rows = as_size(rows_o, "rows");
  const int64_t d = as_size(d_o, "d");
  const int64_t vocab = as_size(vocab_o, "vocab");
  require(product({rows, 2, d}) <= (int64_t(1) << 40), "rows", "times 2 d is implausibly large");
  const void* hidden = as_ptr(hidden_ptr, "hidden_ptr", amphista::dtype_size(hdt));
  const auto* tokens = static_cast<const int64_t*>(as_ptr(tokens_ptr, "tokens_ptr", 8));
  const void* emb = as_ptr(emb_ptr, "emb_ptr", amphista::dtype_size(dtype));
  void* out = as_ptr(out_ptr, "out_ptr", amphista::dtype_size(dtype));
  const cudaStream_t stream = as_stream(stream_o);
  launch("sal_concat kernel launch",
         [&] { return amphista::sal_concat(hidden, hdt, tokens, emb, out, dtype, rows, d, vocab, stream); });
}

void greedy_accept(py::object tokens_ptr, py::object logits_ptr, py::object retrieve_ptr, py::object pred_ptr,
                   py::object accept_len_ptr, py::object best_path_ptr, py::object accepted_nodes_ptr,
                   py::object next_token_ptr, py::object emitted_ptr, py::object B_o, py::object N_o, py::object V_o,
                   py::object P_o, py::object D1_o, py::object logits_sr_o, py::object retrieve_sb_o,
                   py::object dtype_o, py::object stream_o) {
  const DType dtype = as_dtype(dtype_o);
  amphista::GreedyAcceptParams p{};
  p.B = as_size(B_o, "B");
  p.N = as_size(N_o, "N");
  p.V = as_size(V_o, "V");
  p.P = as_int_in(P_o, "P", 1, int64_t(1) << 24);  // paths are ranked by a 32-bit index
  p.D1 = as_int_in(D1_o, "D1", 1, 1024);
  require(product({p.B, p.N}) <= kMaxGridX, "N", "times B exceeds 2^31-1 (one block per node row)");
  p.logits_sr = as_int(logits_sr_o, "logits_sr");
  require(p.logits_sr >= p.V, "logits_sr", "must be >= V (rows of V logits), got " + std::to_string(p.logits_sr));
  p.retrieve_sb = as_int(retrieve_sb_o, "retrieve_sb");
  require(p.retrieve_sb == 0 || p.retrieve_sb >= p.P * p.D1, "retrieve_sb",
          "must be 0 (one tree for every row) or >= P * D1");
  p.tokens = static_cast<const int64_t*>(as_ptr(tokens_ptr, "tokens_ptr", 8));
  p.logits = as_ptr(logits_ptr, "logits_ptr", amphista::dtype_size(dtype));
  p.retrieve = static_cast<const int64_t*>(as_ptr(retrieve_ptr, "retrieve_ptr", 8));
  p.pred = static_cast<int64_t*>(as_ptr(pred_ptr, "pred_ptr", 8));
  p.accept_len = static_cast<int64_t*>(as_ptr(accept_len_ptr, "accept_len_ptr", 8));
  p.best_path = static_cast<int64_t*>(as_ptr(best_path_ptr, "best_path_ptr", 8));
  p.accepted_nodes = static_cast<int64_t*>(as_ptr(accepted_nodes_ptr, "accepted_nodes_ptr", 8));
  p.next_token = static_cast<int64_t*>(as_ptr(next_token_ptr, "next_token_ptr", 8));
  p.emitted = static_cast<int64_t*>(as_ptr(emitted_ptr, "emitted_ptr", 8));
  const cudaStream_t stream = as_stream(stream_o);
  launch("greedy_accept kernel launch", [&] { return amphista::greedy_accept(p, dtype, stream); });
}

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "amphista-engine CUDA kernels (raw device pointers; no libtorch dependency)";

  m.def("rmsnorm", &rmsnorm, py::arg("x_ptr"), py::arg("w_ptr"), py::arg("out_ptr"), py::arg("rows"),
        py::arg("d"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
        "out[r,:] = x[r,:] * rsqrt(mean(x[r,:]^2) + eps) * w for contiguous rows x d; dtype code "
        "0=float32, 1=float16, 2=bfloat16 for x, w and out; out may equal x. Raises ValueError for "
        "a bad argument, RuntimeError for a CUDA launch error.");

  m.def("add_rmsnorm", &add_rmsnorm, py::arg("x_ptr"), py::arg("residual_ptr"), py::arg("w_ptr"), py::arg("s_ptr"),
        py::arg("y_ptr"), py::arg("rows"), py::arg("res_rows"), py::arg("d"), py::arg("eps"), py::arg("dtype"),
        py::arg("stream"),
        "s = x + residual (row r adds residual row r % res_rows), y = RMSNorm(s) * w; rows x d contiguous.");

  m.def("rope", &rope, py::arg("x_ptr"), py::arg("rope_ptr"), py::arg("out_ptr"), py::arg("B"), py::arg("T"),
        py::arg("H"), py::arg("D"), py::arg("x_strides"), py::arg("rope_sb"), py::arg("dtype"), py::arg("stream"),
        "Rotate-half RoPE: x [B, T, H, D] with element strides (b, t, h), fp32 rows [B or 1, T, D] of cos | sin "
        "(rope_sb = T*D or 0); out [B, T, H, D] contiguous.");

  m.def("kv_write", &kv_write, py::arg("k_buf_ptr"), py::arg("v_buf_ptr"), py::arg("start_ptr"), py::arg("k_ptr"),
        py::arg("v_ptr"), py::arg("layer"), py::arg("L"), py::arg("B_max"), py::arg("B"), py::arg("H"), py::arg("T"),
        py::arg("S"), py::arg("D"), py::arg("k_strides"), py::arg("v_strides"), py::arg("dtype"), py::arg("stream"),
        "k, v [B, H, T, D] (element strides (b, h, t)) -> slots start[b] + t of layer `layer` of the contiguous "
        "caches [L, B_max, H, S, D]; slots outside [0, S) are skipped.");

  m.def("kv_compact", &kv_compact, py::arg("k_buf_ptr"), py::arg("v_buf_ptr"), py::arg("src_ptr"),
        py::arg("dst_start_ptr"), py::arg("L"), py::arg("B_max"), py::arg("B"), py::arg("H"), py::arg("S"),
        py::arg("D"), py::arg("M"), py::arg("dtype"), py::arg("stream"),
        "All layers, K and V, one launch: slot src[b, m] -> dst_start[b] + m (both clamped to [0, S)); every "
        "source is read before any write.");

  m.def("tree_attention", &tree_attention, py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"),
        py::arg("prefix_len_ptr"), py::arg("bits_ptr"), py::arg("out_ptr"), py::arg("work_o_ptr"),
        py::arg("work_ml_ptr"), py::arg("counters_ptr"), py::arg("B"), py::arg("H"), py::arg("H_kv"), py::arg("N"),
        py::arg("D"),
        py::arg("kv_len"), py::arg("S"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("bits_sb"), py::arg("num_splits"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        py::arg("positions_ptr") = 0, py::arg("pos_sb") = 0, py::arg("window") = 0,
        "Tree attention (fp16/bf16, D 64 or 128, N <= 64): q [B, H, N, D] over cache slots [0, prefix_len[b]) "
        "plus new slot j where bit j of bits[b][n] is set; out [B, N, H, D]. window > 0: node n sees only key "
        "positions > positions[b][n] - window (int64 [B or 1, N], row stride pos_sb; slot s < prefix_len[b] holds "
        "position s, new slot prefix_len[b] + j positions[b][j]); window 0 ignores positions_ptr (may be 0). "
        "num_splits > 1 needs fp32 workspaces work_o [num_splits, B*N*H, D] and work_ml [2, num_splits, B*N*H]; "
        "counters_ptr: 0 (a second kernel merges the splits) or zeroed int32 counters "
        "[B*H_kv*ceil(N*H/H_kv/64)], one per row tile, that the last split to finish uses to merge in the same "
        "launch and leaves zeroed.");

  m.def("head_attention", &head_attention, py::arg("qkv_ptr"), py::arg("out_ptr"), py::arg("rows"),
        py::arg("slots"), py::arg("n_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("dtype"),
        py::arg("stream"),
        "Unmasked multi-head attention across the K slots of each request: qkv [rows, K, 3, heads, hd] "
        "contiguous -> out [rows, K, heads * hd].");

  m.def("sal_concat", &sal_concat, py::arg("hidden_ptr"), py::arg("hidden_dtype"), py::arg("tokens_ptr"),
        py::arg("emb_ptr"), py::arg("out_ptr"), py::arg("dtype"), py::arg("rows"), py::arg("d"), py::arg("vocab"),
        py::arg("stream"),
        "out[r] = [hidden[r] ; emb[tokens[r]]] cast to `dtype` (emb's dtype), rows x 2d contiguous.");

  m.def("greedy_accept", &greedy_accept, py::arg("tokens_ptr"), py::arg("logits_ptr"), py::arg("retrieve_ptr"),
        py::arg("pred_ptr"), py::arg("accept_len_ptr"), py::arg("best_path_ptr"), py::arg("accepted_nodes_ptr"),
        py::arg("next_token_ptr"), py::arg("emitted_ptr"), py::arg("B"), py::arg("N"), py::arg("V"), py::arg("P"),
        py::arg("D1"), py::arg("logits_sr"), py::arg("retrieve_sb"), py::arg("dtype"), py::arg("stream"),
        "Greedy tree acceptance (acceptance.greedy_accept) into preallocated int64 outputs; pred [B, N] is "
        "workspace (the argmax of every node).");

  // CUDA runtime this module carries (static cudart, so fixed at build time), e.g. "13.0".
  m.def("cuda_version", [] {
    int v = 0;
    AMPHISTA_CUDA_CHECK(cudaRuntimeGetVersion(&v));
    return version_string(v);
  });

  // Newest CUDA version the installed driver supports, or None without a driver.
  m.def("driver_version", []() -> py::object {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess || v == 0) return py::none();
    return py::str(version_string(v));
  });

  // CMAKE_CUDA_ARCHITECTURES the module was compiled for, e.g. ["80", "90"].
  m.def("built_archs", [] {
    std::vector<std::string> out;
    std::stringstream ss(AMPHISTA_CUDA_ARCHS);
    for (std::string item; std::getline(ss, item, ',');)
      if (!item.empty()) out.push_back(item);
    return out;
  });
}

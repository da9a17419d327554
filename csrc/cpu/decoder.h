// A 4-bit model's decoder layers in one call (cpu_ops.decoder_layers): the decode step's whole layer stack.
//
// Why: with the products this fast (quant_matmul.h), a CPU decode step of SmolLM2 spent more time in Python than
// in arithmetic: ten ops a layer, each ~10-20 us of module calls, dispatch and tensor allocation, ~7 ms of a
// ~13 ms step. Here the same kernels run back to back over scratch buffers, in the order and with the rounding
// of Block.forward (kernels/reference.py):
//   h = attention_norm(x)                      (first layer; later ones get h from the add + norm before)
//   qkv = wqkv(h) (+ bias: Qwen2), then each head of q and k RMS-normalised (Qwen3), as Attention.norm_qk
//   q = RoPE + cache write (qkv)               qkv_rope_write
//   a = tree_attention(q, cache)               keys in position order
//   x, h = add_rmsnorm(wo(a), x, ffn_norm)
//   x, h = add_rmsnorm(w2(silu(g) * u), x, next_norm)   with g | u = w13(h); next_norm: the next layer's
//                                              attention_norm, or the final norm after the last layer
// Each kernel computes a row on its own, so the stack does too: a token's hidden state is the same bits in a
// plain step and in any tree.
#pragma once

#include <vector>

#include "common.h"
#include "norm.h"
#include "quant_matmul.h"
#include "rope_kv.h"
#include "tree_attention.h"

namespace amphista_cpu {

// One row of the layer table (an int64 tensor [L, kLayerFields] of addresses): the packed weights of
// cpu_ops.PackedWeights (codes, scales) and the norms' weights in the model dtype; the q/k/v bias and the
// q and k norms' weights in the model dtype, or 0 where the layer has none.
enum LayerField : int {
  kAttnNorm = 0, kWqkvCodes, kWqkvScales, kWoCodes, kWoScales, kFfnNorm, kW13Codes, kW13Scales, kW2Codes,
  kW2Scales, kWqkvBias, kQNorm, kKNorm,
  kPostAttnNorm, kPostFfnNorm,  // Gemma 3's norms of the attention's and the MLP's outputs (0: none)
  kSliding,                     // 1: a sliding-window layer (DecoderArgs.window, rope_local), 0: a full one
  kInt8Mask,                    // bit j set: linear j (wqkv, wo, w13, w2) is int8 rows, else 4-bit groups
  kLayerFields
};

struct DecoderArgs {
  void* x;                    // [R, d] the residual stream (R = B * T rows), updated in place
  void* h;                    // [R, d] out: the final norm of x
  const int64_t* table;       // [L, kLayerFields]
  const void* final_norm;     // [d]
  const float* rope;          // [B or 1, T, D] fp32 (cos | sin), contiguous
  int64_t rope_sb;            // 0: one set of rows for the batch
  void* k_cache;              // [L, B_max, H_kv, S, D] contiguous
  void* v_cache;
  const int64_t* start;       // [B] each row's cache length (prefix_len)
  const int64_t* bits;        // [B or 1, T] ancestor-or-self bits
  int64_t bits_sb;
  int64_t L, B, T, d, H, H_kv, D, I, B_max, S;
  float eps;
  DType dtype;
  const float* rope_local = nullptr;  // the sliding layers' RoPE rows (rope's layout), or nullptr: `rope`
  int64_t window = 0;                 // the sliding layers' window (tree_attention.h), 0: none
  bool gelu = false;                  // GELU-tanh (Gemma 3) instead of SiLU in the gated MLP
};

// SwiGLU's activation, rounded as FeedForward: silu(g) to the dtype, then times u. exp_approx: ~1-2 ulp from expf.
// gelu: Gemma's gelu_pytorch_tanh(g) instead, 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh through
// exp_approx (the same bits in every row and every tree, which is what the CPU's exact decoding needs).
struct SiluArgs {
  const void* gu;  // [rows, 2 I]: gate | up
  void* out;       // [rows, I]
  int64_t I;
  bool gelu = false;
};

AMPHISTA_INLINE float gelu_tanh(float x) {
  const float y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float t = 1.f - 2.f / (exp_approx(2.f * y) + 1.f);      // tanh(y): -1 and 1 at the ends, never NaN
  return 0.5f * x * (1.f + t);
}

constexpr int64_t kSiluChunk = 256;  // columns a unit of work: a row's activation is split across threads too

template <class L>
AMPHISTA_INLINE void silu_mul_rows(const SiluArgs& a, int64_t c0, int64_t c1) {  // chunks [c0, c1)
  using T = typename L::T;
  const int64_t per_row = (a.I + kSiluChunk - 1) / kSiluChunk;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t r = c / per_row, j0 = c % per_row * kSiluChunk, j1 = std::min(a.I, j0 + kSiluChunk);
    const T* __restrict g = static_cast<const T*>(a.gu) + r * 2 * a.I;
    const T* __restrict u = g + a.I;
    T* __restrict o = static_cast<T*>(a.out) + r * a.I;
    for (int64_t j = j0; j < j1; ++j) {
      const float x = L::load(g, j);
      L::store(o, j, L::round(a.gelu ? gelu_tanh(x) : x / (1.f + exp_approx(-x))) * L::load(u, j));
    }
  }
}

AMPHISTA_ISA_VARIANTS(silu_mul_f32, SiluArgs, silu_mul_rows<F32>(a, r0, r1))
AMPHISTA_ISA_VARIANTS(silu_mul_bf16, SiluArgs, silu_mul_rows<BF16>(a, r0, r1))

// The q/k/v projection's epilogue, in place on qkv [rows, (H + 2 H_kv) D]: + bias (rounded to the dtype once, as
// torch adds), then RMSNorm over each head of q (q_norm) and of k (k_norm). Either part may be absent.
struct QkvEpilogueArgs {
  void* qkv;
  const void* bias;    // [(H + 2 H_kv) D] or nullptr
  const void* q_norm;  // [D] or nullptr (then k_norm is too)
  const void* k_norm;
  int64_t H, H_kv, D;
  float eps;
};

template <class L>
AMPHISTA_INLINE void qkv_epilogue_rows(const QkvEpilogueArgs& a, int64_t r0, int64_t r1) {
  using T = typename L::T;
  const int64_t width = (a.H + 2 * a.H_kv) * a.D;
  const T* b = static_cast<const T*>(a.bias);
  for (int64_t r = r0; r < r1; ++r) {
    T* row = static_cast<T*>(a.qkv) + r * width;
    if (b != nullptr)
      for (int64_t j = 0; j < width; ++j) L::store(row, j, L::load(row, j) + L::load(b, j));
    if (a.q_norm != nullptr)
      for (int64_t h = 0; h < a.H + a.H_kv; ++h)
        norm_one<L>(row + h * a.D, static_cast<const T*>(h < a.H ? a.q_norm : a.k_norm), row + h * a.D, a.D,
                    a.eps);
  }
}

AMPHISTA_ISA_VARIANTS(qkv_epilogue_f32, QkvEpilogueArgs, qkv_epilogue_rows<F32>(a, r0, r1))
AMPHISTA_ISA_VARIANTS(qkv_epilogue_bf16, QkvEpilogueArgs, qkv_epilogue_rows<BF16>(a, r0, r1))

inline void decoder_layers(const DecoderArgs& a, int64_t threads) {
  const int64_t R = a.B * a.T, es = a.dtype == DType::kFloat32 ? 4 : 2;
  const int64_t qkv_w = (a.H + 2 * a.H_kv) * a.D, attn_w = a.H * a.D;
  thread_local std::vector<char> scratch;
  const int64_t widths[] = {qkv_w, attn_w, attn_w, a.d, 2 * a.I, a.I};
  int64_t total = 0;
  for (int64_t w : widths) total += R * w * es;
  scratch.resize(size_t(total));
  char* p = scratch.data();
  char* bufs[6];
  for (int i = 0; i < 6; ++i) {
    bufs[i] = p;
    p += R * widths[i] * es;
  }
  void *qkv = bufs[0], *q = bufs[1], *attn = bufs[2], *proj = bufs[3], *gu = bufs[4], *act = bufs[5];
  auto matmul = [&](const void* in, int64_t K, const int64_t* row, int field, int64_t N, void* out) {
    const QuantMatmulArgs m{nullptr, nullptr, nullptr, nullptr, reinterpret_cast<const uint8_t*>(row[field]),
                            reinterpret_cast<const void*>(row[field + 1]), out, N, R, K, N, a.dtype};
    // a GGUF's wider layers (Q6_K attn_v, ffn_down of a Q4_K_M file) run as int8 rows beside 4-bit ones
    const int which = field == kWqkvCodes ? 0 : field == kWoCodes ? 1 : field == kW13Codes ? 2 : 3;
    quant_linear((row[kInt8Mask] >> which) & 1 ? 8 : 4, in, K, m, threads);
  };
  auto norm = [&](const void* x, const void* residual, const void* w, void* sum, void* out) {
    rmsnorm(NormArgs{x, residual, w, sum, out, R, a.d, a.eps}, a.dtype, threads);
  };

  norm(a.x, nullptr, reinterpret_cast<const void*>(a.table[kAttnNorm]), nullptr, a.h);
  const int64_t layer_elems = a.B_max * a.H_kv * a.S * a.D;
  for (int64_t l = 0; l < a.L; ++l) {
    const int64_t* row = a.table + l * kLayerFields;
    matmul(a.h, a.d, row, kWqkvCodes, qkv_w, qkv);
    if (row[kWqkvBias] != 0 || row[kQNorm] != 0) {
      const QkvEpilogueArgs e{qkv, reinterpret_cast<const void*>(row[kWqkvBias]),
                              reinterpret_cast<const void*>(row[kQNorm]), reinterpret_cast<const void*>(row[kKNorm]),
                              a.H, a.H_kv, a.D, a.eps};
      parallel_rows(R, 3 * qkv_w, threads, [&](int64_t r0, int64_t r1) {
        if (a.dtype == DType::kFloat32)
          qkv_epilogue_f32(e, r0, r1);
        else
          qkv_epilogue_bf16(e, r0, r1);
      });
    }
    char* k_layer = static_cast<char*>(a.k_cache) + l * layer_elems * es;
    char* v_layer = static_cast<char*>(a.v_cache) + l * layer_elems * es;
    const bool sliding = row[kSliding] != 0;
    const float* rope = sliding && a.rope_local != nullptr ? a.rope_local : a.rope;
    qkv_rope_write(QkvRopeWriteArgs{qkv, a.T * qkv_w, qkv_w, rope, a.rope_sb, a.D, k_layer, v_layer,
                                    a.H_kv * a.S * a.D, a.S * a.D, a.S, a.start, q, a.B, a.T, a.H, a.H_kv, a.D},
                   a.dtype, threads);
    TreeAttentionArgs att{q, a.T * attn_w, a.D, attn_w, k_layer, v_layer, a.H_kv * a.S * a.D, a.S * a.D,
                          a.start, a.bits, a.bits_sb, attn, a.B, a.H, a.H_kv, a.T, a.D, a.S,
                          float(std::pow(double(a.D), -0.5))};   // Python's D ** -0.5
    att.window = sliding ? a.window : 0;
    tree_attention(att, a.dtype, threads);
    matmul(attn, attn_w, row, kWoCodes, a.d, proj);
    if (row[kPostAttnNorm] != 0)   // Gemma: the attention's output normed before the residual add (in place)
      norm(proj, nullptr, reinterpret_cast<const void*>(row[kPostAttnNorm]), nullptr, proj);
    norm(proj, a.x, reinterpret_cast<const void*>(row[kFfnNorm]), a.x, a.h);
    matmul(a.h, a.d, row, kW13Codes, 2 * a.I, gu);
    const SiluArgs s{gu, act, a.I, a.gelu};
    parallel_rows(R * ((a.I + kSiluChunk - 1) / kSiluChunk), 32 * kSiluChunk, threads, [&](int64_t c0, int64_t c1) {
      if (a.dtype == DType::kFloat32)
        silu_mul_f32(s, c0, c1);
      else
        silu_mul_bf16(s, c0, c1);
    });
    matmul(act, a.I, row, kW2Codes, a.d, proj);
    if (row[kPostFfnNorm] != 0)
      norm(proj, nullptr, reinterpret_cast<const void*>(row[kPostFfnNorm]), nullptr, proj);
    const void* next = l + 1 < a.L ? reinterpret_cast<const void*>(a.table[(l + 1) * kLayerFields + kAttnNorm])
                                   : a.final_norm;
    norm(proj, a.x, next, a.x, a.h);
  }
}

}  // namespace amphista_cpu

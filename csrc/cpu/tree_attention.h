// Tree-masked attention over the static cache with every token's keys summed in position order
// (ops.tree_attention on the cpu backend).
//
// A new token sees the cache prefix [0, prefix_len[b]) and the new tokens whose ancestor bit it has (itself
// included). Its keys are taken in that order: prefix slots ascending, then its ancestors by node index, which
// is their depth order (a parent precedes its children in every tree the engine builds). That is position order,
// and the same sequence a plain decoding step reads for the same token, so each token's output is the same bits
// in a plain step, in any tree, alone or in a batch: the CPU's exact speculative decoding needs nothing else
// from attention (no aligned split, no windows, no padding rows, as kernels/cpu_exact.py needs around flash).
//
// Per (batch row, KV head), for the G * N query rows that share its keys: scores in fp32 (dot products in a fixed
// lane order, common.h: dot), a softmax over the row's visible keys packed in position order (exp and sum in a
// fixed order), the value sum in the same order, rounded once to the dtype.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#if AMPHISTA_X86
#include <immintrin.h>
#endif

namespace amphista_cpu {

struct TreeAttentionArgs {
  const void* q;               // [B, H, N, D], element strides below, last dim contiguous
  int64_t q_sb, q_sh, q_sn;
  const void* k;               // [B, H_kv, S, D], (slot, element) contiguous
  const void* v;
  int64_t kv_sb, kv_sh;
  const int64_t* prefix_len;   // [B]
  const int64_t* bits;         // [B or 1, N] ancestor-or-self bits (bit j: sees new token j)
  int64_t bits_sb;             // 0: one mask for the whole batch
  void* out;                   // [B, N, H, D] contiguous
  int64_t B, H, H_kv, N, D, S;
  float scale;
  bool by_rows = false;        // work units are single query rows (B * H_kv * G * N of them), not (row, KV head)s
  // > 0: a sliding-window layer (Gemma 3's, Mistral's, ...): a token at position p sees only keys at positions > p - window. A new
  // token's position is prefix_len + its depth, and its depth is its ancestor bits' count - 1: the window's first
  // prefix slot, and which ancestors it still holds, need nothing more.
  int64_t window = 0;
};

constexpr int64_t kMaxDynamicD = 512;  // head dims other than 64 / 128 (the binding refuses larger ones)

#if AMPHISTA_X86
// dot(q, k_j, D) * scale for 16 consecutive keys (rows of k, D apart), bit for bit as dot() sums each: per key
// 16 lane sums of products (a multiply, then an add), then the lanes folded (k, k + 8), (k, k + 4), (k, k + 2),
// (0, 1) as reduce_lanes does, here for 16 keys at once by shuffles instead of one key at a time: the fold was
// half of the attention's time. D a multiple of 16.
AMPHISTA_TARGET_AVX512 inline void dot16(const float* q, const float* k, int64_t D, float scale, float* out) {
  __m512 p[16];
  for (int j = 0; j < 16; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16)
      acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + j * D + i)));
    p[j] = acc;
  }
  __m512 c[8], d[4], e[2];
  for (int j = 0; j < 8; ++j)  // 128-bit lanes [A0-3, A4-7, B0-3, B4-7]: keys A = 2j, B = 2j + 1, lanes k + (k + 8)
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * j], p[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(p[2 * j], p[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int m = 0; m < 4; ++m)  // 128-bit lane L: key 4m + L, lanes k + (k + 4)
    d[m] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * m], c[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * m], c[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int n = 0; n < 2; ++n)  // 128-bit lane L: [key 8n + L: k + (k + 2), k < 2; key 8n + 4 + L: the same]
    e[n] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * n], d[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(d[2 * n], d[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane 4L + i: key 4i + L, lanes 0 + 1
  const __m512 sum = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutexvar_ps(order, sum), _mm512_set1_ps(scale)));
}

// dot16's AVX2 form for 8 keys: a key's 16 lane sums are two registers (lanes 0-7, 8-15), so the first fold
// (k, k + 8) is their sum, and the rest folds 8 keys at once, the same additions as reduce_lanes.
AMPHISTA_TARGET_AVX2 inline void dot8(const float* q, const float* k, int64_t D, float scale, float* out) {
  __m256 s1[8];
  for (int j = 0; j < 8; ++j) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
      lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + j * D + i)));
      hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + j * D + i + 8)));
    }
    s1[j] = _mm256_add_ps(lo, hi);
  }
  __m256 c[4], d[2];
  for (int m = 0; m < 4; ++m)  // 128-bit lane L: key 2m + L, lanes k + (k + 4)
    c[m] = _mm256_add_ps(_mm256_permute2f128_ps(s1[2 * m], s1[2 * m + 1], 0x20),
                         _mm256_permute2f128_ps(s1[2 * m], s1[2 * m + 1], 0x31));
  for (int n = 0; n < 2; ++n)  // 128-bit lane L: [key 4n + L: k + (k + 2), k < 2; key 4n + 2 + L: the same]
    d[n] = _mm256_add_ps(_mm256_shuffle_ps(c[2 * n], c[2 * n + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(c[2 * n], c[2 * n + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // 128-bit lane L, element i: key 2i + L, lanes 0 + 1
  const __m256 sum = _mm256_add_ps(_mm256_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm256_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_permutevar8x32_ps(sum, order), _mm256_set1_ps(scale)));
}
#endif

template <class L>
AMPHISTA_INLINE void load_rows(const typename L::T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = L::load(src, i);
}

// One (batch row, KV head), rows [r_lo, r_hi) of the G * N query rows that read its keys (the query heads of the
// KV head, times the new tokens). DC = D when it is a compile-time 64 or 128 (the dot products' and the value
// sums' loops then unroll into registers), 0 for any other D.
template <class L, int DC>
AMPHISTA_INLINE void tree_attention_unit(const TreeAttentionArgs& a, int64_t b, int64_t hk, int64_t r_lo, int64_t r_hi,
                                         std::vector<float>& buf) {
  using T = typename L::T;
  const int64_t D = DC ? DC : a.D;
  const int64_t G = a.H / a.H_kv, R = r_hi - r_lo;  // rows r_lo + r of the G * N
  // A prefix that leaves no room for the new tokens is clamped (never read past the cache).
  const int64_t P = std::min(std::max<int64_t>(a.prefix_len[b], 0), a.S - a.N);
  const int64_t keys = P + a.N;
  const T* K = static_cast<const T*>(a.k) + b * a.kv_sb + hk * a.kv_sh;
  const T* V = static_cast<const T*>(a.v) + b * a.kv_sb + hk * a.kv_sh;
  const int64_t* bits = a.bits + b * a.bits_sb;
  auto depth_of = [&](int64_t n) { return int64_t(__builtin_popcountll(uint64_t(bits[n]))) - 1; };

  // Each row's first visible prefix slot: 0, or past a window. The softmax and the value sum start there, so a token
  // sums the same keys in the same lanes as a plain step at its position does (there its window starts as here).
  // No row reads below the lowest of them, lo: its keys are neither widened nor scored (a plain step past the window
  // touches about window keys, not the whole prefix).
  std::vector<int64_t> first(size_t(R), 0);
  int64_t lo = 0;
  if (a.window > 0) {
    lo = P;
    for (int64_t r = 0; r < R; ++r) {
      first[size_t(r)] = std::min(std::max<int64_t>(P + depth_of((r_lo + r) % a.N) - a.window + 1, 0), P);
      lo = std::min(lo, first[size_t(r)]);
    }
  }

  // fp32 views of q, K and V from slot lo on (bf16 is widened once here; fp32 is read in place)
  const bool widen = !std::is_same<T, float>::value;
  const int64_t span = keys - lo;
  buf.resize(size_t(R * D + R * keys + (widen ? 2 * span * D : 0)));
  float* qf = buf.data();
  float* score = qf + R * D;                  // [R, keys]: each row's visible keys packed in position order
  const float* kf = reinterpret_cast<const float*>(K + lo * D);   // key slot j: kf + (j - lo) * D
  const float* vf = reinterpret_cast<const float*>(V + lo * D);
  if (widen) {
    float* w = score + R * keys;
    load_rows<L>(K + lo * D, w, span * D);
    load_rows<L>(V + lo * D, w + span * D, span * D);
    kf = w;
    vf = w + span * D;
  }
  for (int64_t r = 0; r < R; ++r) {            // row r_lo + r = g * N + n: query head hk * G + g, new token n
    const int64_t gn = r_lo + r;
    load_rows<L>(static_cast<const T*>(a.q) + b * a.q_sb + (hk * G + gn / a.N) * a.q_sh + (gn % a.N) * a.q_sn,
                 qf + r * D, D);
  }

  // scores: every row sees the prefix from lo, then the new tokens whose bit it has, in node (= depth) order
  int64_t j0 = lo;
#if AMPHISTA_X86
  if (isa() == Isa::kAvx512 && D % 16 == 0)
    for (; j0 + 16 <= P; j0 += 16)  // a 16-key tile of K serves every row
      for (int64_t r = 0; r < R; ++r) dot16(qf + r * D, kf + (j0 - lo) * D, D, a.scale, score + r * keys + j0);
  if (isa() == Isa::kAvx2 && D % 16 == 0)
    for (; j0 + 8 <= P; j0 += 8)
      for (int64_t r = 0; r < R; ++r) dot8(qf + r * D, kf + (j0 - lo) * D, D, a.scale, score + r * keys + j0);
#endif
  for (int64_t j = j0; j < P; ++j)
    for (int64_t r = 0; r < R; ++r) score[r * keys + j] = dot(qf + r * D, kf + (j - lo) * D, D) * a.scale;
  auto sees = [&](int64_t r, int64_t j) {    // row r sees new token j: its ancestor (or itself), inside its window
    const int64_t n = (r_lo + r) % a.N;
    return ((uint64_t(bits[n]) >> j) & 1u) && (a.window <= 0 || depth_of(j) > depth_of(n) - a.window);
  };
  std::vector<int64_t> seen(size_t(R), P);
  for (int64_t j = 0; j < a.N; ++j)
    for (int64_t r = 0; r < R; ++r)
      if (sees(r, j)) score[r * keys + seen[size_t(r)]++] = dot(qf + r * D, kf + (P + j - lo) * D, D) * a.scale;

  std::vector<float> inv_sum(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    float* s = score + r * keys + first[size_t(r)];
    const int64_t n = seen[size_t(r)] - first[size_t(r)];
    float top[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) top[k] = -std::numeric_limits<float>::infinity();
    int64_t i0 = 0;
    for (; i0 + kLanes <= n; i0 += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) top[k] = std::max(top[k], s[i0 + k]);
    for (int64_t k = 0; i0 + k < n; ++k) top[k] = std::max(top[k], s[i0 + k]);
    float m = top[0];
    for (int64_t k = 1; k < kLanes; ++k) m = std::max(m, top[k]);   // max is exact in any order
    float part[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t k = 0; k < kLanes; ++k) {
        s[i + k] = exp_approx(s[i + k] - m);
        part[k] += s[i + k];
      }
    for (int64_t k = 0; i + k < n; ++k) {
      s[i + k] = exp_approx(s[i + k] - m);
      part[k] += s[i + k];
    }
    inv_sum[size_t(r)] = n > 0 ? 1.f / reduce_lanes(part) : 0.f;   // a row no key reached: zeros, like SDPA
  }

  // Values in the same order as the scores: the prefix for RB rows at a time (each V row read once for them),
  // then each row's own ancestors; every row's sum runs in key order whatever it shares a block with.
  constexpr int64_t RB = DC == 64 ? 4 : DC == 128 ? 2 : 1;
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int64_t rb_n = std::min(RB, R - r0);
    float acc[RB][DC ? DC : kMaxDynamicD];  // local: the compiler keeps it in registers (it aliases nothing)
    for (int64_t rb = 0; rb < RB; ++rb)
      for (int64_t d = 0; d < D; ++d) acc[rb][d] = 0.f;
    bool shared = rb_n == RB;                // the block's rows start at one slot (always without a window)
    for (int64_t rb = 1; rb < rb_n; ++rb) shared &= first[size_t(r0 + rb)] == first[size_t(r0)];
    if (shared) {
      for (int64_t i2 = first[size_t(r0)]; i2 < P; ++i2) {
        const float* v = vf + (i2 - lo) * D;
        for (int64_t rb = 0; rb < RB; ++rb) {
          const float w = score[(r0 + rb) * keys + i2];
          for (int64_t d = 0; d < D; ++d) acc[rb][d] += w * v[d];
        }
      }
    } else {
      for (int64_t rb = 0; rb < rb_n; ++rb)
        for (int64_t i2 = first[size_t(r0 + rb)]; i2 < P; ++i2) {
          const float w = score[(r0 + rb) * keys + i2];
          const float* v = vf + (i2 - lo) * D;
          for (int64_t d = 0; d < D; ++d) acc[rb][d] += w * v[d];
        }
    }
    for (int64_t rb = 0; rb < rb_n; ++rb) {
      const int64_t r = r0 + rb;
      const float* s = score + r * keys;
      int64_t i3 = P;
      for (int64_t j = 0; j < a.N; ++j)
        if (sees(r, j)) {
          const float w = s[i3++];
          const float* v = vf + (P + j - lo) * D;
          for (int64_t d = 0; d < D; ++d) acc[rb][d] += w * v[d];
        }
      T* out = static_cast<T*>(a.out) + ((b * a.N + (r_lo + r) % a.N) * a.H + hk * G + (r_lo + r) / a.N) * D;
      for (int64_t d = 0; d < D; ++d) L::store(out, d, acc[rb][d] * inv_sum[size_t(r)]);
    }
  }
}

template <class L>
AMPHISTA_INLINE void tree_attention_units(const TreeAttentionArgs& a, int64_t u0, int64_t u1) {
  std::vector<float> buf;
  const int64_t R = a.H / a.H_kv * a.N, rows_per_unit = a.by_rows ? 1 : R;
  // The units' query rows [g0, g1) of all B * H_kv * R: each (row, KV head) they touch computes its share.
  const int64_t g0 = u0 * rows_per_unit, g1 = u1 * rows_per_unit;
  for (int64_t bh = g0 / R; bh * R < g1; ++bh) {
    const int64_t b = bh / a.H_kv, hk = bh % a.H_kv;
    const int64_t lo = std::max(g0, bh * R) - bh * R, hi = std::min(g1, (bh + 1) * R) - bh * R;
    if (a.D == 64) tree_attention_unit<L, 64>(a, b, hk, lo, hi, buf);
    else if (a.D == 128) tree_attention_unit<L, 128>(a, b, hk, lo, hi, buf);
    else tree_attention_unit<L, 0>(a, b, hk, lo, hi, buf);
  }
}


AMPHISTA_ISA_VARIANTS(tree_attention_f32, TreeAttentionArgs, tree_attention_units<F32>(a, r0, r1))
AMPHISTA_ISA_VARIANTS(tree_attention_bf16, TreeAttentionArgs, tree_attention_units<BF16>(a, r0, r1))

inline void tree_attention(const TreeAttentionArgs& a, DType dtype, int64_t threads) {
  const int64_t G = a.H / a.H_kv;
  int64_t longest = 0;
  for (int64_t b = 0; b < a.B; ++b) longest = std::max(longest, a.prefix_len[b]);
  if (a.window > 0) longest = std::min(longest, a.window + a.N);   // a unit reads about this many prefix keys
  // Units (row, KV head) are independent: threads only change who computes one, never its result. Fewer of
  // them than a multiple of the threads (SmolLM2: 3 KV heads on 2 threads) leaves a thread idle for up to a
  // unit, so then the units are single query rows, handed out in contiguous runs: a (row, KV head) split between
  // two threads has its keys read by both, the others once. (Splitting every unit's rows in two parts read all
  // keys twice: SmolLM2's attention at a 2048-token prefix, where it is most of a step, took ~7% longer on two
  // Zen 3 cores.)
  TreeAttentionArgs u = a;
  const int64_t units = a.B * a.H_kv, team = std::max<int64_t>(threads, 1), rows = G * a.N;
  u.by_rows = !(units % team == 0 || units >= 4 * team) && rows > 1;
  const int64_t per = u.by_rows ? rows : 1;
  parallel_rows(units * per, 4 * G * a.N * (longest + a.N) * a.D / per, threads, [&](int64_t u0, int64_t u1) {
    if (dtype == DType::kFloat32) tree_attention_f32(u, u0, u1);
    else tree_attention_bf16(u, u0, u1);
  });
}

}  // namespace amphista_cpu

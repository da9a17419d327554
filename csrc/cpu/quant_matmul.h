// Products with 4-bit and 8-bit weights for a few rows (ops.quant_linear on the cpu backend, and decoder.h): the
// CPU's 4-bit decode path, where a step is all weight products.
//
// Why our own: torch's int4 CPU kernel costs about as much per row as for one row (a 16-row tree step: 6-7x a
// plain step; the int8 LM head 5x), so verifying a tree on a CPU cost what it saves. Here the weights are
// decoded once per tile and used by every row of the call, with integer dot products (AVX-512 VNNI's
// vpdpbusd: 64 multiply-adds an instruction; vpmaddubsw + vpmaddwd on AVX2), as llama.cpp does for GGUF files:
// each row's activations are rounded to int8 in groups of 32 with one fp32 scale each (Q8_0's rule,
// x ~ sx * xq, |xq| <= 127). Measured: 2-4x torch's int4 kernel for 1-64 rows on one AVX-512 core, and a 4-row
// call ~1.3-1.7x a 1-row call with the weights streaming from memory (benchmarks/kernels/quant_linear.py).
//
// Exactness: the integer sums are exact, so their order is free; the fp32 part runs per output element in one
// fixed order over the groups (t = float(idot) * s; t = fma(z, isum, t); acc = fma(sx, t, acc)), the same
// operations in every variant and every tiling. A row's result is the same bits whatever the row count, the
// thread count or the vector unit: what speculative == plain greedy on 4-bit weights rests on.
//
// Layouts (packed by cpu_ops.pack_int4 / pack_int8, columns padded to a multiple of 64):
//   int4 codes  [N/16][G][4][64] bytes, G = K/32: chunk c of group g holds k = 32g + 8c .. 32g + 8c + 7 of 16
//               columns, byte 4n + j: low nibble k = 8c + j, high nibble k = 8c + 4 + j (code in 0..15)
//   int4 scales [N/16][G][2][16] fp16: s, then z, with w = code * s + z
//   int8 codes  [N/16][K/4][64] bytes, byte 4n + j = w[n, 4q + j] + 128; one fp32 scale per column
// so that one 64-byte load holds 4 consecutive k of 16 columns: vpdpbusd's operand, with the row's 4 int8
// activations broadcast.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#if AMPHISTA_X86
// GCC 12's own _mm512_undefined_ps (behind _mm512_cvtph_ps, _mm512_cvtepi32_ps) trips this warning.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif


namespace amphista_cpu {

constexpr int64_t kQuantGroup = 32;
constexpr int64_t kColBlock = 16;
constexpr int64_t kColPad = 64;  // packed columns are padded to this (the widest column tile)

AMPHISTA_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = float(man) * 5.9604644775390625e-8f;  // subnormal: man * 2^-24, exact
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u |= sign;
    std::memcpy(&f, &u, 4);
    return f;
  }
  const uint32_t u = sign | (exp == 31 ? (0xffu << 23) | (man << 13) : ((exp + 112) << 23) | (man << 13));
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- activations -> int8 --------------------------------------------------------------------------------
struct QuantizeArgs {
  const void* x;  // [rows, K] (row stride x_stride elements), fp32 or bf16
  int64_t x_stride;
  int8_t* xq;     // [rows, K]
  float* sx;      // [rows, K / 32]
  int32_t* isum;  // [rows, K / 32]: sum of the group's xq
  int64_t rows, K;
};

template <class L>
AMPHISTA_INLINE void quantize_rows(const QuantizeArgs& a, int64_t r0, int64_t r1) {
  using T = typename L::T;
  const int64_t G = a.K / kQuantGroup;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
    for (int64_t g = 0; g < G; ++g) {
      float v[kQuantGroup];
      float amax = 0.f;
      for (int64_t i = 0; i < kQuantGroup; ++i) {
        v[i] = L::load(x, g * kQuantGroup + i);
        amax = std::max(amax, std::fabs(v[i]));
      }
      // 127 / amax, then a product per element: IEEE-rounded the same everywhere; nearbyint rounds to even.
      const float inv = amax > 0.f && std::isfinite(amax) ? 127.f / amax : 0.f;
      int8_t* q = a.xq + r * a.K + g * kQuantGroup;
      int32_t s = 0;
      for (int64_t i = 0; i < kQuantGroup; ++i) {
        const float t = std::min(std::max(std::nearbyint(v[i] * inv), -127.f), 127.f);
        q[i] = int8_t(t);
        s += int32_t(t);
      }
      a.sx[r * G + g] = std::isfinite(amax) ? amax / 127.f : amax;  // inf / NaN input: the output says so
      a.isum[r * G + g] = s;
    }
  }
}

AMPHISTA_ISA_VARIANTS(quantize_rows_f32, QuantizeArgs, quantize_rows<F32>(a, r0, r1))
AMPHISTA_ISA_VARIANTS(quantize_rows_bf16, QuantizeArgs, quantize_rows<BF16>(a, r0, r1))

// ---- the products ----------------------------------------------------------------------------------------
struct QuantMatmulArgs {
  const int8_t* xq;      // [M, K]
  const float* sx;       // [M, G]
  const int32_t* isum;   // [M, G]
  const float* isumf;    // [M, G]: the same sums as floats (exact), read by the 4-bit kernels
  const uint8_t* codes;  // layouts above
  const void* scales;    // int4: fp16 [N/16][G][2][16]; int8: fp32 [N_pad]
  void* out;             // [M, N] (row stride out_stride elements), fp32 or bf16
  int64_t out_stride;
  int64_t M, K, N;
  DType out_dtype;
};

AMPHISTA_INLINE void store_cols(const QuantMatmulArgs& a, int64_t m, int64_t n0, const float* v, int64_t cols) {
  const int64_t n = std::min<int64_t>(cols, a.N - n0);
  if (a.out_dtype == DType::kFloat32) {
    float* o = static_cast<float*>(a.out) + m * a.out_stride + n0;
    for (int64_t i = 0; i < n; ++i) o[i] = v[i];
  } else {
    uint16_t* o = static_cast<uint16_t*>(a.out) + m * a.out_stride + n0;
    for (int64_t i = 0; i < n; ++i) o[i] = float_to_bf16(v[i]);
  }
}

// Portable form (the AVX2 and baseline variants, and AVX-512 CPUs without VNNI): one 16-column block at a time.
template <bool kInt4>
AMPHISTA_INLINE void quant_matmul_generic(const QuantMatmulArgs& a, int64_t b0, int64_t b1) {
  const int64_t G = a.K / kQuantGroup;
  for (int64_t nb = b0; nb < b1; ++nb) {
    float s[kColBlock], z[kColBlock];
    if (!kInt4)
      for (int64_t n = 0; n < kColBlock; ++n) s[n] = static_cast<const float*>(a.scales)[nb * kColBlock + n];
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* x = a.xq + m * a.K;
      float acc[kColBlock] = {};
      for (int64_t g = 0; g < G; ++g) {
        int32_t idot[kColBlock] = {};
        if (kInt4) {
          const uint16_t* sz = static_cast<const uint16_t*>(a.scales) + (nb * G + g) * 2 * kColBlock;
          for (int64_t n = 0; n < kColBlock; ++n) {
            s[n] = half_to_float(sz[n]);
            z[n] = half_to_float(sz[kColBlock + n]);
          }
          for (int64_t c = 0; c < 4; ++c) {
            const uint8_t* ch = a.codes + ((nb * G + g) * 4 + c) * 64;
            const int8_t* xc = x + g * kQuantGroup + 8 * c;
            for (int64_t n = 0; n < kColBlock; ++n)
              for (int64_t j = 0; j < 4; ++j)
                idot[n] += int32_t(ch[4 * n + j] & 15) * xc[j] + int32_t(ch[4 * n + j] >> 4) * xc[4 + j];
          }
          const float is = a.isumf[m * G + g], sxg = a.sx[m * G + g];
          for (int64_t n = 0; n < kColBlock; ++n) {
            const float t = std::fma(z[n], is, float(idot[n]) * s[n]);
            acc[n] = std::fma(sxg, t, acc[n]);
          }
        } else {
          for (int64_t c = 0; c < 8; ++c) {
            const uint8_t* ch = a.codes + ((nb * (a.K / 4)) + g * 8 + c) * 64;
            const int8_t* xc = x + g * kQuantGroup + 4 * c;
            for (int64_t n = 0; n < kColBlock; ++n)
              for (int64_t j = 0; j < 4; ++j) idot[n] += int32_t(ch[4 * n + j]) * xc[j];
          }
          const int32_t off = 128 * a.isum[m * G + g];
          const float sxg = a.sx[m * G + g];
          for (int64_t n = 0; n < kColBlock; ++n) acc[n] = std::fma(sxg, float(idot[n] - off), acc[n]);
        }
      }
      if (!kInt4)
        for (int64_t n = 0; n < kColBlock; ++n) acc[n] *= s[n];
      store_cols(a, m, nb * kColBlock, acc, kColBlock);
    }
  }
}

#if AMPHISTA_X86
#define AMPHISTA_TARGET_VNNI \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")))

// A tile of NB column blocks x MR rows with everything in registers. Without enough independent vpdpbusd
// chains (NB * MR < 8) each block's chain is split in two (low and high nibbles / even and odd quads): integer
// sums, so the split changes no bit.
template <bool kInt4, int NB, int MR>
AMPHISTA_TARGET_VNNI inline void vnni_tile(const QuantMatmulArgs& a, int64_t nb0, int64_t m0) {
  constexpr bool kSplit = NB * MR < 8;
  const int64_t G = a.K / kQuantGroup;
  const int32_t* x32[MR];
  for (int r = 0; r < MR; ++r) x32[r] = reinterpret_cast<const int32_t*>(a.xq + (m0 + r) * a.K);
  __m512 acc[NB][MR];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < MR; ++r) acc[b][r] = _mm512_setzero_ps();
  const __m512i nib = _mm512_set1_epi8(15);
  for (int64_t g = 0; g < G; ++g) {
    __m512i d0[NB][MR], d1[NB][MR];
    for (int b = 0; b < NB; ++b)
      for (int r = 0; r < MR; ++r) {
        d0[b][r] = _mm512_setzero_si512();
        if (kSplit) d1[b][r] = _mm512_setzero_si512();
      }
    if (kInt4) {
      for (int c = 0; c < 4; ++c)
        for (int b = 0; b < NB; ++b) {
          const __m512i v = _mm512_loadu_si512(a.codes + (((nb0 + b) * G + g) * 4 + c) * 64);
          const __m512i lo = _mm512_and_si512(v, nib);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
          for (int r = 0; r < MR; ++r) {
            const int64_t quad = g * 8 + 2 * c;
            d0[b][r] = _mm512_dpbusd_epi32(d0[b][r], lo, _mm512_set1_epi32(x32[r][quad]));
            if (kSplit)
              d1[b][r] = _mm512_dpbusd_epi32(d1[b][r], hi, _mm512_set1_epi32(x32[r][quad + 1]));
            else
              d0[b][r] = _mm512_dpbusd_epi32(d0[b][r], hi, _mm512_set1_epi32(x32[r][quad + 1]));
          }
        }
      for (int b = 0; b < NB; ++b) {
        const uint16_t* sz = static_cast<const uint16_t*>(a.scales) + ((nb0 + b) * G + g) * 2 * kColBlock;
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz)));
        const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + kColBlock)));
        for (int r = 0; r < MR; ++r) {
          const __m512i d = kSplit ? _mm512_add_epi32(d0[b][r], d1[b][r]) : d0[b][r];
          const int64_t i = (m0 + r) * G + g;
          __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(d), s);
          t = _mm512_fmadd_ps(z, _mm512_set1_ps(a.isumf[i]), t);
          acc[b][r] = _mm512_fmadd_ps(_mm512_set1_ps(a.sx[i]), t, acc[b][r]);
        }
      }
    } else {
      for (int c = 0; c < 8; ++c)
        for (int b = 0; b < NB; ++b) {
          const __m512i v = _mm512_loadu_si512(a.codes + ((nb0 + b) * (a.K / 4) + g * 8 + c) * 64);
          for (int r = 0; r < MR; ++r) {
            const __m512i xb = _mm512_set1_epi32(x32[r][g * 8 + c]);
            if (kSplit && (c & 1))
              d1[b][r] = _mm512_dpbusd_epi32(d1[b][r], v, xb);
            else
              d0[b][r] = _mm512_dpbusd_epi32(d0[b][r], v, xb);
          }
        }
      for (int b = 0; b < NB; ++b)
        for (int r = 0; r < MR; ++r) {
          const int64_t i = (m0 + r) * G + g;
          __m512i d = kSplit ? _mm512_add_epi32(d0[b][r], d1[b][r]) : d0[b][r];
          d = _mm512_sub_epi32(d, _mm512_set1_epi32(128 * a.isum[i]));
          acc[b][r] = _mm512_fmadd_ps(_mm512_set1_ps(a.sx[i]), _mm512_cvtepi32_ps(d), acc[b][r]);
        }
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t n0 = (nb0 + b) * kColBlock;
    if (n0 >= a.N) break;
    __m512 s = _mm512_set1_ps(1.f);
    if (!kInt4) s = _mm512_loadu_ps(static_cast<const float*>(a.scales) + n0);
    for (int r = 0; r < MR; ++r) {
      alignas(64) float v[kColBlock];
      _mm512_store_ps(v, kInt4 ? acc[b][r] : _mm512_mul_ps(acc[b][r], s));
      store_cols(a, m0 + r, n0, v, kColBlock);
    }
  }
}

// Column blocks [b0, b1) of every row; b0 and b1 multiples of 4 (or b1 = all blocks, a multiple of 4 too).
template <bool kInt4>
AMPHISTA_TARGET_VNNI inline void quant_matmul_vnni(const QuantMatmulArgs& a, int64_t b0, int64_t b1) {
  if (a.M == 1) {
    for (int64_t nb = b0; nb < b1; nb += 4) vnni_tile<kInt4, 4, 1>(a, nb, 0);
    return;
  }
  // 5-7 rows in one tile: as a 4-row tile and a tile of the rest, the rest cost nearly what a lone row does
  // (w13 of SmolLM2, 5 rows: 43 -> 38 us, 6 rows: 49 -> 44 us on two Xeon cores)
  switch (a.M) {
    case 5: for (int64_t nb = b0; nb < b1; nb += 2) vnni_tile<kInt4, 2, 5>(a, nb, 0); return;
    case 6: for (int64_t nb = b0; nb < b1; nb += 2) vnni_tile<kInt4, 2, 6>(a, nb, 0); return;
    case 7: for (int64_t nb = b0; nb < b1; ++nb) vnni_tile<kInt4, 1, 7>(a, nb, 0); return;
    default: break;
  }
  // Column tiles outer, rows inner: a tile's weights (2 x 16 columns) stay in L1 while every row uses them.
  for (int64_t nb = b0; nb < b1; nb += 2) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) vnni_tile<kInt4, 2, 4>(a, nb, m);
    switch (a.M - m) {
      case 3: vnni_tile<kInt4, 2, 3>(a, nb, m); break;
      case 2: vnni_tile<kInt4, 2, 2>(a, nb, m); break;
      case 1: vnni_tile<kInt4, 2, 1>(a, nb, m); break;
      default: break;
    }
  }
}

// The same tiles for AVX2 (and AVX-512 CPUs without VNNI): vpmaddubsw + vpmaddwd make vpdpbusd's sums of four
// u8 x s8 products (pairs in int16: at most 2 * 15 * 127 for 4-bit codes, no saturation), on 8 columns a register
// (half of a 64-byte chunk). The 8-bit codes (w + 128 up to 255) would saturate a pair, so there the signed weight's
// magnitude multiplies the activation carrying its sign (|w| <= 127), which gives dot(w, x) directly: the VNNI
// tiles' dot(w + 128, x) - 128 isum, the same integer. The fp32 part is the same operations per output.
#define AMPHISTA_TARGET_AVX2_F16C __attribute__((target("avx2,fma,f16c,bmi2")))

// Software prefetch for the AVX2 tiles, this far ahead in each 16-column block's stream of codes (a block's groups
// are contiguous and the next block follows it, so the lines ahead are what the thread reads next). The cores'
// own prefetchers left a step's products at ~15 GB/s of the ~31 GB/s that two Zen 3 cores read: each product is
// short, and its arithmetic does not overlap the loads it waits on. Measured there, interleaved in one process
// (4 KiB, 8 KiB, 16 KiB ahead): the plain SmolLM2 forward ~10% faster, a 4-row one ~5%, best at ~8 KiB; end to end
// plain decoding 1.15x, mix-4 1.07x (benchmarks/results/cpu_avx2_prefetch_ab).
constexpr int64_t kPrefetchBytes = 8192;

template <bool kInt4>
AMPHISTA_TARGET_AVX2_F16C AMPHISTA_INLINE void prefetch_block_group(const QuantMatmulArgs& a, int64_t nb, int64_t g) {
  // A group of a block: int4, 4 lines of codes + 1 of scales; int8, 8 lines of codes (scales are per column).
  constexpr int64_t kCodeBytes = kInt4 ? 4 * 64 : 8 * 64, ahead = kPrefetchBytes / kCodeBytes;
  const int64_t G = a.K / kQuantGroup, gi = nb * G + g + ahead;
  const char* line = reinterpret_cast<const char*>(a.codes) + gi * kCodeBytes;
  for (int64_t i = 0; i < kCodeBytes; i += 64) _mm_prefetch(line + i, _MM_HINT_T0);
  if (kInt4)
    _mm_prefetch(reinterpret_cast<const char*>(static_cast<const uint16_t*>(a.scales) + gi * 2 * kColBlock),
                 _MM_HINT_T0);
}

template <bool kInt4, int NH, int MR>
AMPHISTA_TARGET_AVX2_F16C inline void avx2_tile(const QuantMatmulArgs& a, int64_t h0, int64_t m0) {
  const int64_t G = a.K / kQuantGroup;
  const int32_t* x32[MR];
  for (int r = 0; r < MR; ++r) x32[r] = reinterpret_cast<const int32_t*>(a.xq + (m0 + r) * a.K);
  __m256 acc[NH][MR];
  for (int h = 0; h < NH; ++h)
    for (int r = 0; r < MR; ++r) acc[h][r] = _mm256_setzero_ps();
  const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  // Only the first pass over a block's codes reads memory: the second half-block and later row blocks find them
  // in L1/L2.
  const bool fetches = m0 == 0 && (NH > 1 || h0 % 2 == 0);
  for (int64_t g = 0; g < G; ++g) {
    if (fetches)
      for (int h = 0; h < NH; h += 2) prefetch_block_group<kInt4>(a, (h0 + h) / 2, g);
    __m256i d[NH][MR], d16[NH][MR];
    if (kInt4) {
      // A group's 8 vpmaddubsw results add up in int16 (at most 8 * 2 * 15 * 127 = 30480: no overflow), widened
      // once per group: 9 multiplies per row and 32 inputs instead of 16.
      for (int h = 0; h < NH; ++h)
        for (int r = 0; r < MR; ++r) d16[h][r] = _mm256_setzero_si256();
      // Not unrolled: GCC 12 then hoists all the chunks' products ahead of their sums and spills ~20 registers.
#pragma GCC unroll 1
      for (int c = 0; c < 4; ++c) {
        __m256i lo[NH], hi[NH];
        for (int h = 0; h < NH; ++h) {
          const int64_t nb = (h0 + h) / 2, half = (h0 + h) % 2;
          const __m256i v = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(a.codes + ((nb * G + g) * 4 + c) * 64 + 32 * half));
          lo[h] = _mm256_and_si256(v, nib);
          hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        }
        for (int r = 0; r < MR; ++r) {
          const __m256i xl = _mm256_set1_epi32(x32[r][g * 8 + 2 * c]);
          const __m256i xh = _mm256_set1_epi32(x32[r][g * 8 + 2 * c + 1]);
          for (int h = 0; h < NH; ++h) {
            d16[h][r] = _mm256_add_epi16(d16[h][r], _mm256_maddubs_epi16(lo[h], xl));
            d16[h][r] = _mm256_add_epi16(d16[h][r], _mm256_maddubs_epi16(hi[h], xh));
          }
        }
      }
    } else {
      for (int h = 0; h < NH; ++h)
        for (int r = 0; r < MR; ++r) d[h][r] = _mm256_setzero_si256();
    }
    for (int h = 0; h < NH; ++h) {
      const int64_t nb = (h0 + h) / 2, half = (h0 + h) % 2;  // 16-column block, and which 8 columns of it
      if (kInt4) {
        const uint16_t* sz = static_cast<const uint16_t*>(a.scales) + (nb * G + g) * 2 * kColBlock + 8 * half;
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sz)));
        const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sz + kColBlock)));
        for (int r = 0; r < MR; ++r) {
          const int64_t i = (m0 + r) * G + g;
          __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d16[h][r], ones)), s);
          t = _mm256_fmadd_ps(z, _mm256_set1_ps(a.isumf[i]), t);
          acc[h][r] = _mm256_fmadd_ps(_mm256_set1_ps(a.sx[i]), t, acc[h][r]);
        }
      } else {
#pragma GCC unroll 1
        for (int c = 0; c < 8; ++c) {
          const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              a.codes + (nb * (a.K / 4) + g * 8 + c) * 64 + 32 * half)), flip);   // w + 128 -> w
          const __m256i aw = _mm256_abs_epi8(ws);
          for (int r = 0; r < MR; ++r) {
            const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(x32[r][g * 8 + c]), ws);
            d[h][r] = _mm256_add_epi32(d[h][r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones));
          }
        }
        for (int r = 0; r < MR; ++r) {
          const int64_t i = (m0 + r) * G + g;
          acc[h][r] = _mm256_fmadd_ps(_mm256_set1_ps(a.sx[i]), _mm256_cvtepi32_ps(d[h][r]), acc[h][r]);
        }
      }
    }
  }
  for (int h = 0; h < NH; ++h) {
    const int64_t nb = (h0 + h) / 2, half = (h0 + h) % 2, n0 = nb * kColBlock + 8 * half;
    if (n0 >= a.N) break;
    __m256 s = _mm256_set1_ps(1.f);
    if (!kInt4) s = _mm256_loadu_ps(static_cast<const float*>(a.scales) + n0);
    for (int r = 0; r < MR; ++r) {
      alignas(64) float v[kColBlock];
      _mm256_store_ps(v, kInt4 ? acc[h][r] : _mm256_mul_ps(acc[h][r], s));
      store_cols(a, m0 + r, n0, v, 8);
    }
  }
}

// Column blocks [b0, b1) of every row (multiples of 4 blocks, i.e. of 8 half-blocks).
template <bool kInt4>
AMPHISTA_TARGET_AVX2_F16C inline void quant_matmul_avx2(const QuantMatmulArgs& a, int64_t b0, int64_t b1) {
  if (a.M == 1) {
    for (int64_t h = 2 * b0; h < 2 * b1; h += 4) avx2_tile<kInt4, 4, 1>(a, h, 0);
    return;
  }
  // 8 columns x 4 rows: 16 registers hold no more. Measured against 16 x 2 and 16 x 3 (Zen 3): the same for
  // 4-bit codes, 1.3x faster for the int8 LM head at 4-16 rows.
  for (int64_t h = 2 * b0; h < 2 * b1; ++h) {
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) avx2_tile<kInt4, 1, 4>(a, h, m);
    switch (a.M - m) {
      case 3: avx2_tile<kInt4, 1, 3>(a, h, m); break;
      case 2: avx2_tile<kInt4, 1, 2>(a, h, m); break;
      case 1: avx2_tile<kInt4, 1, 1>(a, h, m); break;
      default: break;
    }
  }
}

inline bool has_avx2_f16c() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}

inline bool has_vnni() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c");
  }();
  return yes;
}
#endif

AMPHISTA_ISA_VARIANTS(int4_generic, QuantMatmulArgs, quant_matmul_generic<true>(a, r0, r1))
AMPHISTA_ISA_VARIANTS(int8_generic, QuantMatmulArgs, quant_matmul_generic<false>(a, r0, r1))

// out = x @ w.T for packed 4-bit (kInt4) or 8-bit weights. xq/sx/isum come from quantize_activations.
template <bool kInt4>
void quant_matmul(const QuantMatmulArgs& a, int64_t threads) {
  const int64_t blocks = (a.N + kColPad - 1) / kColPad * (kColPad / kColBlock);
  const int64_t tiles = blocks / 4;  // units of 4 blocks: every tiling above divides them
  // Split when a thread gets ~64K multiply-adds or more (a microsecond or two; the codes stream from memory at
  // least as long). At ~256K, SmolLM2's one-row wo (576 x 576) ran on one thread: plain decoding was 1.13x slower
  // on two Zen 3 cores (benchmarks/results/cpu_avx2_threads_ab).
  const int64_t per_thread = std::max<int64_t>(1, (int64_t(1) << 16) / (4 * kColBlock * a.K * a.M));
  parallel_for(tiles, per_thread, threads, [&](int64_t t0, int64_t t1) {
#if AMPHISTA_X86
    if (isa() == Isa::kAvx512 && has_vnni()) return quant_matmul_vnni<kInt4>(a, 4 * t0, 4 * t1);
    if (isa() != Isa::kBaseline && has_avx2_f16c()) return quant_matmul_avx2<kInt4>(a, 4 * t0, 4 * t1);
#endif
    if (kInt4)
      int4_generic(a, 4 * t0, 4 * t1);
    else
      int8_generic(a, 4 * t0, 4 * t1);
  });
}

inline void quantize_activations(const QuantizeArgs& a, DType dtype) {
  if (dtype == DType::kFloat32)
    quantize_rows_f32(a, 0, a.rows);
  else
    quantize_rows_bf16(a, 0, a.rows);
}

// out = x @ w.T, x [M, K] (row stride x_stride) in the output's dtype: the activations rounded to int8 into
// per-thread scratch (grown as needed: a step's calls reuse it), then the product. a.xq/sx/isum are filled here.
inline void quant_linear(int bits, const void* x, int64_t x_stride, QuantMatmulArgs a, int64_t threads) {
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> sx;
  thread_local std::vector<int32_t> isum;
  thread_local std::vector<float> isumf;
  xq.resize(size_t(a.M * a.K));
  sx.resize(size_t(a.M * (a.K / kQuantGroup)));
  isum.resize(sx.size());
  isumf.resize(sx.size());
  quantize_activations(QuantizeArgs{x, x_stride, xq.data(), sx.data(), isum.data(), a.M, a.K}, a.out_dtype);
  for (size_t i = 0; i < isum.size(); ++i) isumf[i] = float(isum[i]);
  a.xq = xq.data();
  a.sx = sx.data();
  a.isum = isum.data();
  a.isumf = isumf.data();
  if (bits == 4)
    quant_matmul<true>(a, threads);
  else
    quant_matmul<false>(a, threads);
}

}  // namespace amphista_cpu

// Tree-verification attention over a static KV cache (ops.tree_attention).
//
// Queries: N new tokens (tree nodes, 1..64) per request, H query heads sharing H_kv KV heads (GQA).
// Keys:    cache slots [0, prefix_len[b]) (the accepted prefix, seen by every node) and the N new slots
//          [prefix_len[b], prefix_len[b] + N), where node n sees new slot j iff bit j of bits[b][n] is set
//          (ancestor-or-self bitmask, one uint64 per node). V slots past prefix + N are never read (K slots up
//          to the host's window kv_len may be: their scores are masked out).
// Window:  optional (window > 0, a sliding layer past its window): node n sees only keys of position
//          > positions[b][n] - window, where prefix slot s holds position s and new slot prefix + j positions[b][j].
//          The splits then share the keys from the chunk of the block's lowest window start (at most its tree
//          slots), about window + N keys, instead of [0, kv_len).
// Output:  [B, N, H, D] contiguous (ops returns its [B, H, N, D] transposed view).
//
// Layout of the work (FlashAttention-2 style, tensor cores through mma.sync m16n8k16, fp32 accumulate):
//  * one block = 4 warps = 64 query rows of ONE (request, KV head); row r packs (node n, query head g of the
//    group) as n = r / G, g = r % G, so the G query heads of a KV head share every K/V byte loaded (GQA
//    packing: the 64-node tree on an MHA model fills one tile; decoding with G = 8 fills half a warp);
//  * the keys of a request are cut into 64-slot chunks and the chunks into `num_splits` contiguous ranges
//    (split-K, blockIdx.z): short trees over long prefixes would otherwise leave most SMs idle. Each split
//    writes an unnormalised partial output plus its row max and sum; the last split of a row tile to finish
//    merges them in the same launch (arrival counters), or a second kernel does. With one split the kernel
//    normalises and writes the output itself;
//  * per chunk, the block stages K and V (64 x D) in shared memory with cp.async 16-byte copies, each warp
//    computes its 16 x 64 score tile, masks it, runs the online softmax in registers (log2 domain) and
//    accumulates P V.
//
// Templates: element type (fp16, bf16) x head dim (64, 128) only.
#pragma once

#include "common.cuh"

namespace amphista {

struct TreeAttentionParams {
  const void* q;             // [B, H, N, D], element strides below, last dim contiguous
  const void* k;             // cache [>=B, H_kv, S, D], element strides below
  const void* v;
  const int64_t* prefix_len; // [B]
  const int64_t* bits;       // [B or 1, N] uint64 ancestor rows (row stride bits_sb, 0 = shared)
  void* out;                 // [B, N, H, D] contiguous
  float* work_o;             // [num_splits, B*N*H, D]  (num_splits > 1 only)
  float* work_ml;            // [2, num_splits, B*N*H]  row max (log2 domain) then row sum
  int* counters;             // [B*H_kv * row tiles] zeroed arrival counters: the last split merges in the kernel
                             // (and re-arms its counter); null: a second kernel merges (num_splits > 1 only)
  int64_t B, H, H_kv, N, D, kv_len;
  int64_t q_sb, q_sh, q_sn;
  int64_t k_sb, k_sh, k_ss;
  int64_t v_sb, v_sh, v_ss;
  int64_t bits_sb;
  const int64_t* positions;  // [B or 1, N] new tokens' positions (row stride pos_sb, 0 = shared); window > 0 only
  int64_t pos_sb;
  int64_t window;            // sliding window in positions; 0: none
  int64_t num_splits;
  float scale;               // softmax scale (natural-log domain)
};

// Host entry point (tree_attention.cu). Arguments are validated by the binding; returns the launch status.
cudaError_t tree_attention(const TreeAttentionParams& p, DType dtype, cudaStream_t stream);

#ifdef __CUDACC__
namespace tree_attn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerBlock = 16 * kWarps;
constexpr int kChunk = 64;  // keys per iteration = 8 n-tiles of the m16n8k16 MMA
constexpr int kPad = 8;     // extra elements per shared row: 16 bytes, so fragment loads hit distinct banks
constexpr float kLog2e = 1.4426950408889634f;

// D = A B + D for one 16x8x16 tile. Fragment ownership (PTX ISA, "mma.m16n8k16"), with g = lane / 4 and
// t = lane % 4: A a0 = (row g, cols 2t, 2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..);
// B b0 = (k rows 2t, 2t+1; col g), b1 = (k rows 2t + 8, 2t + 9; col g); C c0, c1 = (row g; cols 2t, 2t+1),
// c2, c3 = (row g + 8; cols 2t, 2t+1). Two 16-bit values per 32-bit register, lower index in the low half.
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <> __device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two 16-bit elements (lo at the lower index) -> one MMA operand register.
template <typename T>
__device__ __forceinline__ uint32_t pack_raw(T lo, T hi) {
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&lo)) |
         (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
}

// One element (row, d) of the merged output: sum_s 2^(m_s - m) O_s[d] / sum_s 2^(m_s - m) l_s over the splits of
// work_o / work_ml; splits whose range was empty carry m = -inf and weigh nothing. Loads go to L2 (.cg): the
// in-kernel merge reads partials other SMs wrote during the same launch.
template <typename T, int D>
__device__ __forceinline__ void merge_element(const TreeAttentionParams& p, int64_t rows, int64_t row, int d) {
  const float* ms = p.work_ml;
  const float* ls = p.work_ml + p.num_splits * rows;
  float mx = -INFINITY;
  for (int64_t s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, __ldcg(ms + s * rows + row));
  float num = 0.f, den = 0.f;
  if (mx != -INFINITY) {
    for (int64_t s = 0; s < p.num_splits; ++s) {
      const float w = exp2f(__ldcg(ms + s * rows + row) - mx);
      num += w * __ldcg(p.work_o + (s * rows + row) * D + d);
      den += w * __ldcg(ls + s * rows + row);
    }
  }
  static_cast<T*>(p.out)[row * D + d] = from_float<T>(den > 0.f ? num / den : 0.f);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) tree_attention_kernel(const TreeAttentionParams p) {
  constexpr int kStride = D + kPad;   // shared row stride in elements (a multiple of 8: rows stay 16-byte aligned)
  constexpr int kVecs = D / 8;        // 16-byte vectors per row
  constexpr int kKSteps = D / 16;     // MMA k-steps over the head dim for S = Q K^T
  constexpr int kDTiles = D / 8;      // MMA n-tiles over the head dim for O = P V
  __shared__ __align__(16) T k_s[kChunk * kStride];
  __shared__ __align__(16) T v_s[kChunk * kStride];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.y / p.H_kv, hk = blockIdx.y % p.H_kv;
  const int64_t G = p.H / p.H_kv;
  const int64_t rows = G * p.N;
  const int64_t split = blockIdx.z;
  const T* kb = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  // One chunk of K or V (64 x D) into shared memory as cp.async copies, all of them in flight at once (16
  // vectors a thread at D = 128; register-staged loads held only two, and waited on them). Slots at or past
  // `bound` are zero-filled. kThreads is a multiple of kVecs, so a thread copies the same 16-byte column
  // (vec) of keys key_t, key_t + kKeysPerPass, ...: one base address per thread, and a step per pass.
  constexpr int kKeysPerPass = kThreads / kVecs;
  static_assert(kThreads % kVecs == 0 && kChunk % kKeysPerPass == 0, "copy passes must tile the chunk");
  const int key_t = threadIdx.x / kVecs, vec_t = threadIdx.x % kVecs;
  const auto stage = [&](T* dst, const T* src, int64_t stride, int64_t c, int64_t bound) {
    const int64_t slot0 = c * kChunk + key_t;
    const T* from = src + slot0 * stride + vec_t * 8;
    T* to = dst + key_t * kStride + vec_t * 8;
#pragma unroll
    for (int it = 0; it < kChunk / kKeysPerPass; ++it) {
      const bool ok = slot0 + it * kKeysPerPass < bound;
      cp_async16(to + it * kKeysPerPass * kStride, ok ? from + it * kKeysPerPass * stride : src, ok);
    }
    cp_async_commit();
  };

  // The split ranges come from the host's window kv_len, not from the device's prefix length, so the first
  // K chunk is in flight before that length arrives (one round trip off every block's critical path; not with a
  // sliding window, whose first chunk depends on the rows' positions). K is
  // copied up to kv_len: keys past the row's own end are masked out of the scores, whatever they hold. V
  // waits for the length: it is zero-filled past the end, so stale or NaN slots cannot leak into 0 * NaN.
  // The keys this request has: the prefix and its N tree slots, never past the host's window.
  const bool slide = p.window > 0;
  int64_t c_begin, c_end, prefix, end;
  if (!slide) {
    const int64_t per_split = ceil_div(ceil_div(p.kv_len, kChunk), p.num_splits);
    c_begin = split * per_split;
    if (c_begin * kChunk < p.kv_len) stage(k_s, kb, p.k_ss, c_begin, p.kv_len);
    prefix = max(p.prefix_len[b], int64_t(0));
    end = min(prefix + p.N, p.kv_len);
    c_end = min(c_begin + per_split, ceil_div(max(end, int64_t(0)), kChunk));
  } else {
    // A sliding window: no key below the lowest window start of this block's rows is visible, so the splits
    // start at its chunk (never past the tree slots, whose positions are their own) and share about window + N
    // keys, the host's span; the last split runs to the row's end whatever the positions.
    prefix = max(p.prefix_len[b], int64_t(0));
    end = min(prefix + p.N, p.kv_len);
    const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
    const int64_t n_last = (min(tile0 + kRowsPerBlock, rows) - 1) / G;
    int64_t lo_min = prefix;
    for (int64_t n = tile0 / G; n <= n_last; ++n) lo_min = min(lo_min, p.positions[b * p.pos_sb + n] - p.window + 1);
    const int64_t span = min(p.kv_len, p.window + p.N + kChunk);
    const int64_t per_split = ceil_div(ceil_div(span, kChunk), p.num_splits);
    c_begin = max(lo_min, int64_t(0)) / kChunk + split * per_split;
    if (c_begin * kChunk < p.kv_len) stage(k_s, kb, p.k_ss, c_begin, p.kv_len);
    const int64_t c_row_end = ceil_div(max(end, int64_t(0)), kChunk);
    c_end = split == p.num_splits - 1 ? c_row_end : min(c_begin + per_split, c_row_end);
  }

  // This thread's two query rows: r0 = warp row g, r1 = g + 8.
  const int64_t warp_row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp * 16;
  const bool warp_active = warp_row0 < rows;
  int64_t row[2], node[2], head[2];
  bool valid[2];
  uint64_t bits[2];
  int64_t lo[2];       // the row's lowest visible key position (a sliding window), else 0
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row[i] = warp_row0 + g + 8 * i;
    valid[i] = row[i] < rows;
    node[i] = valid[i] ? row[i] / G : 0;
    head[i] = hk * G + (valid[i] ? row[i] % G : 0);
    bits[i] = valid[i] ? static_cast<uint64_t>(p.bits[b * p.bits_sb + node[i]]) : 0ull;
    lo[i] = slide && valid[i] ? p.positions[b * p.pos_sb + node[i]] - p.window + 1 : 0;
  }

  // Q as A fragments for all k-steps, straight from global memory (read once; 32-bit loads, the binding
  // checks 4-byte alignment). Rows past the tile's end are zeros.
  uint32_t qa[kKSteps][4];
  {
    const T* q = static_cast<const T*>(p.q);
    const T* qr[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) qr[i] = q + b * p.q_sb + head[i] * p.q_sh + node[i] * p.q_sn;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {       // cols 2t (a0, a1) and 2t + 8 (a2, a3)
#pragma unroll
        for (int i = 0; i < 2; ++i) {              // rows g (a0, a2) and g + 8 (a1, a3)
          const int col = ks * 16 + half * 8 + 2 * t;
          qa[ks][half * 2 + i] = (warp_active && valid[i]) ? *reinterpret_cast<const uint32_t*>(qr[i] + col) : 0u;
        }
      }
    }
  }

  const float scale_log2 = p.scale * kLog2e;
  float o[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running row max (log2 domain), the same in the row's 4 lanes
  float l[2] = {0.f, 0.f};              // running row sum, partial: this lane's columns only

  // FlashAttention-2's overlap with one buffer each for K and V: V(c) lands while S(c) = Q K(c)^T runs, and
  // K(c + 1) while O += P V(c) runs. Every thread commits the same groups (empty ones past the last chunk), so
  // wait<1> always means "all but the newest group": first K(c), then V(c).
  if (c_begin < c_end) stage(v_s, vb, p.v_ss, c_begin, end);
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t key0 = c * kChunk;
    cp_async_wait<1>();
    __syncthreads();  // K(c) is in shared memory for every warp

    // S = Q K^T for 16 rows x 64 keys: s[nt] is the n-tile of keys key0 + 8 nt .. + 7. Warps past the tile's
    // rows (warp-uniform) only help with the copies.
    float s[8][4];
    if (warp_active) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          // B = K^T: b0 = K[key 8nt + g][d = 16ks + 2t, +1], b1 = the same at d + 8: 32-bit shared loads.
          const T* kp = k_s + (nt * 8 + g) * kStride + ks * 16 + 2 * t;
          mma16816<T>(s[nt], qa[ks], *reinterpret_cast<const uint32_t*>(kp),
                      *reinterpret_cast<const uint32_t*>(kp + 8));
        }
      }

      // Mask and scale, then the online softmax per row (i = 0: row g, i = 1: row g + 8).
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int64_t key = key0 + nt * 8 + 2 * t + j;
            const int64_t rel = key - prefix;
            bool visible = key < end && (rel < 0 || ((bits[i] >> rel) & 1ull));
            if (slide && visible) visible = (rel < 0 ? key : p.positions[b * p.pos_sb + rel]) >= lo[i];
            float& x = s[nt][2 * i + j];
            x = visible ? x * scale_log2 : -INFINITY;
            mx = fmaxf(mx, x);
          }
        }
        // The row's 64 columns live in the 4 lanes of its quad (t = 0..3).
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[i], mx);
        // Nothing visible yet (m_new = -inf): keep everything at zero instead of computing inf - inf.
        const float base = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m[i] - base);  // m = -inf -> 0: there was nothing to rescale
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float& x = s[nt][2 * i + j];
            x = exp2f(x - base);  // masked: exp2(-inf) = 0
            sum += x;
          }
        }
        l[i] = l[i] * alpha + sum;
        m[i] = m_new;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o[dt][2 * i] *= alpha;
          o[dt][2 * i + 1] *= alpha;
        }
      }
    }
    __syncthreads();  // every warp is done reading K(c): its buffer takes K(c + 1)
    if (c + 1 < c_end) stage(k_s, kb, p.k_ss, c + 1, p.kv_len); else cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // V(c) is in shared memory for every warp

    if (warp_active) {
      // O += P V. The C layout of two adjacent score n-tiles is exactly the A layout of one 16-key k-step.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t pa[4];
        pa[0] = pack2(s[2 * kk][0], s[2 * kk][1], T{});
        pa[1] = pack2(s[2 * kk][2], s[2 * kk][3], T{});
        pa[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], T{});
        pa[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], T{});
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          // B = V: b0 = V[key 16kk + 2t, +1][d = 8dt + g], b1 = keys + 8. Two 16-bit shared loads each.
          const T* vp = v_s + (kk * 16 + 2 * t) * kStride + dt * 8 + g;
          mma16816<T>(o[dt], pa, pack_raw(vp[0], vp[kStride]), pack_raw(vp[8 * kStride], vp[9 * kStride]));
        }
      }
    }
    __syncthreads();  // every warp is done reading V(c): its buffer takes V(c + 1)
    if (c + 1 < c_end) stage(v_s, vb, p.v_ss, c + 1, end); else cp_async_commit();
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits (K(c_begin) may be the
                       // only one: a split past the row's end)

  const int64_t out_rows = p.B * p.N * p.H;
  if (warp_active) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!valid[i]) continue;
      const int64_t orow = (b * p.N + node[i]) * p.H + head[i];  // [B, N, H] row of the output
      if (p.num_splits == 1) {
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        T* out = static_cast<T*>(p.out) + orow * D + 2 * t;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
          *reinterpret_cast<uint32_t*>(out + dt * 8) = pack2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv, T{});
      } else {
        float* wo = p.work_o + (split * out_rows + orow) * D + 2 * t;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
          *reinterpret_cast<float2*>(wo + dt * 8) = make_float2(o[dt][2 * i], o[dt][2 * i + 1]);
        if (t == 0) {
          p.work_ml[split * out_rows + orow] = m[i];
          p.work_ml[(p.num_splits + split) * out_rows + orow] = l[i];
        }
      }
    }
  }
  if (p.num_splits == 1 || p.counters == nullptr) return;  // block-uniform

  // In-kernel merge: the last split of this (request, KV head, row tile) to arrive merges the tile's rows
  // (stream-K style), saving the merge kernel's launch. Each thread's partial stores are made device-visible
  // before the barrier; thread 0's arrival then follows all of them, and the last arriver's fence orders its
  // loads (L2, .cg: other SMs wrote them) after every other split's arrival. It re-arms the counter for the
  // next launch: all the group's splits have arrived by then.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* counter = p.counters + static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    last = atomicAdd(counter, 1) == p.num_splits - 1;
    if (last) atomicExch(counter, 0);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t tile_rows = min(rows - tile0, int64_t(kRowsPerBlock));
  for (int64_t e = threadIdx.x; e < tile_rows * D; e += kThreads) {
    const int64_t r = tile0 + e / D;
    merge_element<T, D>(p, out_rows, (b * p.N + r / G) * p.H + hk * G + r % G, static_cast<int>(e % D));
  }
}

// The merge by a second launch: one block per output row, one thread per head-dim element.
template <typename T, int D>
__global__ void __launch_bounds__(D) tree_attention_merge_kernel(const TreeAttentionParams p) {
  merge_element<T, D>(p, p.B * p.N * p.H, blockIdx.x, threadIdx.x);
}

template <typename T, int D>
cudaError_t launch(const TreeAttentionParams& p, cudaStream_t stream) {
  const int64_t rows = (p.H / p.H_kv) * p.N;
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)), static_cast<unsigned>(p.B * p.H_kv),
                  static_cast<unsigned>(p.num_splits));
  tree_attention_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1 || p.counters != nullptr) return err;
  tree_attention_merge_kernel<T, D><<<static_cast<unsigned>(p.B * p.N * p.H), D, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace tree_attn
#endif  // __CUDACC__

}  // namespace amphista

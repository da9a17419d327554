// Greedy tree acceptance in one call (ops.greedy_accept on the cpu backend): each node's argmax over the
// vocabulary, the longest retrieve path whose every child is its parent's argmax (the first such path on ties),
// and the bonus token at its last node, as acceptance.greedy_accept does in ~20 torch ops (~0.4 ms a
// speculative step on a 2-core CPU, where a 4-bit plain step is ~5 ms).
//
// The argmax is the first maximum, NaN winning over any number (torch's max(dim) on CPU): plain decoding picks
// its token with that op, so a tree's accepted tokens stay what plain greedy decoding emits.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

namespace amphista_cpu {

struct GreedyAcceptArgs {
  const int64_t* tokens;     // [B, N]
  const void* logits;        // [B, N, V] contiguous
  const int64_t* retrieve;   // [B or 1, P, D1] node ids, -1 past a path's end
  int64_t retrieve_sb;       // 0: one set of paths for the batch
  int64_t* pred;             // [B, N] scratch: each node's argmax
  int64_t* accept_len;       // [B]
  int64_t* best_path;        // [B]
  int64_t* accepted_nodes;   // [B, D1]
  int64_t* next_token;       // [B]
  int64_t* emitted;          // [B, D1]
  int64_t B, N, V, P, D1;
};

// Two passes that vectorise: the maximum (exact in any order) and whether a NaN is present, then the first index
// holding it, scanned 16 at a time.
template <class L>
AMPHISTA_INLINE int64_t argmax_row(const typename L::T* x, int64_t V) {
  float top[kLanes];
  int32_t nan[kLanes] = {};
  for (int64_t k = 0; k < kLanes; ++k) top[k] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes)
    for (int64_t k = 0; k < kLanes; ++k) {
      const float v = L::load(x, i + k);
      top[k] = std::max(top[k], v);
      nan[k] |= int32_t(v != v);
    }
  for (int64_t k = 0; i + k < V; ++k) {
    const float v = L::load(x, i + k);
    top[k] = std::max(top[k], v);
    nan[k] |= int32_t(v != v);
  }
  float m = top[0];
  int32_t any_nan = nan[0];
  for (int64_t k = 1; k < kLanes; ++k) {
    m = std::max(m, top[k]);
    any_nan |= nan[k];
  }
  // the first NaN (torch's max(dim) returns one when the row has one), else the first entry equal to m
  int64_t j = 0;
  for (; j + kLanes <= V; j += kLanes) {
    int32_t hit = 0;
    for (int64_t k = 0; k < kLanes; ++k) {
      const float v = L::load(x, j + k);
      hit |= int32_t(any_nan ? v != v : v == m);
    }
    if (hit) break;
  }
  for (; j < V; ++j) {
    const float v = L::load(x, j);
    if (any_nan ? v != v : v == m) return j;
  }
  return 0;  // every entry -inf: the first
}

// AMPHISTA_INLINE: each vector-unit variant must get its own copy (outlined, the template was compiled once for
// the baseline and every variant called that: a 49k-entry row took ~26 us on an AVX-512 Xeon, ~18 us inlined).
template <class L>
AMPHISTA_INLINE void argmax_rows(const GreedyAcceptArgs& a, int64_t r0, int64_t r1) {
  using T = typename L::T;
  for (int64_t r = r0; r < r1; ++r) a.pred[r] = argmax_row<L>(static_cast<const T*>(a.logits) + r * a.V, a.V);
}

AMPHISTA_ISA_VARIANTS(argmax_rows_f32, GreedyAcceptArgs, argmax_rows<F32>(a, r0, r1))
AMPHISTA_ISA_VARIANTS(argmax_rows_bf16, GreedyAcceptArgs, argmax_rows<BF16>(a, r0, r1))

// The paths of rows [b0, b1), their nodes' argmax in a.pred already.
inline void walk_paths(const GreedyAcceptArgs& a, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t* tok = a.tokens + b * a.N;
    const int64_t* pred = a.pred + b * a.N;
    const int64_t* paths = a.retrieve + b * a.retrieve_sb;
    int64_t best = 0, longest = -1;
    for (int64_t p = 0; p < a.P; ++p) {
      const int64_t* r = paths + p * a.D1;
      int64_t len = 0;
      while (len + 1 < a.D1 && r[len + 1] >= 0 && r[len] >= 0 && tok[r[len + 1]] == pred[r[len]]) ++len;
      if (len > longest) {
        longest = len;
        best = p;
      }
    }
    const int64_t* r = paths + best * a.D1;
    const int64_t next = pred[std::max<int64_t>(r[longest], 0)];
    a.accept_len[b] = longest;
    a.best_path[b] = best;
    a.next_token[b] = next;
    for (int64_t j = 0; j < a.D1; ++j) {
      a.accepted_nodes[b * a.D1 + j] = j <= longest ? r[j] : -1;
      a.emitted[b * a.D1 + j] = j < longest ? tok[r[j + 1]] : j == longest ? next : -1;
    }
  }
}

// Every id of the `rows` sets of paths in [-1, N), every path starting at a node: what walk_paths indexes with.
inline bool paths_valid(const GreedyAcceptArgs& a, int64_t rows) {
  for (int64_t i = 0; i < rows * a.P * a.D1; ++i) {
    const int64_t id = a.retrieve[i];
    if (id < -1 || id >= a.N || (i % a.D1 == 0 && id < 0)) return false;
  }
  return true;
}

inline bool greedy_accept(const GreedyAcceptArgs& a, int64_t retrieve_rows, DType dtype, int64_t threads) {
  if (!paths_valid(a, retrieve_rows)) return false;
  parallel_rows(a.B * a.N, 2 * a.V, threads, [&](int64_t r0, int64_t r1) {
    if (dtype == DType::kFloat32)
      argmax_rows_f32(a, r0, r1);
    else
      argmax_rows_bf16(a, r0, r1);
  });
  walk_paths(a, 0, a.B);
  return true;
}

}  // namespace amphista_cpu

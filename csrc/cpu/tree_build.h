// A dynamic token tree per batch row in one call (ops.dynamic_tree on the cpu backend): tree.dynamic_tree_buffers'
// ~40 small torch ops cost 7% of a 4-bit dynamic-4 decode on a 2-core CPU (8.49 -> 7.91 ms a token end to end,
// benchmarks/results/cpu_dynamic_tree_native), here microseconds.
//
// The same algorithm step for step, so every output is the same integer the torch reference gives: a beam over the
// depths (scores summed in fp32 in the same order, stable descending sorts, so ties keep parent-beam then rank
// order), the top N - 1 of the pooled nodes, nodes ordered by (depth, path code), then parents, ancestor masks and
// bits, and the retrieve paths (leaves first, in node order, padding rows holding the root only).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "common.h"

namespace amphista_cpu {

struct DynamicTreeArgs {
  const float* values;     // [B, K, k] log-probs, each head's ranks in descending order
  const int64_t* indices;  // [B, K, k] their tokens
  const int64_t* root;     // [B]
  int64_t B, K, k, N;      // N tree nodes, the root included
  int64_t* tokens;         // [B, N]
  int64_t* depth;          // [B, N]
  int64_t* parent;         // [B, N]  -1 for the root
  int64_t* rank;           // [B, N]  -1 for the root
  int64_t* bits;           // [B, N]  ancestor-or-self bits (N <= 64), or null
  bool* mask;              // [B, N, N]
  int64_t* retrieve;       // [B, N - 1, D + 1], D = min(K, N - 1)
};

// Indices of v's first `keep` elements in a stable descending sort.
inline std::vector<int64_t> top_stable(const std::vector<float>& v, int64_t keep) {
  std::vector<int64_t> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return v[a] > v[b]; });
  order.resize(size_t(std::min<int64_t>(keep, int64_t(order.size()))));
  return order;
}

// False (nothing trusted) on a NaN score, whose order the reference's sort defines and a comparator cannot.
inline bool dynamic_tree_row(const DynamicTreeArgs& a, int64_t b) {
  const int64_t K = a.K, k = a.k, N = a.N, m = N - 1, D = std::min(K, m);
  const float* val = a.values + b * K * k;
  const int64_t* idx = a.indices + b * K * k;
  for (int64_t i = 0; i < K * k; ++i)
    if (std::isnan(val[i])) return false;
  std::vector<int64_t> pw(static_cast<size_t>(D + 1), 1);
  for (int64_t i = 1; i <= D; ++i) pw[size_t(i)] = pw[size_t(i - 1)] * k;

  // the beam over depths, and the pool of every depth's kept nodes (in depth order)
  std::vector<float> score{0.f}, pool_s;
  std::vector<int64_t> code{0}, pool_c, pool_d, pool_t;
  for (int64_t d = 1; d <= D; ++d) {
    std::vector<float> s;
    std::vector<int64_t> c, t;
    for (size_t p = 0; p < score.size(); ++p)
      for (int64_t r = 0; r < k; ++r) {
        s.push_back(score[p] + val[(d - 1) * k + r]);
        c.push_back(code[p] + r * pw[size_t(D - d)]);
        t.push_back(idx[(d - 1) * k + r]);
      }
    const std::vector<int64_t> keep = top_stable(s, m);
    score.clear();
    code.clear();
    for (int64_t i : keep) {
      score.push_back(s[size_t(i)]);
      code.push_back(c[size_t(i)]);
      pool_s.push_back(s[size_t(i)]);
      pool_c.push_back(c[size_t(i)]);
      pool_d.push_back(d);
      pool_t.push_back(t[size_t(i)]);
    }
  }
  const std::vector<int64_t> sel = top_stable(pool_s, m);

  // nodes by key = depth * k^D + code (unique), the root (key 0) first
  std::vector<int64_t> key{0}, cd{0}, dp{0}, tk{a.root[b]};
  for (int64_t i : sel) {
    key.push_back(pool_d[size_t(i)] * pw[size_t(D)] + pool_c[size_t(i)]);
    cd.push_back(pool_c[size_t(i)]);
    dp.push_back(pool_d[size_t(i)]);
    tk.push_back(pool_t[size_t(i)]);
  }
  std::vector<int64_t> order(key.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return key[size_t(x)] < key[size_t(y)]; });
  const size_t n = static_cast<size_t>(N);
  std::vector<int64_t> skey(n), code_n(n), depth_n(n), w(n);
  for (int64_t i = 0; i < N; ++i) {
    const size_t o = size_t(order[size_t(i)]);
    skey[size_t(i)] = key[o];
    code_n[size_t(i)] = cd[o];
    depth_n[size_t(i)] = dp[o];
    w[size_t(i)] = pw[size_t(D - dp[o])];
    a.tokens[b * N + i] = tk[o];
    a.depth[b * N + i] = dp[o];
  }
  auto find = [&](int64_t x) {   // searchsorted (left) in the sorted keys
    return int64_t(std::lower_bound(skey.begin(), skey.end(), x) - skey.begin());
  };
  std::vector<char> has_child(n, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t di = depth_n[size_t(i)], ci = code_n[size_t(i)], wi = w[size_t(i)];
    const int64_t r = di > 0 ? (ci / wi) % k : -1;
    a.rank[b * N + i] = r;
    const int64_t par = di > 0 ? find((di - 1) * pw[size_t(D)] + ci - r * wi) : -1;
    a.parent[b * N + i] = par;
    if (par >= 0) has_child[size_t(par)] = 1;
    uint64_t bi = 0;
    for (int64_t j = 0; j < N; ++j) {
      const int64_t wj = w[size_t(j)];
      const bool anc = depth_n[size_t(j)] <= di && ci / wj == code_n[size_t(j)] / wj;
      a.mask[(b * N + i) * N + j] = anc;
      if (anc && j < 64) bi |= uint64_t(1) << j;
    }
    if (a.bits != nullptr) a.bits[b * N + i] = int64_t(bi);
  }
  // retrieve: leaves first (node order), then one root-only row per inner non-root node
  int64_t row = 0;
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t i = 1; i < N; ++i) {
      const bool leaf = !has_child[size_t(i)];
      if (leaf != (pass == 0)) continue;
      int64_t* out = a.retrieve + (b * m + row++) * (D + 1);
      for (int64_t l = 0; l <= D; ++l) {
        if (!leaf) out[l] = l == 0 ? 0 : -1;
        else if (l > depth_n[size_t(i)]) out[l] = -1;
        else out[l] = find(l * pw[size_t(D)] + code_n[size_t(i)] / pw[size_t(D - l)] * pw[size_t(D - l)]);
      }
    }
  return true;
}

inline bool dynamic_tree(const DynamicTreeArgs& a) {
  for (int64_t b = 0; b < a.B; ++b)
    if (!dynamic_tree_row(a, b)) return false;
  return true;
}

}  // namespace amphista_cpu

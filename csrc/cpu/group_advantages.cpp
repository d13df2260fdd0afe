// CPU kernel of the group-relative advantages: the samples are bucketed by group id in one
// counting pass (or a sort when ids are sparse), then every group is normalised on its own.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "flowsteer/sde_args.h"
#include "flowsteer/sde_math.h"

namespace flowsteer {
namespace cpu {
namespace {

// Writes `order` (sample indices, grouped, stable within a group) and `offsets` (group starts).
void build_segments(const int64_t* ids, int64_t n, std::vector<int64_t>& order, std::vector<int64_t>& offsets) {
  order.resize(size_t(n));
  offsets.clear();
  if (n == 0) return;
  const auto [lo_it, hi_it] = std::minmax_element(ids, ids + n);
  const int64_t lo = *lo_it, hi = *hi_it;
  // Distances between ids in unsigned arithmetic: hi - lo overflows int64 for ids spanning more
  // than 2**63 - 1 (hashed prompts, say), and the unsigned difference is exact for any hi >= lo.
  const auto dist = [lo](int64_t id) { return uint64_t(id) - uint64_t(lo); };
  // Dense ids (the usual 0..G-1, or prompt indices): counting sort, O(n + range).
  if (dist(hi) <= uint64_t(4 * n + 1024)) {
    const int64_t range = int64_t(dist(hi)) + 1;
    std::vector<int64_t> start(size_t(range + 1), 0);
    for (int64_t i = 0; i < n; ++i) ++start[size_t(dist(ids[i]) + 1)];
    for (int64_t r = 0; r < range; ++r) {
      if (start[size_t(r + 1)] > 0) offsets.push_back(start[size_t(r)]);
      start[size_t(r + 1)] += start[size_t(r)];
    }
    offsets.push_back(n);
    std::vector<int64_t> cursor(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[size_t(cursor[size_t(dist(ids[i]))]++)] = i;
    return;
  }
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [ids](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  offsets.push_back(0);
  for (int64_t j = 1; j < n; ++j)
    if (ids[order[size_t(j)]] != ids[order[size_t(j - 1)]]) offsets.push_back(j);
  offsets.push_back(n);
}

}  // namespace

void group_advantages(const GroupAdvantageArgs& a) {
  std::vector<int64_t> order, offsets;
  build_segments(a.group_ids, a.n, order, offsets);
  const int64_t groups = int64_t(offsets.size()) - 1;
  const int64_t k_cols = a.k;
  // One thread for small batches: waking a team costs more than the work (torch's grain is 32768).
#pragma omp parallel for schedule(dynamic, 64) if (a.n * a.k >= 32768)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t s0 = offsets[size_t(g)], s1 = offsets[size_t(g + 1)];
    const double count = double(s1 - s0);
    for (int64_t j = s0; j < s1; ++j) a.out[order[size_t(j)]] = 0.0f;
    for (int64_t k = 0; k < k_cols; ++k) {
      double sum = 0.0;
      float lo = INFINITY, hi = -INFINITY;
      for (int64_t j = s0; j < s1; ++j) {
        const float r = a.rewards[order[size_t(j)] * k_cols + k];
        sum += r;
        lo = std::min(lo, r);
        hi = std::max(hi, r);
      }
      const double mean = sum / count;
      double sq = 0.0;
      for (int64_t j = s0; j < s1; ++j) {
        const double d = double(a.rewards[order[size_t(j)] * k_cols + k]) - mean;
        sq += d * d;
      }
      const double std = std::sqrt(sq / count);
      const float w = a.weights[k];
      const float gstd = a.global_std ? a.global_std[k] : 0.0f;
      for (int64_t j = s0; j < s1; ++j) {
        const int64_t i = order[size_t(j)];
        a.out[i] += w * zscore_term(a.rewards[i * k_cols + k], mean, std, gstd, a.std_mode, a.eps, lo == hi);
      }
    }
    for (int64_t j = s0; j < s1; ++j) {
      const int64_t i = order[size_t(j)];
      a.out[i] = clip_advantage(a.out[i], a.clip);
    }
  }
}

void win_rate(const WinRateArgs& a) {
#pragma omp parallel for schedule(static) if (a.m * a.group_size * a.group_size >= 32768)
  for (int64_t m = 0; m < a.m; ++m) {
    for (int64_t i = 0; i < a.group_size; ++i) {
      const float* row = a.prefs + (m * a.group_size + i) * a.group_size;
      float sum = 0.0f;
      for (int64_t j = 0; j < a.group_size; ++j)
        if (j != i) sum += pref_outcome(row[j]);
      a.out[m * a.group_size + i] = sum / float(a.group_size - 1);
    }
  }
}

void pareto_mask(const ParetoArgs& a) {
  std::vector<int64_t> order, offsets;
  build_segments(a.group_ids, a.n, order, offsets);
  const int64_t groups = int64_t(offsets.size()) - 1;
#pragma omp parallel for schedule(dynamic, 16) if (a.n * a.k >= 32768)
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t s = offsets[size_t(g)]; s < offsets[size_t(g + 1)]; ++s) {
      const int64_t i = order[size_t(s)];
      bool dominated = false;
      for (int64_t t = offsets[size_t(g)]; t < offsets[size_t(g + 1)] && !dominated; ++t)
        dominated = dominates(a.rewards + order[size_t(t)] * a.k, a.rewards + i * a.k, a.k);
      a.out[i] = dominated ? 0 : 1;
    }
  }
}

}  // namespace cpu
}  // namespace flowsteer

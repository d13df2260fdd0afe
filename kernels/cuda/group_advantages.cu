// CUDA kernel of the group-relative advantages. The segments come ready-made from Python (`order`
// lists the sample indices group by group, group g at order[offsets[g] .. offsets[g + 1])); one warp
// normalises one group exactly as csrc/cpu/group_advantages.cpp does. Sums are reduced in a fixed
// order (strided per lane, then a butterfly), never with atomics, so results repeat bit for bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "flowsteer/cuda_launch.h"
#include "flowsteer/sde_args.h"
#include "flowsteer/sde_math.h"

namespace flowsteer {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = 32 * kWarpsPerBlock;
// gridDim.x may not exceed 2^31 - 1; a grid-stride loop takes the rest.
constexpr int64_t kMaxGrid = int64_t(1) << 30;

// Butterfly reductions: every lane ends with the same bits, since each step adds the same two
// operands on both sides of a pair (a + b == b + a exactly).
__device__ __forceinline__ double warp_allsum(double v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

__device__ __forceinline__ float warp_allmin(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

__device__ __forceinline__ float warp_allmax(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// One warp per group. Each sample of the group is read and written by one lane only (lane
// j % 32 of member j), so out[i] can accumulate across columns in global memory like the CPU's.
__global__ void __launch_bounds__(kThreads) group_advantages_kernel(const GroupAdvantageArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  const int64_t k_cols = a.k;
  // g is the same for the 32 lanes of a warp, so every lane reaches every shuffle below.
  for (int64_t g = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); g < a.num_groups; g += warps) {
    const int64_t s0 = a.offsets[g], s1 = a.offsets[g + 1];
    const double count = double(s1 - s0);
    for (int64_t j = s0 + lane; j < s1; j += 32) a.out[a.order[j]] = 0.0f;
    for (int64_t k = 0; k < k_cols; ++k) {
      double sum = 0.0;
      float lo = INFINITY, hi = -INFINITY;
      for (int64_t j = s0 + lane; j < s1; j += 32) {
        const float r = a.rewards[a.order[j] * k_cols + k];
        sum += r;
        lo = fminf(lo, r);
        hi = fmaxf(hi, r);
      }
      sum = warp_allsum(sum);
      lo = warp_allmin(lo);
      hi = warp_allmax(hi);
      const double mean = sum / count;
      double sq = 0.0;
      for (int64_t j = s0 + lane; j < s1; j += 32) {
        const double d = double(a.rewards[a.order[j] * k_cols + k]) - mean;
        sq += d * d;
      }
      sq = warp_allsum(sq);
      const double std = sqrt(sq / count);
      const float w = a.weights[k];
      const float gstd = a.global_std ? a.global_std[k] : 0.0f;
      for (int64_t j = s0 + lane; j < s1; j += 32) {
        const int64_t i = a.order[j];
        a.out[i] += w * zscore_term(a.rewards[i * k_cols + k], mean, std, gstd, a.std_mode, a.eps, lo == hi);
      }
    }
    for (int64_t j = s0 + lane; j < s1; j += 32) {
      const int64_t i = a.order[j];
      a.out[i] = clip_advantage(a.out[i], a.clip);
    }
  }
}

// One thread per (m, i): the mean of row i of prefs[m] without its diagonal, summed in j order
// as the CPU does.
__global__ void win_rate_kernel(const WinRateArgs a) {
  const int64_t total = a.m * a.group_size;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < total; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = r % a.group_size;
    const float* row = a.prefs + r * a.group_size;
    float sum = 0.0f;
    for (int64_t j = 0; j < a.group_size; ++j)
      if (j != i) sum += pref_outcome(row[j]);
    a.out[r] = sum / float(a.group_size - 1);
  }
}

// One thread per sorted position s: its group is found by binary search in offsets, then every
// member of the group is tested for dominance, as the CPU does.
__global__ void pareto_kernel(const ParetoArgs a) {
  for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s < a.n; s += int64_t(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = a.num_groups;  // find g with offsets[g] <= s < offsets[g + 1]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (a.offsets[mid] <= s) lo = mid; else hi = mid;
    }
    const int64_t i = a.order[s];
    bool dominated = false;
    for (int64_t t = a.offsets[lo]; t < a.offsets[lo + 1] && !dominated; ++t)
      dominated = dominates(a.rewards + a.order[t] * a.k, a.rewards + i * a.k, a.k);
    a.out[i] = dominated ? 0 : 1;
  }
}

}  // namespace

void win_rate(const WinRateArgs& a, void* stream) {
  if (a.m <= 0) return;
  const int64_t grid = std::min((a.m * a.group_size + kThreads - 1) / kThreads, kMaxGrid);
  win_rate_kernel<<<unsigned(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  check_launch("win_rate");
}

void pareto_mask(const ParetoArgs& a, void* stream) {
  if (a.n <= 0 || a.num_groups <= 0) return;
  const int64_t grid = std::min((a.n + kThreads - 1) / kThreads, kMaxGrid);
  pareto_kernel<<<unsigned(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  check_launch("pareto_mask");
}

void group_advantages(const GroupAdvantageArgs& a, void* stream) {
  if (a.n <= 0 || a.num_groups <= 0) return;
  if (!a.order || !a.offsets) throw std::invalid_argument("group_advantages: 'order' and 'offsets' are required on CUDA");
  const int64_t grid = std::min((a.num_groups + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxGrid);
  group_advantages_kernel<<<unsigned(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
  check_launch("group_advantages");
}

}  // namespace cuda
}  // namespace flowsteer

// CPU kernels of the SDE step: the fused forward (sample or evaluate, log-prob, KL) and its backward.
#include <algorithm>
#include <cmath>
#include <vector>

#include "flowsteer/philox.h"
#include "flowsteer/sde_args.h"
#include "flowsteer/sde_math.h"

namespace flowsteer {
namespace cpu {
namespace {

// Elements of one sample that one task reduces. Fixed, so the summation order (and the bits of
// log_prob and kl) do not depend on the number of threads.
constexpr int64_t kChunk = 16384;
// Elements per inner tile: the noise for a tile is drawn into a stack buffer first so that the
// arithmetic loop below it has no calls and vectorises.
constexpr int64_t kTile = 512;

template <typename T>
void forward_chunk(const SdeForwardArgs& a, int64_t b, int64_t n0, int64_t n1, double* lp_sum, double* kl_sum) {
  using S = Storage<T>;
  const StepCoef c = step_coef(a.kind, a.sigma[b], a.sigma_next[b], a.noise_level, a.sigma_max);
  const float cg = a.guidance ? a.guidance_coef[b] : 0.0f;
  const float lp_scale = a.out_log_prob ? logprob_scale(a.lp_form, c.std) : 0.0f;
  const bool sample_mode = a.prev_sample == nullptr;
  const int64_t base = b * a.numel;
  const T* v = static_cast<const T*>(a.v) + base;
  const T* x = static_cast<const T*>(a.x) + base;
  const T* noise_in = a.noise ? static_cast<const T*>(a.noise) + base : nullptr;
  const T* prev = sample_mode ? nullptr : static_cast<const T*>(a.prev_sample) + base;
  const T* guide = a.guidance ? static_cast<const T*>(a.guidance) + base : nullptr;
  const T* ref_v = a.ref_v ? static_cast<const T*>(a.ref_v) + base : nullptr;
  T* out_sample = a.out_sample ? static_cast<T*>(a.out_sample) + base : nullptr;
  T* out_mean = a.out_mean ? static_cast<T*>(a.out_mean) + base : nullptr;

  alignas(64) float noise[kTile + 4];
  double lp_acc = 0.0, kl_acc = 0.0;
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t t1 = std::min(n1, t0 + kTile);
    const float* eps = noise;
    if (sample_mode && c.std != 0.0f) {
      if (noise_in) {
        for (int64_t i = t0; i < t1; ++i) noise[i - t0] = S::load(noise_in, i);
      } else {
        // Philox blocks covering global elements [base + t0, base + t1).
        const int64_t g0 = (base + t0) >> 2, g1 = (base + t1 - 1) >> 2;
        for (int64_t j = g0; j <= g1; ++j) philox_normal4(a.seed, a.offset, uint64_t(j), &noise[(j - g0) * 4]);
        eps = noise + ((base + t0) - g0 * 4);
      }
    }
    float lp_tile = 0.0f, kl_tile = 0.0f;
    for (int64_t i = t0; i < t1; ++i) {
      const float mean = c.cx * S::load(x, i) + c.cv * S::load(v, i);
      const float mean_g = guide ? mean + cg * S::load(guide, i) : mean;
      float xp;
      if (sample_mode) {
        const float drawn = c.std != 0.0f ? mean_g + c.std * eps[i - t0] : mean_g;
        S::store(out_sample, i, drawn);
        xp = S::round(drawn);  // the log-prob is of the sample as stored
      } else {
        xp = S::load(prev, i);
      }
      const float mean_lp = a.lp_guided ? mean_g : mean;
      if (out_mean) S::store(out_mean, i, mean_lp);
      const float d = xp - mean_lp;
      lp_tile += d * d;
      if (ref_v) {
        const float dm = mean - (c.cx * S::load(x, i) + c.cv * S::load(ref_v, i));
        kl_tile += dm * dm;
      }
    }
    lp_acc += double(lp_tile);
    kl_acc += double(kl_tile);
  }
  *lp_sum = -lp_acc * double(lp_scale);
  *kl_sum = kl_acc;
}

template <typename T>
void forward(const SdeForwardArgs& a) {
  const int64_t chunks = std::max<int64_t>(1, (a.numel + kChunk - 1) / kChunk);
  const int64_t tasks = a.batch * chunks;
  std::vector<double> lp(size_t(tasks), 0.0), kl(size_t(tasks), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / chunks, ch = task % chunks;
    const int64_t n0 = ch * kChunk, n1 = std::min(a.numel, n0 + kChunk);
    forward_chunk<T>(a, b, n0, n1, &lp[size_t(task)], &kl[size_t(task)]);
  }
  for (int64_t b = 0; b < a.batch; ++b) {
    const StepCoef c = step_coef(a.kind, a.sigma[b], a.sigma_next[b], a.noise_level, a.sigma_max);
    if (a.out_std) a.out_std[b] = c.std;
    double lp_sum = 0.0, kl_sum = 0.0;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      lp_sum += lp[size_t(b * chunks + ch)];
      kl_sum += kl[size_t(b * chunks + ch)];
    }
    const double n = double(a.numel);
    if (a.out_log_prob) {
      const double lp_const = logprob_const(a.lp_form, c.std);
      a.out_log_prob[b] = float(a.reduce_mean ? lp_sum / n + lp_const : lp_sum + lp_const * n);
    }
    if (a.out_kl) {
      const double kl_b = kl_sum / double(kl_divisor(a.kl_form, c));
      a.out_kl[b] = float(a.reduce_mean ? kl_b / n : kl_b);
    }
  }
}

template <typename T>
void backward_chunk(const SdeBackwardArgs& a, int64_t b, int64_t n0, int64_t n1) {
  using S = Storage<T>;
  const StepCoef c = step_coef(a.kind, a.sigma[b], a.sigma_next[b], a.noise_level, a.sigma_max);
  const float cg = a.guidance ? a.guidance_coef[b] : 0.0f;
  const float inv_n = a.reduce_mean ? 1.0f / float(a.numel) : 1.0f;
  // d log_prob / d mean = 2 * scale * (x' - mean) per element, times the reduction weight.
  const float w_lp = a.grad_log_prob ? a.grad_log_prob[b] * inv_n * 2.0f * logprob_scale(a.lp_form, c.std) : 0.0f;
  const float w_kl = a.grad_kl ? a.grad_kl[b] * inv_n * 2.0f / kl_divisor(a.kl_form, c) : 0.0f;
  const int64_t base = b * a.numel;
  const T* v = static_cast<const T*>(a.v) + base;
  const T* x = static_cast<const T*>(a.x) + base;
  const T* xp = a.grad_log_prob ? static_cast<const T*>(a.sample) + base : nullptr;
  const T* guide = (a.guidance && a.lp_guided) ? static_cast<const T*>(a.guidance) + base : nullptr;
  const T* ref_v = a.grad_kl ? static_cast<const T*>(a.ref_v) + base : nullptr;
  const T* g_mean = a.grad_mean ? static_cast<const T*>(a.grad_mean) + base : nullptr;
  const T* g_sample = a.grad_sample ? static_cast<const T*>(a.grad_sample) + base : nullptr;
  T* grad_v = a.grad_v ? static_cast<T*>(a.grad_v) + base : nullptr;
  T* grad_x = a.grad_x ? static_cast<T*>(a.grad_x) + base : nullptr;
  T* grad_ref_v = a.grad_ref_v ? static_cast<T*>(a.grad_ref_v) + base : nullptr;
  for (int64_t i = n0; i < n1; ++i) {
    const float xf = S::load(x, i);
    const float mean = c.cx * xf + c.cv * S::load(v, i);
    // Gradient with respect to the mean; the guidance shift is a constant.
    float g = 0.0f;
    if (g_mean) g += S::load(g_mean, i);
    if (g_sample) g += S::load(g_sample, i);
    if (xp) {
      const float mean_lp = guide ? mean + cg * S::load(guide, i) : mean;
      g += w_lp * (S::load(xp, i) - mean_lp);
    }
    // d kl / d mean. The reference mean shares cx * x, so the KL adds nothing to grad_x.
    float g_kl = 0.0f;
    if (ref_v) g_kl = w_kl * (mean - (c.cx * xf + c.cv * S::load(ref_v, i)));
    if (grad_v) S::store(grad_v, i, c.cv * (g + g_kl));
    if (grad_x) S::store(grad_x, i, c.cx * g);
    if (grad_ref_v) S::store(grad_ref_v, i, -c.cv * g_kl);
  }
}

template <typename T>
void backward(const SdeBackwardArgs& a) {
  const int64_t chunks = std::max<int64_t>(1, (a.numel + kChunk - 1) / kChunk);
  const int64_t tasks = a.batch * chunks;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / chunks, ch = task % chunks;
    const int64_t n0 = ch * kChunk;
    backward_chunk<T>(a, b, n0, std::min(a.numel, n0 + kChunk));
  }
}

}  // namespace

void sde_forward(const SdeForwardArgs& a) {
  switch (a.dtype) {
    case kFloat32: return forward<float>(a);
    case kBFloat16: return forward<bf16_t>(a);
    default: return forward<fp16_t>(a);
  }
}

void sde_backward(const SdeBackwardArgs& a) {
  switch (a.dtype) {
    case kFloat32: return backward<float>(a);
    case kBFloat16: return backward<bf16_t>(a);
    default: return backward<fp16_t>(a);
  }
}

}  // namespace cpu
}  // namespace flowsteer

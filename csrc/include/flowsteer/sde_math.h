// Per-sample coefficients of one SDE step, shared by the CPU and CUDA kernels.
//
// Every step kind has a mean that is linear in x and v:  mean = cx * x + cv * v.
// The formulas, in the design's notation (delta = sigma - sigma_next > 0):
//   ode:   mean = x - delta v                                              std = 0
//   flow:  mean = x - delta v - (g^2 delta / (2 sigma)) (x + (1 - sigma) v),
//          g = a sqrt(sigma / (1 - sigma~)), sigma~ = sigma (< 1) or sigma_max  std = g sqrt(delta)
//   dance: the same with g = a                                               std = a sqrt(delta)
//   cps:   mean = (1 - sigma') x0 + sqrt(sigma'^2 - s^2) x1, s = sigma' sin(a pi / 2)   std = s
//          with x0 = x - sigma v and x1 = x + (1 - sigma) v.
// g is Flow-GRPO's std_dev_t (StepCoef::std_coef): the KL divisor of its KL form (for cps it
// equals std).
#pragma once
#include <cmath>
#include "flowsteer/common.h"

namespace flowsteer {

// The numbering is part of the binding contract with python/flowsteer/ops/codes.py.
enum StepKind : int { kOde = 0, kFlow = 1, kDance = 2, kCps = 3 };
enum LogProbForm : int { kGaussian = 0, kCpsFlowGrpo = 1 };
enum KlForm : int { kKlNone = 0, kKlFlowGrpo = 1, kKlExact = 2 };

struct StepCoef {
  float cx, cv, std, std_coef;  // std_coef: g below
};

FS_HD StepCoef step_coef(int kind, float sigma, float sigma_next, float noise_level, float sigma_max) {
  const float delta = sigma - sigma_next;
  StepCoef c;
  if (kind == kFlow || kind == kDance) {
    float g = noise_level;
    if (kind == kFlow) {
      const float sigma_t = sigma < 1.0f ? sigma : sigma_max;
      g = noise_level * sqrtf(sigma / (1.0f - sigma_t));
    }
    const float k = g * g * delta / (2.0f * sigma);
    c.cx = 1.0f - k;
    c.cv = -delta - k * (1.0f - sigma);
    c.std = g * sqrtf(delta);
    c.std_coef = g;
  } else if (kind == kCps) {
    const float s = sigma_next * sinf(noise_level * 1.57079632679489662f);
    const float dir = sqrtf(fmaxf(sigma_next * sigma_next - s * s, 0.0f));
    c.cx = (1.0f - sigma_next) + dir;
    c.cv = -(1.0f - sigma_next) * sigma + dir * (1.0f - sigma);
    c.std = s;
    c.std_coef = s;
  } else {
    c.cx = 1.0f;
    c.cv = -delta;
    c.std = 0.0f;
    c.std_coef = 0.0f;
  }
  return c;
}

// Element term of the log-prob before the per-sample constant: -(x' - mean)^2 * scale,
// scale = 1 / (2 std^2) for the Gaussian form and 1 for Flow-GRPO's simplified CPS form.
FS_HD float logprob_scale(int form, float std) { return form == kCpsFlowGrpo ? 1.0f : 1.0f / (2.0f * std * std); }

// Per-sample constant added to the reduced log-prob: -log std - log(2 pi)/2 per element.
FS_HD float logprob_const(int form, float std) {
  return form == kCpsFlowGrpo ? 0.0f : -logf(std) - 0.91893853320467274178f;
}

FS_HD float kl_divisor(int form, const StepCoef& c) { return form == kKlExact ? 2.0f * c.std * c.std : 2.0f * c.std_coef * c.std_coef; }

// A sample's log-prob from sum_sq = sum over its numel elements of (x' - mean_lp)^2 (in double):
// reduce(-(x' - mean)^2 scale + const), as mean (reduce_mean) or sum. Used by the CPU forward and
// the CUDA finalize kernel; mirrored by finalize_log_prob in kernels/triton/_common.py.
FS_HD double finalize_log_prob(int form, float std, double sum_sq, int64_t numel, bool reduce_mean) {
  const double scaled = -sum_sq * double(logprob_scale(form, std));
  const double cst = logprob_const(form, std);
  const double n = double(numel);
  return reduce_mean ? scaled / n + cst : scaled + cst * n;
}

// A sample's KL from sum_sq = sum over its elements of (mean - ref_mean)^2 (in double).
FS_HD double finalize_kl(int form, const StepCoef& c, double sum_sq, int64_t numel, bool reduce_mean) {
  const double kl = sum_sq / double(kl_divisor(form, c));
  return reduce_mean ? kl / double(numel) : kl;
}

// The backward's per-sample weights: d log_prob / d mean_i = w_lp (x'_i - mean_lp_i) and
// d kl / d mean_i = w_kl (mean_i - ref_mean_i), for incoming gradients grad_lp and grad_kl.
FS_HD float reduce_weight(bool reduce_mean, int64_t numel) { return reduce_mean ? 1.0f / float(numel) : 1.0f; }

FS_HD float logprob_grad_weight(int form, float std, float grad_lp, float inv_n) {
  return grad_lp * inv_n * 2.0f * logprob_scale(form, std);
}

FS_HD float kl_grad_weight(int form, const StepCoef& c, float grad_kl, float inv_n) {
  return grad_kl * inv_n * 2.0f / kl_divisor(form, c);
}

}  // namespace flowsteer

namespace flowsteer {

// One reward column's contribution to a group-relative advantage. `degenerate` marks a group
// whose rewards are all equal: it gets exactly 0, whatever rounding left in (r - mean).
// std_mode: 0 per group, 1 global, 2 none.
FS_HD float zscore_term(float r, double mean, double group_std, float global_std, int std_mode, float eps,
                        bool degenerate) {
  if (degenerate) return 0.0f;
  const double centred = double(r) - mean;
  if (std_mode == 2) return float(centred);
  const double std = std_mode == 0 ? group_std : double(global_std);
  return float(centred / (std + double(eps)));
}

FS_HD float clip_advantage(float a, float clip) { return clip > 0.0f ? fminf(fmaxf(a, -clip), clip) : a; }

// A pairwise judge's outcome as a reward: an unparseable answer (NaN) is a tie.
FS_HD float pref_outcome(float p) { return p != p ? 0.5f : p; }

// Whether reward row b dominates row a: >= in every column and > in at least one.
FS_HD bool dominates(const float* b, const float* a, int64_t k) {
  bool strictly = false;
  for (int64_t c = 0; c < k; ++c) {
    if (b[c] < a[c]) return false;
    strictly = strictly || b[c] > a[c];
  }
  return strictly;
}

}  // namespace flowsteer

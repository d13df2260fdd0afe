// CPU kernels of the SDE step: the fused forward (sample or evaluate, log-prob, KL) and its backward.
//
// Each task owns a fixed chunk of one sample and walks it in L1-sized tiles. Within a tile the
// work is split into short passes over float arrays (draw noise, load, mean, sample, reduce), each
// a branch-free loop the compiler vectorises; the flags that select the passes are loop-invariant.
//
// This file is compiled once per instruction set (FLOWSTEER_CPU_ISA: generic, and avx2 on x86-64,
// where the Philox loop vectorises); dispatch.cpp picks one at run time. Both give the same bits:
// no FMA contraction, and vectorised IEEE operations round as the scalar ones do.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "flowsteer/philox.h"
#include "flowsteer/sde_args.h"
#include "flowsteer/sde_math.h"

#ifndef FLOWSTEER_CPU_ISA
#define FLOWSTEER_CPU_ISA generic
#endif

namespace flowsteer {
namespace cpu {
namespace FLOWSTEER_CPU_ISA {

// Elements of one sample that one task reduces. Fixed, so the summation order (and the bits of
// log_prob and kl) do not depend on the number of threads.
constexpr int64_t kChunk = 16384;
// Elements per tile; every array of a tile stays in L1.
constexpr int64_t kTile = 512;
// Lanes of the tile reductions: independent partial sums in a fixed order (vectorisable without
// reassociating a single accumulator).
constexpr int kLanes = 16;
// Below this many elements a call runs on one thread: waking a team costs more than it saves,
// and on a busy machine a descheduled team member stalls the whole call (torch uses 32768 too).
constexpr int64_t kParallelGrain = 32768;

#if defined(__AVX2__)
// box_muller of philox.h on eight lanes: the same fp32 operations in the same order (no FMA), so
// the same bits; GCC's own vectorisation of the scalar code measured 1.4 ns per normal here.
inline __m256 uint_to_unit8(__m256i k) {
  // float(k) for unsigned k, correctly rounded: the two 16-bit halves convert exactly and their
  // sum rounds once, as the scalar conversion does.
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(k, 16));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(k, _mm256_set1_epi32(0xFFFF)));
  const __m256 f = _mm256_add_ps(_mm256_mul_ps(hi, _mm256_set1_ps(65536.0f)), lo);
  return _mm256_add_ps(_mm256_mul_ps(f, _mm256_set1_ps(2.3283064365386963e-10f)), _mm256_set1_ps(1.1641532182693481e-10f));
}

inline __m256 unit_log8(__m256 u) {
  const __m256i bits = _mm256_castps_si256(u);
  const __m256i e = _mm256_srai_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f3504f3)), 23);
  const __m256 m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(e, 23)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(f, f);
  const float coef[9] = {7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
                         -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f};
  __m256 p = _mm256_set1_ps(coef[0]);
  for (int i = 1; i < 9; ++i) p = _mm256_add_ps(_mm256_mul_ps(p, f), _mm256_set1_ps(coef[i]));
  const __m256 ef = _mm256_cvtepi32_ps(e);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(f, z), p);
  y = _mm256_add_ps(y, _mm256_mul_ps(ef, _mm256_set1_ps(-2.12194440e-4f)));
  y = _mm256_add_ps(y, _mm256_mul_ps(_mm256_set1_ps(-0.5f), z));
  return _mm256_add_ps(_mm256_add_ps(f, y), _mm256_mul_ps(ef, _mm256_set1_ps(0.693359375f)));
}

inline void sincos_2pi8(__m256 u, __m256* s, __m256* c) {
  const __m256i ni = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(u, _mm256_set1_ps(4.0f)), _mm256_set1_ps(0.5f)));
  const __m256 n = _mm256_cvtepi32_ps(ni);
  const __m256 r = _mm256_sub_ps(u, _mm256_mul_ps(n, _mm256_set1_ps(0.25f)));
  const __m256 t = _mm256_mul_ps(r, _mm256_set1_ps(6.28318530717958647692f));
  const __m256 t2 = _mm256_mul_ps(t, t);
  __m256 ps = _mm256_add_ps(_mm256_set1_ps(8.3321608736e-3f), _mm256_mul_ps(t2, _mm256_set1_ps(-1.9515295891e-4f)));
  ps = _mm256_add_ps(_mm256_set1_ps(-1.6666654611e-1f), _mm256_mul_ps(t2, ps));
  const __m256 sp = _mm256_add_ps(t, _mm256_mul_ps(_mm256_mul_ps(t, t2), ps));
  __m256 pc = _mm256_add_ps(_mm256_set1_ps(-1.388731625493765e-3f), _mm256_mul_ps(t2, _mm256_set1_ps(2.443315711809948e-5f)));
  pc = _mm256_add_ps(_mm256_set1_ps(4.166664568298827e-2f), _mm256_mul_ps(t2, pc));
  const __m256 cp = _mm256_add_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(_mm256_set1_ps(0.5f), t2)),
                                  _mm256_mul_ps(_mm256_mul_ps(t2, t2), pc));
  const __m256i q = _mm256_and_si256(ni, _mm256_set1_epi32(3));
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 q1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(q, _mm256_set1_epi32(1)));
  const __m256 q2 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(q, _mm256_set1_epi32(2)));
  const __m256 q3 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(q, _mm256_set1_epi32(3)));
  const __m256 nsp = _mm256_xor_ps(sp, sign), ncp = _mm256_xor_ps(cp, sign);
  // q: 0 -> (sp, cp), 1 -> (cp, -sp), 2 -> (-sp, -cp), 3 -> (-cp, sp)
  __m256 sv = _mm256_blendv_ps(sp, cp, q1);
  sv = _mm256_blendv_ps(sv, nsp, q2);
  *s = _mm256_blendv_ps(sv, ncp, q3);
  __m256 cv = _mm256_blendv_ps(cp, nsp, q1);
  cv = _mm256_blendv_ps(cv, ncp, q2);
  *c = _mm256_blendv_ps(cv, sp, q3);
}

inline void box_muller8(const uint32_t* ka, const uint32_t* kb, float* n_a, float* n_b) {
  const __m256 ua = uint_to_unit8(_mm256_load_si256(reinterpret_cast<const __m256i*>(ka)));
  const __m256 ub = uint_to_unit8(_mm256_load_si256(reinterpret_cast<const __m256i*>(kb)));
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), unit_log8(ua)));
  __m256 s, c;
  sincos_2pi8(ub, &s, &c);
  _mm256_store_ps(n_a, _mm256_mul_ps(r, c));
  _mm256_store_ps(n_b, _mm256_mul_ps(r, s));
}
#endif

// Standard normals of Philox blocks j0 .. j0 + blocks - 1, four per block, written to out.
void philox_normal_blocks(uint64_t seed, uint64_t offset, uint64_t j0, int64_t blocks, float* out) {
  alignas(64) uint32_t ka[kTile / 4 + 16], kb[kTile / 4 + 16], kc[kTile / 4 + 16], kd[kTile / 4 + 16];
  const uint32_t s0 = uint32_t(seed), s1 = uint32_t(seed >> 32);
  const uint32_t o0 = uint32_t(offset), o1 = uint32_t(offset >> 32);
  int64_t t = 0;
#if defined(__AVX2__)
  // philox4x32_10 with 32x32 -> 64-bit products on even and odd lanes. GCC's own vectorisation
  // of the scalar code measured 2.4 ns per normal here; this is the same arithmetic, lane for lane
  // (the tests compare it bit for bit with the generic build).
  // Two independent groups of eight per iteration: one group's rounds are a chain of dependent
  // multiplies (latency-bound at 0.9 ns per normal here); two chains fill the pipeline.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mul0 = _mm256_set1_epi32(int(0xD2511F53u)), mul1 = _mm256_set1_epi32(int(0xCD9E8D57u));
  const auto mulhilo = [](__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
    const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  };
  for (; t + 16 <= blocks; t += 16) {
    const uint64_t j = j0 + uint64_t(t);
    if (uint32_t(j) > 0xFFFFFFEFu) break;  // the low word would carry inside the groups: scalar below
    __m256i a0 = _mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(j))), lane);
    __m256i b0 = _mm256_add_epi32(a0, _mm256_set1_epi32(8));
    __m256i a1 = _mm256_set1_epi32(int(uint32_t(j >> 32))), b1 = a1;
    __m256i a2 = _mm256_set1_epi32(int(o0)), b2 = a2, a3 = _mm256_set1_epi32(int(o1)), b3 = a3;
    uint32_t k0 = s0, k1 = s1;
    for (int round = 0; round < 10; ++round) {
      __m256i ahi0, alo0, ahi1, alo1, bhi0, blo0, bhi1, blo1;
      mulhilo(a0, mul0, &ahi0, &alo0);
      mulhilo(b0, mul0, &bhi0, &blo0);
      mulhilo(a2, mul1, &ahi1, &alo1);
      mulhilo(b2, mul1, &bhi1, &blo1);
      const __m256i key0 = _mm256_set1_epi32(int(k0)), key1 = _mm256_set1_epi32(int(k1));
      a0 = _mm256_xor_si256(_mm256_xor_si256(ahi1, a1), key0);
      b0 = _mm256_xor_si256(_mm256_xor_si256(bhi1, b1), key0);
      a2 = _mm256_xor_si256(_mm256_xor_si256(ahi0, a3), key1);
      b2 = _mm256_xor_si256(_mm256_xor_si256(bhi0, b3), key1);
      a1 = alo1;
      b1 = blo1;
      a3 = alo0;
      b3 = blo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(ka + t), a0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(kb + t), a1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(kc + t), a2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(kd + t), a3);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ka + t + 8), b0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(kb + t + 8), b1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(kc + t + 8), b2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(kd + t + 8), b3);
  }
#endif
  for (; t < blocks; ++t) {
    const uint64_t j = j0 + uint64_t(t);
    const U32x4 k = philox4x32_10(U32x4{uint32_t(j), uint32_t(j >> 32), o0, o1}, s0, s1);
    ka[t] = k.x;
    kb[t] = k.y;
    kc[t] = k.z;
    kd[t] = k.w;
  }
  alignas(64) float z0[kTile / 4 + 16], z1[kTile / 4 + 16], z2[kTile / 4 + 16], z3[kTile / 4 + 16];
  t = 0;
#if defined(__AVX2__)
  for (; t + 8 <= blocks; t += 8) {
    box_muller8(ka + t, kb + t, z0 + t, z1 + t);
    box_muller8(kc + t, kd + t, z2 + t, z3 + t);
  }
#endif
  for (; t < blocks; ++t) {
    box_muller(ka[t], kb[t], &z0[t], &z1[t]);
    box_muller(kc[t], kd[t], &z2[t], &z3[t]);
  }
  for (t = 0; t < blocks; ++t) {
    out[4 * t + 0] = z0[t];
    out[4 * t + 1] = z1[t];
    out[4 * t + 2] = z2[t];
    out[4 * t + 3] = z3[t];
  }
}

namespace {

template <typename T>
inline void load_tile(const T* p, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = Storage<T>::load(p, i);
}

// A tile as fp32: fp32 storage is read in place, other dtypes are converted into buf.
template <typename T>
inline const float* tile_view(const T* p, int64_t n, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    (void)n;
    (void)buf;
    return p;
  } else {
    load_tile(p, n, buf);
    return buf;
  }
}

// Sum of squares in kLanes fixed partial sums, then the lanes in order.
inline double sum_squares(const float* a, const float* b, int64_t n) {
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float d = a[i + l] - b[i + l];
      lane[l] += d * d;
    }
  for (int l = 0; i < n; ++i, ++l) {
    const float d = a[i] - b[i];
    lane[l] += d * d;
  }
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += double(lane[l]);
  return s;
}

template <typename T>
void forward_chunk(const SdeForwardArgs& a, int64_t b, int64_t n0, int64_t n1, double* lp_sum, double* kl_sum) {
  using S = Storage<T>;
  const StepCoef c = step_coef(a.kind, a.sigma[b], a.sigma_next[b], a.noise_level, a.sigma_max);
  const float cx = c.cx, cv = c.cv, sd = c.std;
  const float cg = a.guidance ? a.guidance_coef[b] : 0.0f;
  const bool sample_mode = a.prev_sample == nullptr;
  const bool noisy = sample_mode && sd != 0.0f;
  const int64_t base = b * a.numel;
  const auto at = [base](const void* p) { return p ? static_cast<const T*>(p) + base : nullptr; };
  const T *v = at(a.v), *x = at(a.x), *noise_in = at(a.noise), *prev = at(a.prev_sample), *guide = at(a.guidance),
          *ref_v = at(a.ref_v);
  T* out_sample = a.out_sample ? static_cast<T*>(a.out_sample) + base : nullptr;
  T* out_mean = a.out_mean ? static_cast<T*>(a.out_mean) + base : nullptr;

  alignas(64) float x_buf[kTile], v_buf[kTile], mean[kTile], shifted[kTile], xp_buf[kTile], tmp[kTile],
      ref_mean[kTile], eps_buf[kTile + 8];
  double lp_acc = 0.0, kl_acc = 0.0;
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t n = std::min(n1, t0 + kTile) - t0;
    const float* xs = tile_view(x + t0, n, x_buf);
    const float* vs = tile_view(v + t0, n, v_buf);
    for (int64_t i = 0; i < n; ++i) mean[i] = cx * xs[i] + cv * vs[i];
    const float* mean_g = mean;
    if (guide) {
      const float* gs = tile_view(guide + t0, n, tmp);
      for (int64_t i = 0; i < n; ++i) shifted[i] = mean[i] + cg * gs[i];
      mean_g = shifted;
    }
    const float* xp = xp_buf;
    if (sample_mode) {
      if (noisy) {
        const float* eps;
        if (noise_in) {
          eps = tile_view(noise_in + t0, n, eps_buf);
        } else {
          // Philox blocks covering global elements [base + t0, base + t0 + n).
          const int64_t g0 = (base + t0) >> 2, g1 = (base + t0 + n - 1) >> 2;
          philox_normal_blocks(a.seed, a.offset, uint64_t(g0), g1 - g0 + 1, eps_buf);
          eps = eps_buf + ((base + t0) - g0 * 4);
        }
        for (int64_t i = 0; i < n; ++i) xp_buf[i] = mean_g[i] + sd * eps[i];
      } else {
        for (int64_t i = 0; i < n; ++i) xp_buf[i] = mean_g[i];
      }
      // Store, and take the log-prob of the sample as stored.
      T* dst = out_sample + t0;
      for (int64_t i = 0; i < n; ++i) S::store(dst, i, xp_buf[i]);
      if (!std::is_same<T, float>::value)
        for (int64_t i = 0; i < n; ++i) xp_buf[i] = S::round(xp_buf[i]);
    } else {
      xp = tile_view(prev + t0, n, xp_buf);
    }
    const float* mean_lp = a.lp_guided ? mean_g : mean;
    if (out_mean) {
      T* dst = out_mean + t0;
      for (int64_t i = 0; i < n; ++i) S::store(dst, i, mean_lp[i]);
    }
    if (a.out_log_prob) lp_acc += sum_squares(xp, mean_lp, n);
    if (ref_v) {
      const float* rs = tile_view(ref_v + t0, n, tmp);
      for (int64_t i = 0; i < n; ++i) ref_mean[i] = cx * xs[i] + cv * rs[i];
      kl_acc += sum_squares(mean, ref_mean, n);
    }
  }
  *lp_sum = lp_acc;
  *kl_sum = kl_acc;
}

template <typename T>
void forward(const SdeForwardArgs& a) {
  const int64_t chunks = std::max<int64_t>(1, (a.numel + kChunk - 1) / kChunk);
  const int64_t tasks = a.batch * chunks;
  std::vector<double> lp(size_t(tasks), 0.0), kl(size_t(tasks), 0.0);
#pragma omp parallel for schedule(static) if (a.batch * a.numel >= kParallelGrain)
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
    if (a.out_log_prob) a.out_log_prob[b] = float(finalize_log_prob(a.lp_form, c.std, lp_sum, a.numel, a.reduce_mean));
    if (a.out_kl) a.out_kl[b] = float(finalize_kl(a.kl_form, c, kl_sum, a.numel, a.reduce_mean));
  }
}

template <typename T>
void backward_chunk(const SdeBackwardArgs& a, int64_t b, int64_t n0, int64_t n1) {
  using S = Storage<T>;
  const StepCoef c = step_coef(a.kind, a.sigma[b], a.sigma_next[b], a.noise_level, a.sigma_max);
  const float cx = c.cx, cv = c.cv;
  const float cg = a.guidance ? a.guidance_coef[b] : 0.0f;
  const float inv_n = reduce_weight(a.reduce_mean, a.numel);
  const float w_lp = a.grad_log_prob ? logprob_grad_weight(a.lp_form, c.std, a.grad_log_prob[b], inv_n) : 0.0f;
  const float w_kl = a.grad_kl ? kl_grad_weight(a.kl_form, c, a.grad_kl[b], inv_n) : 0.0f;
  const int64_t base = b * a.numel;
  const auto at = [base](const void* p) { return p ? static_cast<const T*>(p) + base : nullptr; };
  const T *v = at(a.v), *x = at(a.x), *xp = a.grad_log_prob ? at(a.sample) : nullptr,
          *guide = a.lp_guided ? at(a.guidance) : nullptr, *ref_v = a.grad_kl ? at(a.ref_v) : nullptr,
          *g_mean = at(a.grad_mean), *g_sample = at(a.grad_sample);
  const auto out = [base](void* p) { return p ? static_cast<T*>(p) + base : nullptr; };
  T *grad_v = out(a.grad_v), *grad_x = out(a.grad_x), *grad_ref_v = out(a.grad_ref_v);

  alignas(64) float xs[kTile], mean[kTile], grad_of_mean[kTile], grad_of_kl[kTile], tmp[kTile];
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t n = std::min(n1, t0 + kTile) - t0;
    load_tile(x + t0, n, xs);
    load_tile(v + t0, n, tmp);
    for (int64_t i = 0; i < n; ++i) mean[i] = cx * xs[i] + cv * tmp[i];
    // Gradient with respect to the mean; the guidance shift is a constant.
    for (int64_t i = 0; i < n; ++i) grad_of_mean[i] = 0.0f;
    if (g_mean) {
      load_tile(g_mean + t0, n, tmp);
      for (int64_t i = 0; i < n; ++i) grad_of_mean[i] += tmp[i];
    }
    if (g_sample) {
      load_tile(g_sample + t0, n, tmp);
      for (int64_t i = 0; i < n; ++i) grad_of_mean[i] += tmp[i];
    }
    if (xp) {
      if (guide) {
        load_tile(guide + t0, n, tmp);
        for (int64_t i = 0; i < n; ++i) grad_of_kl[i] = mean[i] + cg * tmp[i];  // grad_of_kl as scratch: the guided mean
      } else {
        for (int64_t i = 0; i < n; ++i) grad_of_kl[i] = mean[i];
      }
      load_tile(xp + t0, n, tmp);
      for (int64_t i = 0; i < n; ++i) grad_of_mean[i] += w_lp * (tmp[i] - grad_of_kl[i]);
    }
    // d kl / d mean. The reference mean shares cx * x, so the KL adds nothing to grad_x.
    if (ref_v) {
      load_tile(ref_v + t0, n, tmp);
      for (int64_t i = 0; i < n; ++i) grad_of_kl[i] = w_kl * (mean[i] - (cx * xs[i] + cv * tmp[i]));
    } else {
      for (int64_t i = 0; i < n; ++i) grad_of_kl[i] = 0.0f;
    }
    if (grad_v)
      for (int64_t i = 0; i < n; ++i) S::store(grad_v + t0, i, cv * (grad_of_mean[i] + grad_of_kl[i]));
    if (grad_x)
      for (int64_t i = 0; i < n; ++i) S::store(grad_x + t0, i, cx * grad_of_mean[i]);
    if (grad_ref_v)
      for (int64_t i = 0; i < n; ++i) S::store(grad_ref_v + t0, i, -cv * grad_of_kl[i]);
  }
}

template <typename T>
void backward(const SdeBackwardArgs& a) {
  const int64_t chunks = std::max<int64_t>(1, (a.numel + kChunk - 1) / kChunk);
  const int64_t tasks = a.batch * chunks;
#pragma omp parallel for schedule(static) if (a.batch * a.numel >= kParallelGrain)
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

void philox_normal(float* out, int64_t n, uint64_t seed, uint64_t offset) {
  constexpr int64_t kBlocks = kTile / 4;
  const int64_t blocks = (n + 3) / 4;
#pragma omp parallel for schedule(static) if (n >= kParallelGrain)
  for (int64_t j0 = 0; j0 < blocks; j0 += kBlocks) {
    alignas(64) float z[kTile];
    const int64_t nb = std::min(kBlocks, blocks - j0);
    philox_normal_blocks(seed, offset, uint64_t(j0), nb, z);
    const int64_t count = std::min(4 * nb, n - 4 * j0);
    std::copy(z, z + count, out + 4 * j0);
  }
}

}  // namespace FLOWSTEER_CPU_ISA
}  // namespace cpu
}  // namespace flowsteer

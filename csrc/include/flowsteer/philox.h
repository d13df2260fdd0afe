// Counter-based Philox4x32-10 and the Box-Muller transform, shared by the CPU and CUDA kernels.
//
// Stream layout (the same on both backends, and in the Triton kernels and ops/reference.py):
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(j), hi32(j), lo32(offset), hi32(offset)),  j = element_index / 4
// One Philox call yields four uint32; element 4j+l takes normal l of the call.
// Normals (n0, n1) come from (u0, u1) and (n2, n3) from (u2, u3):
//   u = (k + 0.5) / 2^32 in (0, 1),  r = sqrt(-2 ln u_a),  n_a = r cos(2 pi u_b),  n_b = r sin(2 pi u_b).
// log, sin and cos below are our own polynomials, so the CPU and CUDA code compute the same
// fp32 operations in the same order (CUDA is compiled with --fmad=false for that reason).
#pragma once
#include <cmath>

#include "flowsteer/common.h"

namespace flowsteer {

struct U32x4 {
  uint32_t x, y, z, w;
};

FS_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * uint64_t(b)) >> 32);
#endif
}

FS_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  // Fully unrolled, so that a loop over blocks around this call is straight-line code the CPU
  // compiler can vectorise.
#if defined(__CUDA_ARCH__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kMul0, c.x), lo0 = kMul0 * c.x;
    const uint32_t hi1 = mulhi32(kMul1, c.z), lo1 = kMul1 * c.z;
    c = U32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c;
}

// (k + 0.5) * 2^-32: never 0, so the log is finite.
FS_HD float uint_to_unit(uint32_t k) { return float(k) * 2.3283064365386963e-10f + 1.1641532182693481e-10f; }

// Natural log for u in (0, 1], Cephes-style: u = m * 2^e with m in [sqrt(1/2), sqrt(2)).
FS_HD float unit_log(float u) {
  const uint32_t bits = float_to_bits(u);
  const int32_t e = (int32_t(bits) - 0x3f3504f3) >> 23;
  const float m = bits_to_float(uint32_t(int32_t(bits) - (e << 23)));
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f + -1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f + -1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f + -1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f + -2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float ef = float(e);
  float y = f * z * p;
  y = y + ef * -2.12194440e-4f;
  y = y + -0.5f * z;
  return (f + y) + ef * 0.693359375f;
}

// sin and cos of 2*pi*u for u in [0, 1]: reduce to r = u - n/4 in [-1/8, 1/8] (exact), then
// minimax polynomials on [-pi/4, pi/4] and a quadrant rotation.
FS_HD void sincos_2pi(float u, float* s, float* c) {
  const float n = float(int32_t(u * 4.0f + 0.5f));
  const float r = u - n * 0.25f;
  const float t = r * 6.28318530717958647692f;
  const float t2 = t * t;
  const float sp = t + t * t2 * (-1.6666654611e-1f + t2 * (8.3321608736e-3f + t2 * -1.9515295891e-4f));
  const float cp = 1.0f - 0.5f * t2 + t2 * t2 * (4.166664568298827e-2f + t2 * (-1.388731625493765e-3f + t2 * 2.443315711809948e-5f));
  const int q = int32_t(n) & 3;
  *s = q == 0 ? sp : q == 1 ? cp : q == 2 ? -sp : -cp;
  *c = q == 0 ? cp : q == 1 ? -sp : q == 2 ? -cp : sp;
}

FS_HD void box_muller(uint32_t ka, uint32_t kb, float* n_a, float* n_b) {
  const float r = sqrtf(-2.0f * unit_log(uint_to_unit(ka)));
  float s, c;
  sincos_2pi(uint_to_unit(kb), &s, &c);
  *n_a = r * c;
  *n_b = r * s;
}

// The four standard normals for Philox block j (elements 4j .. 4j+3).
FS_HD void philox_normal4(uint64_t seed, uint64_t offset, uint64_t j, float out[4]) {
  const U32x4 k = philox4x32_10(U32x4{uint32_t(j), uint32_t(j >> 32), uint32_t(offset), uint32_t(offset >> 32)},
                                uint32_t(seed), uint32_t(seed >> 32));
  box_muller(k.x, k.y, &out[0], &out[1]);
  box_muller(k.z, k.w, &out[2], &out[3]);
}

}  // namespace flowsteer

// Portability macros and dtype conversions shared by the CPU and CUDA code.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

namespace flowsteer {

// Storage dtypes. The numbering is part of the binding contract with python/flowsteer/ops/codes.py.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

FS_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FS_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FS_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// Round to nearest even, as torch does; NaN stays a quiet NaN.
FS_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

FS_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Subnormal half: man * 2^-24, exact in fp32.
  const float mag = float(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

// Round to nearest even, including the subnormal range and overflow to inf.
FS_HD uint16_t float_to_fp16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero): scale so that the integer part is the half mantissa.
    // 0.5f added to a value < 2^-14 * 2^24 ... done with integer rounding below.
    if (a < 0x33000000u) return sign;  // < 2^-25 rounds to zero
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 113 - e + 13
    const uint32_t keep = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    const uint32_t r = keep + ((rem > half || (rem == half && (keep & 1u))) ? 1u : 0u);
    return uint16_t(sign | r);
  }
  uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

template <typename T> struct Storage;
template <> struct Storage<float> {
  static FS_HD float load(const float* p, int64_t i) { return p[i]; }
  static FS_HD void store(float* p, int64_t i, float f) { p[i] = f; }
  static FS_HD float round(float f) { return f; }
};
struct bf16_t { uint16_t bits; };
struct fp16_t { uint16_t bits; };
template <> struct Storage<bf16_t> {
  static FS_HD float load(const bf16_t* p, int64_t i) { return bf16_to_float(p[i].bits); }
  static FS_HD void store(bf16_t* p, int64_t i, float f) { p[i].bits = float_to_bf16(f); }
  static FS_HD float round(float f) { return bf16_to_float(float_to_bf16(f)); }
};
template <> struct Storage<fp16_t> {
  static FS_HD float load(const fp16_t* p, int64_t i) { return fp16_to_float(p[i].bits); }
  static FS_HD void store(fp16_t* p, int64_t i, float f) { p[i].bits = float_to_fp16(f); }
  static FS_HD float round(float f) { return fp16_to_float(float_to_fp16(f)); }
};

}  // namespace flowsteer

"""Triton transcription of the math in csrc/include/flowsteer/ (philox.h, sde_math.h, common.h).

Triton cannot include the C++ headers, so this module restates them one function for one
function, with the same fp32 operations in the same order. The kernels launch with
`enable_fp_fusion=False` (the CUDA code is compiled with --fmad=false for the same reason), and
divisions and square roots of the per-sample coefficients use the IEEE-rounded `div_rn` and
`sqrt_rn`; the Philox normals then carry the same bits as the CPU and CUDA backends.
"""
import math

import numpy as np
import triton
import triton.language as tl

# Codes shared with python/flowsteer/ops/codes.py and csrc/include/flowsteer/sde_math.h.
KIND_ODE = tl.constexpr(0)
KIND_FLOW = tl.constexpr(1)
KIND_DANCE = tl.constexpr(2)
KIND_CPS = tl.constexpr(3)
LP_GAUSSIAN = tl.constexpr(0)
LP_CPS_FLOW_GRPO = tl.constexpr(1)
KL_NONE = tl.constexpr(0)
KL_FLOW_GRPO = tl.constexpr(1)
KL_EXACT = tl.constexpr(2)

_PHILOX_MUL0 = tl.constexpr(0xD2511F53)
_PHILOX_MUL1 = tl.constexpr(0xCD9E8D57)
_PHILOX_WEYL0 = tl.constexpr(0x9E3779B9)
_PHILOX_WEYL1 = tl.constexpr(0xBB67AE85)


def split_u64(value: int):
    """(lo32, hi32) of an unsigned 64-bit integer, as Python ints in [0, 2^32)."""
    value = int(value) & 0xFFFFFFFFFFFFFFFF
    return value & 0xFFFFFFFF, value >> 32


def cps_sin(noise_level: float) -> float:
    """sinf(noise_level * pi/2) as step_coef computes it: the product in fp32, the sine rounded to fp32.

    It depends on noise_level alone, so the host computes it once instead of every program.
    """
    a = np.float32(noise_level) * np.float32(1.57079632679489662)
    return float(np.float32(math.sin(float(a))))


# ------------------------------------------------------------------------------------ Philox


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter (c0, c1, c2, c3) and key (k0, k1), all uint32 (philox.h)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_MUL0)
        lo0 = tl.mul(c0, _PHILOX_MUL0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, _PHILOX_MUL1)
        lo1 = tl.mul(c2, _PHILOX_MUL1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, _PHILOX_WEYL0, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_WEYL1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def uint_to_unit(k):
    """(k + 0.5) * 2^-32 in (0, 1): never 0, so the log is finite."""
    return k.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10


@triton.jit
def unit_log(u):
    """Natural log for u in (0, 1], Cephes-style: u = m 2^e with m in [sqrt(1/2), sqrt(2))."""
    bits = u.to(tl.int32, bitcast=True)
    e = (bits - 0x3F3504F3) >> 23
    m = (bits - (e << 23)).to(tl.float32, bitcast=True)
    f = m - 1.0
    z = f * f
    p = f * 7.0376836292e-2 + -1.1514610310e-1
    p = p * f + 1.1676998740e-1
    p = p * f + -1.2420140846e-1
    p = p * f + 1.4249322787e-1
    p = p * f + -1.6668057665e-1
    p = p * f + 2.0000714765e-1
    p = p * f + -2.4999993993e-1
    p = p * f + 3.3333331174e-1
    ef = e.to(tl.float32)
    y = f * z * p
    y = y + ef * -2.12194440e-4
    y = y + -0.5 * z
    return (f + y) + ef * 0.693359375


@triton.jit
def sincos_2pi(u):
    """(sin, cos) of 2 pi u for u in [0, 1]: r = u - n/4 in [-1/8, 1/8], polynomials, quadrant rotation."""
    n_i = (u * 4.0 + 0.5).to(tl.int32)
    n = n_i.to(tl.float32)
    r = u - n * 0.25
    t = r * 6.28318530717958647692
    t2 = t * t
    sp = t + t * t2 * (-1.6666654611e-1 + t2 * (8.3321608736e-3 + t2 * -1.9515295891e-4))
    cp = 1.0 - 0.5 * t2 + t2 * t2 * (4.166664568298827e-2 + t2 * (-1.388731625493765e-3 + t2 * 2.443315711809948e-5))
    q = n_i & 3
    s = tl.where(q == 0, sp, tl.where(q == 1, cp, tl.where(q == 2, -sp, -cp)))
    c = tl.where(q == 0, cp, tl.where(q == 1, -sp, tl.where(q == 2, -cp, sp)))
    return s, c


@triton.jit
def box_muller(ka, kb):
    """Two standard normals from two uint32: r = sqrt(-2 ln u_a), (r cos 2 pi u_b, r sin 2 pi u_b)."""
    r = tl.sqrt_rn(-2.0 * unit_log(uint_to_unit(ka)))
    s, c = sincos_2pi(uint_to_unit(kb))
    return r * c, r * s


@triton.jit
def philox_normal4(j, seed_lo, seed_hi, off_lo, off_hi):
    """The four normals of Philox block j (int64 tensor), elements 4j .. 4j+3 of the stream.

    Key (lo32(seed), hi32(seed)), counter (lo32(j), hi32(j), lo32(offset), hi32(offset)); the
    seed and offset halves are uint32 scalars.
    """
    c0 = j.to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, zero + off_lo, zero + off_hi, seed_lo, seed_hi)
    n0, n1 = box_muller(r0, r1)
    n2, n3 = box_muller(r2, r3)
    return n0, n1, n2, n3


@triton.jit
def philox_normal_tile(j0, ROWS: tl.constexpr, seed_lo, seed_hi, off_lo, off_hi):
    """Normals of the global elements 4 j0 .. 4 (j0 + ROWS) - 1 as a [ROWS, 4] tile.

    One Philox call per row: every call's four outputs are used, none is drawn twice.
    """
    j = j0 + tl.arange(0, ROWS).to(tl.int64)
    n0, n1, n2, n3 = philox_normal4(j, seed_lo, seed_hi, off_lo, off_hi)
    lane = tl.arange(0, 4)[None, :]
    return tl.where(lane == 0, n0[:, None],
                    tl.where(lane == 1, n1[:, None], tl.where(lane == 2, n2[:, None], n3[:, None])))


# ------------------------------------------------------------------------------ storage dtypes


@triton.jit
def round_to_storage(f, DTYPE: tl.constexpr):
    """f (fp32) rounded to nearest even in DTYPE: (the value to store, the same value as fp32).

    bf16 is rounded with integer ops as common.h does: Triton's own fp32 -> bf16 cast truncates
    under TRITON_INTERPRET=1, and this way the stored bits are the same everywhere.
    """
    if DTYPE == tl.bfloat16:
        u = f.to(tl.uint32, bitcast=True)
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        hi = tl.where(is_nan, (u >> 16) | 0x40, (u + (0x7FFF + ((u >> 16) & 1))) >> 16)
        stored = hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        back = (hi << 16).to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        stored = f.to(tl.float16)
        back = stored.to(tl.float32)
    else:
        stored = f
        back = f
    return stored, back


# ------------------------------------------------------------------------- step coefficients


@triton.jit
def step_coef(sigma, sigma_next, noise_level, sigma_max, sin_half_pi_a, KIND: tl.constexpr):
    """(cx, cv, std, std_coef) of one sample, mean = cx x + cv v (sde_math.h step_coef).

    sin_half_pi_a is sinf(noise_level * pi/2), used by cps only (see cps_sin).
    """
    delta = sigma - sigma_next
    if KIND == KIND_FLOW or KIND == KIND_DANCE:
        if KIND == KIND_FLOW:
            sigma_t = tl.where(sigma < 1.0, sigma, sigma_max)
            std_coef = noise_level * tl.sqrt_rn(tl.div_rn(sigma, 1.0 - sigma_t))
        else:
            std_coef = noise_level + tl.zeros_like(sigma)
        k = tl.div_rn(std_coef * std_coef * delta, 2.0 * sigma)
        cx = 1.0 - k
        cv = -delta - k * (1.0 - sigma)
        std = std_coef * tl.sqrt_rn(delta)
    elif KIND == KIND_CPS:
        s = sigma_next * sin_half_pi_a
        direction = tl.sqrt_rn(tl.maximum(sigma_next * sigma_next - s * s, 0.0))
        cx = (1.0 - sigma_next) + direction
        cv = -(1.0 - sigma_next) * sigma + direction * (1.0 - sigma)
        std = s
        std_coef = s
    else:
        cx = tl.full([], 1.0, tl.float32)
        cv = -delta
        std = tl.zeros_like(sigma)
        std_coef = tl.zeros_like(sigma)
    return cx, cv, std, std_coef


@triton.jit
def logprob_scale(std, LP_FORM: tl.constexpr):
    """-(x' - mean)^2 * scale per element: 1 / (2 std^2), or 1 for Flow-GRPO's simplified cps form."""
    if LP_FORM == LP_CPS_FLOW_GRPO:
        scale = tl.full([], 1.0, tl.float32)
    else:
        scale = tl.div_rn(tl.full([], 1.0, tl.float32), 2.0 * std * std)
    return scale


@triton.jit
def logprob_const(std, LP_FORM: tl.constexpr):
    """Per-element constant of the log-prob: -log std - log(2 pi)/2 (0 for the simplified cps form)."""
    if LP_FORM == LP_CPS_FLOW_GRPO:
        c = tl.zeros_like(std)
    else:
        c = -tl.log(std) - 0.91893853320467274178
    return c


@triton.jit
def kl_divisor(std, std_coef, KL_FORM: tl.constexpr):
    """2 std^2 for the exact KL, 2 std_coef^2 (Flow-GRPO's std_dev_t) otherwise."""
    if KL_FORM == KL_EXACT:
        d = 2.0 * std * std
    else:
        d = 2.0 * std_coef * std_coef
    return d


@triton.jit
def finalize_log_prob(sum_sq, std, n, LP_FORM: tl.constexpr, REDUCE_MEAN: tl.constexpr):
    """Mirrors finalize_log_prob in csrc/include/flowsteer/sde_math.h: a sample's log-prob from the
    fp64 sum of (x' - mean_lp)^2 over its n elements (n fp64)."""
    scaled = -sum_sq * logprob_scale(std, LP_FORM).to(tl.float64)
    cst = logprob_const(std, LP_FORM).to(tl.float64)
    if REDUCE_MEAN:
        lp = scaled / n + cst
    else:
        lp = scaled + cst * n
    return lp


@triton.jit
def finalize_kl(sum_sq, std, std_coef, n, KL_FORM: tl.constexpr, REDUCE_MEAN: tl.constexpr):
    """Mirrors finalize_kl in sde_math.h: a sample's KL from the fp64 sum of (mean - ref_mean)^2."""
    kl = sum_sq / kl_divisor(std, std_coef, KL_FORM).to(tl.float64)
    if REDUCE_MEAN:
        kl = kl / n
    return kl


@triton.jit
def logprob_grad_weight(grad_lp, std, inv_n, LP_FORM: tl.constexpr):
    """Mirrors logprob_grad_weight in sde_math.h: d log_prob / d mean_i = w (x'_i - mean_lp_i)."""
    return grad_lp * inv_n * 2.0 * logprob_scale(std, LP_FORM)


@triton.jit
def kl_grad_weight(grad_kl, std, std_coef, inv_n, KL_FORM: tl.constexpr):
    """Mirrors kl_grad_weight in sde_math.h: d kl / d mean_i = w (mean_i - ref_mean_i)."""
    return tl.div_rn(grad_kl * inv_n * 2.0, kl_divisor(std, std_coef, KL_FORM))

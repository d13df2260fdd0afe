"""Triton kernels of the fused SDE step, its backward, and the Philox normals.

They compute what csrc/cpu/sde_step.cpp computes, element for element:

    mean   = cx x + cv v                     (cx, cv, std, std_coef from sigma[b], sigma_next[b])
    mean_g = mean + guidance_coef[b] G
    x'     = mean_g + std eps                 (sample mode; eps given or Philox(seed, offset))
    log_prob[b] = reduce(-(x' - mean_lp)^2 scale + const),  mean_lp = mean_g if lp_guided else mean
    kl[b]       = reduce((mean - (cx x + cv ref_v))^2) / kl_divisor

The forward is two kernels: one program per (chunk, sample) writes fp32 partial sums of
(x' - mean_lp)^2 and (mean - ref_mean)^2 into a workspace, and one program per sample adds them
in a fixed order in fp64 and writes log_prob, kl and std. Nothing uses atomics, so results are
bitwise reproducible run to run.

Noise: element n of sample b has global index i = b N + n and takes lane i & 3 of Philox block
i >> 2, as on the CPU and CUDA backends. A forward tile is therefore laid out as [BLOCK / 4, 4]
rows of whole Philox blocks, aligned on the global index: one Philox call per row, no normal drawn
and thrown away.
"""
import numpy as np
import torch
import triton
import triton.language as tl

from ._common import (
    KIND_ODE,
    cps_sin,
    finalize_kl,
    finalize_log_prob,
    kl_grad_weight,
    logprob_grad_weight,
    philox_normal_tile,
    round_to_storage,
    split_u64,
    step_coef,
)

# Elements of one sample per forward program ([BLOCK / 4, 4] tile) and per backward program.
# Memory-bound sizes: 2048 elements move 8-32 KiB per program and leave a Wan or SD3 latent
# thousands of programs.
_FWD_BLOCK = 2048
_FWD_WARPS = 8
_BWD_BLOCK = 2048
_BWD_WARPS = 8
# Workspace partials a finalize program reads per step.
_FIN_BLOCK = 512
_NOISE_BLOCK = 2048


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi"])
def _sde_forward_kernel(
    v_ptr, x_ptr, noise_ptr, prev_ptr, guide_ptr, ref_ptr,
    sigma_ptr, sigma_next_ptr, coef_ptr,
    out_sample_ptr, out_mean_ptr, ws_ptr,
    N, num_chunks,
    noise_level, sigma_max, sin_half_pi_a,
    seed_lo, seed_hi, off_lo, off_hi,
    KIND: tl.constexpr, LP_GUIDED: tl.constexpr, SAMPLE: tl.constexpr, HAS_NOISE: tl.constexpr,
    HAS_GUIDE: tl.constexpr, HAS_REF: tl.constexpr, HAS_OUT_SAMPLE: tl.constexpr, HAS_OUT_MEAN: tl.constexpr,
    NEED_LP: tl.constexpr, NEED_KL: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    ROWS: tl.constexpr = BLOCK // 4
    sigma = tl.load(sigma_ptr + b)
    sigma_next = tl.load(sigma_next_ptr + b)
    cx, cv, std, std_coef = step_coef(sigma, sigma_next, noise_level, sigma_max, sin_half_pi_a, KIND)

    # Global indices of this tile: Philox rows aligned on multiples of 4 of b * N.
    base = b.to(tl.int64) * N
    j0 = base // 4 + chunk.to(tl.int64) * ROWS
    idx = (j0 + tl.arange(0, ROWS).to(tl.int64))[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = (idx >= base) & (idx < base + N)

    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    mean = cx * x + cv * v
    if HAS_GUIDE:
        cg = tl.load(coef_ptr + b)
        mean_g = mean + cg * tl.load(guide_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        mean_g = mean

    if SAMPLE:
        if KIND != KIND_ODE:
            if HAS_NOISE:
                eps = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            else:
                eps = philox_normal_tile(j0, ROWS, tl.cast(seed_lo, tl.uint32), tl.cast(seed_hi, tl.uint32),
                                         tl.cast(off_lo, tl.uint32), tl.cast(off_hi, tl.uint32))
            drawn = tl.where(std != 0.0, mean_g + std * eps, mean_g)
        else:
            drawn = mean_g
        # The log-prob is of the sample as stored.
        stored, xp = round_to_storage(drawn, v_ptr.dtype.element_ty)
        if HAS_OUT_SAMPLE:
            tl.store(out_sample_ptr + idx, stored, mask=mask)
    else:
        xp = tl.load(prev_ptr + idx, mask=mask, other=0.0).to(tl.float32)

    if LP_GUIDED:
        mean_lp = mean_g
    else:
        mean_lp = mean
    if HAS_OUT_MEAN:
        stored_mean, _ = round_to_storage(mean_lp, v_ptr.dtype.element_ty)
        tl.store(out_mean_ptr + idx, stored_mean, mask=mask)

    ws = ws_ptr + (b * num_chunks + chunk) * 2
    if NEED_LP:
        d = tl.where(mask, xp - mean_lp, 0.0)
        tl.store(ws, tl.sum(tl.sum(d * d, axis=1), axis=0))
    if NEED_KL:
        if HAS_REF:
            ref = tl.load(ref_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            dm = tl.where(mask, mean - (cx * x + cv * ref), 0.0)
            tl.store(ws + 1, tl.sum(tl.sum(dm * dm, axis=1), axis=0))
        else:
            tl.store(ws + 1, 0.0)


@triton.jit(do_not_specialize=["N", "num_chunks"])
def _sde_finalize_kernel(
    ws_ptr, sigma_ptr, sigma_next_ptr, out_lp_ptr, out_std_ptr, out_kl_ptr,
    N, num_chunks,
    noise_level, sigma_max, sin_half_pi_a,
    KIND: tl.constexpr, LP_FORM: tl.constexpr, KL_FORM: tl.constexpr, REDUCE_MEAN: tl.constexpr,
    HAS_LP: tl.constexpr, HAS_KL: tl.constexpr, HAS_STD: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    sigma = tl.load(sigma_ptr + b)
    sigma_next = tl.load(sigma_next_ptr + b)
    cx, cv, std, std_coef = step_coef(sigma, sigma_next, noise_level, sigma_max, sin_half_pi_a, KIND)
    if HAS_STD:
        tl.store(out_std_ptr + b, std)
    if HAS_LP or HAS_KL:
        lp_acc = tl.zeros([BLOCK], tl.float64)
        kl_acc = tl.zeros([BLOCK], tl.float64)
        row = ws_ptr + b.to(tl.int64) * num_chunks * 2
        for c0 in range(0, num_chunks, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            m = c < num_chunks
            if HAS_LP:
                lp_acc += tl.load(row + c * 2, mask=m, other=0.0).to(tl.float64)
            if HAS_KL:
                kl_acc += tl.load(row + c * 2 + 1, mask=m, other=0.0).to(tl.float64)
        n = tl.cast(N, tl.float64)
        if HAS_LP:
            lp = finalize_log_prob(tl.sum(lp_acc, axis=0), std, n, LP_FORM, REDUCE_MEAN)
            tl.store(out_lp_ptr + b, lp.to(tl.float32))
        if HAS_KL:
            kl = finalize_kl(tl.sum(kl_acc, axis=0), std, std_coef, n, KL_FORM, REDUCE_MEAN)
            tl.store(out_kl_ptr + b, kl.to(tl.float32))


@triton.jit
def _sde_backward_kernel(
    v_ptr, x_ptr, sample_ptr, guide_ptr, ref_ptr,
    sigma_ptr, sigma_next_ptr, coef_ptr,
    grad_lp_ptr, grad_kl_ptr, grad_mean_ptr, grad_sample_ptr,
    grad_v_ptr, grad_x_ptr, grad_ref_ptr,
    N, inv_n,
    noise_level, sigma_max, sin_half_pi_a,
    KIND: tl.constexpr, LP_FORM: tl.constexpr, KL_FORM: tl.constexpr,
    HAS_GRAD_LP: tl.constexpr, HAS_GRAD_KL: tl.constexpr, HAS_GRAD_MEAN: tl.constexpr,
    HAS_GRAD_SAMPLE: tl.constexpr, GUIDED_LP: tl.constexpr,
    HAS_GRAD_V: tl.constexpr, HAS_GRAD_X: tl.constexpr, HAS_GRAD_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    sigma = tl.load(sigma_ptr + b)
    sigma_next = tl.load(sigma_next_ptr + b)
    cx, cv, std, std_coef = step_coef(sigma, sigma_next, noise_level, sigma_max, sin_half_pi_a, KIND)

    n = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    idx = b.to(tl.int64) * N + n

    grad_of_mean = tl.zeros([BLOCK], tl.float32)
    if HAS_GRAD_MEAN:
        grad_of_mean += tl.load(grad_mean_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SAMPLE:
        grad_of_mean += tl.load(grad_sample_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_LP or HAS_GRAD_KL:
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        mean = cx * x + cv * tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_LP:
        w_lp = logprob_grad_weight(tl.load(grad_lp_ptr + b), std, inv_n, LP_FORM)
        if GUIDED_LP:
            mean_lp = mean + tl.load(coef_ptr + b) * tl.load(guide_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        else:
            mean_lp = mean
        grad_of_mean += w_lp * (tl.load(sample_ptr + idx, mask=mask, other=0.0).to(tl.float32) - mean_lp)
    if HAS_GRAD_KL:
        # The reference mean shares cx x, so the KL adds nothing to grad_x.
        w_kl = kl_grad_weight(tl.load(grad_kl_ptr + b), std, std_coef, inv_n, KL_FORM)
        grad_of_kl = w_kl * (mean - (cx * x + cv * tl.load(ref_ptr + idx, mask=mask, other=0.0).to(tl.float32)))
    else:
        grad_of_kl = tl.zeros([BLOCK], tl.float32)
    if HAS_GRAD_V:
        gv, _ = round_to_storage(cv * (grad_of_mean + grad_of_kl), grad_v_ptr.dtype.element_ty)
        tl.store(grad_v_ptr + idx, gv, mask=mask)
    if HAS_GRAD_X:
        gx, _ = round_to_storage(cx * grad_of_mean, grad_x_ptr.dtype.element_ty)
        tl.store(grad_x_ptr + idx, gx, mask=mask)
    if HAS_GRAD_REF:
        gr, _ = round_to_storage(-cv * grad_of_kl, grad_ref_ptr.dtype.element_ty)
        tl.store(grad_ref_ptr + idx, gr, mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi"])
def _philox_normal_kernel(out_ptr, n, seed_lo, seed_hi, off_lo, off_hi, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 4
    j0 = tl.program_id(0).to(tl.int64) * ROWS
    eps = philox_normal_tile(j0, ROWS, tl.cast(seed_lo, tl.uint32), tl.cast(seed_hi, tl.uint32),
                             tl.cast(off_lo, tl.uint32), tl.cast(off_hi, tl.uint32))
    idx = (j0 + tl.arange(0, ROWS).to(tl.int64))[:, None] * 4 + tl.arange(0, 4)[None, :]
    tl.store(out_ptr + idx, eps, mask=idx < n)


def _or(t, dummy):
    return dummy if t is None else t


def sde_forward(*, v, x, noise, prev_sample, guidance, ref_v, sigma, sigma_next, guidance_coef,
                out_sample, out_mean, out_log_prob, out_std, out_kl, opts) -> None:
    """Fused SDE step forward.

    v, x, noise, prev_sample, guidance, ref_v, out_sample, out_mean: [B, N], one dtype (fp32, bf16
    or fp16), contiguous; sigma, sigma_next, guidance_coef, out_log_prob, out_std, out_kl: fp32 [B].
    None means absent. prev_sample None is sample mode; noise None there draws Philox(seed, offset).
    opts: the step's options (flowsteer.ops.options.SdeOptions: kind, noise_level, sigma_max, seed,
    offset, lp_form, kl_form, reduce_mean, lp_guided).
    """
    kind, lp_form, kl_form, reduce_mean, lp_guided = opts.kind, opts.lp_form, opts.kl_form, opts.reduce_mean, opts.lp_guided
    noise_level, sigma_max, seed, offset = opts.noise_level, opts.sigma_max, opts.seed, opts.offset
    B, N = v.shape
    if B == 0:
        return
    sample_mode = prev_sample is None
    need_lp = out_log_prob is not None
    need_kl = out_kl is not None
    # A tile starts on a multiple of 4 of the global index; a sample that starts off one needs
    # up to 3 more elements' room.
    num_chunks = max(1, triton.cdiv(N + (3 if N % 4 else 0), _FWD_BLOCK))
    workspace = (torch.empty(B * num_chunks * 2, dtype=torch.float32, device=v.device)
                 if need_lp or need_kl else sigma)
    sin_a = cps_sin(noise_level)
    seed_lo, seed_hi = split_u64(seed)
    off_lo, off_hi = split_u64(offset)
    scalars = (float(noise_level), float(sigma_max), sin_a)
    _sde_forward_kernel[(num_chunks, B)](
        v, x, _or(noise, v), _or(prev_sample, v), _or(guidance, v), _or(ref_v, v),
        sigma, sigma_next, _or(guidance_coef, sigma),
        _or(out_sample, v), _or(out_mean, v), workspace,
        N, num_chunks, *scalars, seed_lo, seed_hi, off_lo, off_hi,
        KIND=int(kind), LP_GUIDED=bool(lp_guided) and guidance is not None, SAMPLE=sample_mode,
        HAS_NOISE=noise is not None, HAS_GUIDE=guidance is not None, HAS_REF=ref_v is not None,
        HAS_OUT_SAMPLE=out_sample is not None, HAS_OUT_MEAN=out_mean is not None, NEED_LP=need_lp, NEED_KL=need_kl,
        BLOCK=_FWD_BLOCK, num_warps=_FWD_WARPS, enable_fp_fusion=False,
    )
    if out_std is None and not need_lp and not need_kl:
        return
    dummy = sigma
    _sde_finalize_kernel[(B,)](
        workspace, sigma, sigma_next, _or(out_log_prob, dummy), _or(out_std, dummy), _or(out_kl, dummy),
        N, num_chunks, *scalars,
        KIND=int(kind), LP_FORM=int(lp_form), KL_FORM=int(kl_form), REDUCE_MEAN=bool(reduce_mean),
        HAS_LP=need_lp, HAS_KL=need_kl, HAS_STD=out_std is not None,
        BLOCK=_FIN_BLOCK, num_warps=4, enable_fp_fusion=False,
    )


def sde_backward(*, v, x, sample, guidance, ref_v, sigma, sigma_next, guidance_coef,
                 grad_log_prob, grad_kl, grad_mean, grad_sample, grad_v, grad_x, grad_ref_v, opts) -> None:
    """Backward of sde_forward with the sample held fixed: grad_v, grad_x, grad_ref_v [B, N].

    grad_mean, grad_sample: [B, N] in v's dtype; grad_log_prob, grad_kl: fp32 [B]. Any may be None;
    sample is needed with grad_log_prob, ref_v with grad_kl. opts: as sde_forward's.
    """
    kind, lp_form, kl_form, reduce_mean, lp_guided = opts.kind, opts.lp_form, opts.kl_form, opts.reduce_mean, opts.lp_guided
    noise_level, sigma_max = opts.noise_level, opts.sigma_max
    B, N = v.shape
    if B == 0 or (grad_v is None and grad_x is None and grad_ref_v is None):
        return
    if grad_log_prob is not None and sample is None:
        raise ValueError("sde_backward: grad_log_prob needs the sample the log-prob was taken at (got sample=None)")
    if grad_kl is not None and ref_v is None:
        raise ValueError("sde_backward: grad_kl needs ref_v (got ref_v=None)")
    # reduce_weight of sde_math.h: 1 / float(numel) in fp32, as the C++ code computes it.
    inv_n = float(np.float32(1.0) / np.float32(N)) if reduce_mean else 1.0
    guided_lp = bool(lp_guided) and guidance is not None and grad_log_prob is not None
    _sde_backward_kernel[(triton.cdiv(N, _BWD_BLOCK), B)](
        v, x, _or(sample, v), _or(guidance, v), _or(ref_v, v),
        sigma, sigma_next, _or(guidance_coef, sigma),
        _or(grad_log_prob, sigma), _or(grad_kl, sigma), _or(grad_mean, v), _or(grad_sample, v),
        _or(grad_v, v), _or(grad_x, v), _or(grad_ref_v, v),
        N, inv_n, float(noise_level), float(sigma_max), cps_sin(noise_level),
        KIND=int(kind), LP_FORM=int(lp_form), KL_FORM=int(kl_form),
        HAS_GRAD_LP=grad_log_prob is not None, HAS_GRAD_KL=grad_kl is not None,
        HAS_GRAD_MEAN=grad_mean is not None, HAS_GRAD_SAMPLE=grad_sample is not None, GUIDED_LP=guided_lp,
        HAS_GRAD_V=grad_v is not None, HAS_GRAD_X=grad_x is not None, HAS_GRAD_REF=grad_ref_v is not None,
        BLOCK=_BWD_BLOCK, num_warps=_BWD_WARPS, enable_fp_fusion=False,
    )


def philox_normal(out, seed: int, offset: int) -> None:
    """out fp32 [n]: element i is lane i & 3 of philox_normal4(seed, offset, i >> 2)."""
    n = out.numel()
    if n == 0:
        return
    seed_lo, seed_hi = split_u64(seed)
    off_lo, off_hi = split_u64(offset)
    _philox_normal_kernel[(triton.cdiv(n, _NOISE_BLOCK),)](
        out, n, seed_lo, seed_hi, off_lo, off_hi, BLOCK=_NOISE_BLOCK, num_warps=8, enable_fp_fusion=False)

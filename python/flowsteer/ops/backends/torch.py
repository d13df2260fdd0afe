"""The "torch" backend: the fp64 reference (ops/reference.py) evaluated in fp32, with the same
Philox noise stream. It runs anywhere, and is what `auto` falls back to without the compiled core."""
from __future__ import annotations

import torch

from .. import reference
from ..codes import KIND_NAME, STD_MODE
from ._common import segments

Tensor = torch.Tensor


def sde_forward(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v, opts, out) -> None:
    f = torch.float32
    kind = KIND_NAME[opts.kind]
    if prev_sample is None and noise is None and kind != "ode":
        noise = reference.philox_normal(x.numel(), opts.seed, opts.offset, dtype=f).to(x.device).reshape(x.shape)
    shift = None
    if guidance is not None:
        shift = guidance.to(f) * guidance_coef.reshape(-1, *([1] * (x.ndim - 1)))
    res = reference.sde_step(
        v.to(f), x.to(f), sigma, sigma_next, kind, opts.noise_level,
        noise=None if noise is None else noise.to(f), prev_sample=None if prev_sample is None else prev_sample.to(f),
        sigma_max=opts.sigma_max, guidance=shift, guidance_scale=1.0, guidance_norm="none",
        logprob_mean="guided" if opts.lp_guided else "unguided", reduce="mean" if opts.reduce_mean else "sum",
        cps_logprob="flow_grpo" if opts.lp_form == 1 else "exact", ref_v=None if ref_v is None else ref_v.to(f),
        kl="exact" if opts.kl_form == 2 else "flow_grpo", sample_dtype=x.dtype)
    if prev_sample is None:
        out.sample.copy_(res["prev_sample"])
    if out.mean.numel():
        out.mean.copy_(res["mean"])
    if out.log_prob.numel():
        out.log_prob.copy_(res["log_prob"])
    out.std.copy_(res["std"])
    if out.kl.numel():
        out.kl.copy_(res["kl"])


def sde_backward(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v, grad_log_prob, grad_kl, grad_mean,
                 grad_sample, opts, out) -> None:
    """The analytic gradient of the fp32 reference (registered-op implementations run below
    autograd, so the reference cannot be differentiated here), with the sample held fixed."""
    f = torch.float32
    xf, vf = x.to(f), v.to(f)
    mean_fn, std, std_coef = reference.sde_coefficients(sigma, sigma_next, KIND_NAME[opts.kind], opts.noise_level,
                                                        opts.sigma_max, xf)
    # The mean is linear in (x, v): its coefficients are the mean of unit inputs.
    ones, zeros = torch.ones_like(std), torch.zeros_like(std)
    cx, cv = mean_fn(ones, zeros), mean_fn(zeros, ones)
    mean = cx * xf + cv * vf
    inv_n = 1.0 / x[0].numel() if opts.reduce_mean else 1.0
    per_sample = lambda t: t.reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731
    grad_of_mean = torch.zeros_like(xf)
    for gm in (grad_mean, grad_sample):
        if gm is not None:
            grad_of_mean = grad_of_mean + gm.to(f)
    if grad_log_prob is not None:
        mean_lp = mean
        if opts.lp_guided and guidance is not None:
            mean_lp = mean + per_sample(guidance_coef) * guidance.to(f)
        scale = torch.ones_like(std) if opts.lp_form == 1 else 1.0 / (2 * std**2)
        grad_of_mean = grad_of_mean + per_sample(grad_log_prob) * inv_n * 2 * scale * (sample.to(f) - mean_lp)
    grad_of_kl = torch.zeros_like(xf)
    if grad_kl is not None:
        divisor = 2 * (std**2 if opts.kl_form == 2 else std_coef**2)
        grad_of_kl = per_sample(grad_kl) * inv_n * 2 / divisor * (mean - (cx * xf + cv * ref_v.to(f)))
    if out.grad_v.numel():
        out.grad_v.copy_(cv * (grad_of_mean + grad_of_kl))
    if out.grad_x.numel():
        out.grad_x.copy_(cx * grad_of_mean)
    if out.grad_ref_v.numel():
        out.grad_ref_v.copy_(-cv * grad_of_kl)


def philox_normal(out, seed: int, offset: int) -> None:
    out.copy_(reference.philox_normal(out.numel(), seed, offset, dtype=torch.float32))


def group_zscore(rewards, group_ids, weights, global_std, std_mode: int, eps: float, clip: float, out) -> None:
    std_name = {v: name for name, v in STD_MODE.items()}[std_mode]
    acc = torch.zeros(rewards.shape[0], dtype=torch.float32, device=rewards.device)
    for j in range(rewards.shape[1]):
        acc += weights[j] * reference.group_zscore(rewards[:, j], group_ids, std_name, eps, global_std[j])
    out.copy_(acc.clamp(-clip, clip) if clip > 0 else acc)


def win_rate(prefs, out) -> None:
    out.copy_(reference.win_rate(prefs))


def pareto_mask(rewards, group_ids, out) -> None:
    """The reference's pareto_mask vectorised over groups (padded to the largest group S: memory
    G * S^2 * K); the reference itself loops over pairs in Python."""
    order, offsets, counts = segments(group_ids)
    g_of = torch.repeat_interleave(torch.arange(counts.numel(), device=rewards.device), counts)
    rank = torch.arange(rewards.shape[0], device=rewards.device) - offsets[:-1][g_of]
    padded = torch.full((counts.numel(), int(counts.max()), rewards.shape[1]), float("-inf"), device=rewards.device)
    padded[g_of, rank] = rewards[order]
    valid = torch.zeros(padded.shape[:2], dtype=torch.bool, device=rewards.device)
    valid[g_of, rank] = True
    # dominates[g, i, j]: sample j dominates sample i.
    ge = (padded[:, None, :, :] >= padded[:, :, None, :]).all(dim=-1)
    gt = (padded[:, None, :, :] > padded[:, :, None, :]).any(dim=-1)
    dominated = (ge & gt & valid[:, None, :]).any(dim=-1)
    mask = torch.empty(rewards.shape[0], dtype=torch.uint8, device=rewards.device)
    mask[order] = (~dominated[g_of, rank]).to(torch.uint8)
    out.copy_(mask)

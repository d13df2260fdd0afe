"""The pure-torch statement of every flowsteer op.

This file is the specification. Tests compare every backend with it in fp64, benchmarks use it as
the eager and torch.compile baselines, and `flowsteer.set_backend("torch")` runs it. It is written
to be read, not to be fast: every formula is spelled out as in docs/ops.md (the math conventions).

Notation: sigmas run from 1 (noise) to 0 (data), x_sigma = (1 - sigma) x0 + sigma eps, the model
predicts v = eps - x0, one step goes sigma -> sigma_next < sigma with delta = sigma - sigma_next.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

Scalar = Union[float, torch.Tensor]

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(value: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] tensor as a [B, 1, ..., 1] tensor in like's dtype and device."""
    if isinstance(value, torch.Tensor):
        t = value.to(dtype=like.dtype, device=like.device)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
    else:  # a fill, not a host-to-device copy, so that the reference can be captured in a CUDA graph
        t = torch.full((like.shape[0],), float(value), dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _reduce(t: torch.Tensor, reduce: str) -> torch.Tensor:
    dims = tuple(range(1, t.ndim))
    return t.mean(dim=dims) if reduce == "mean" else t.sum(dim=dims)


def sde_coefficients(sigma, sigma_next, kind: str, noise_level: float, sigma_max: Optional[float], like):
    """Per-sample std and Flow-GRPO's g (std_dev_t) as [B, 1, ...] tensors, and the mean function."""
    s, sn = _per_sample(sigma, like), _per_sample(sigma_next, like)
    delta = s - sn
    a = noise_level
    if kind == "ode":
        zero = torch.zeros_like(s)
        return (lambda x, v: x - delta * v), zero, zero
    if kind in ("flow", "dance"):
        if kind == "flow":
            sigma_t = torch.where(s < 1, s, torch.full_like(s, sigma_max if sigma_max is not None else float("nan")))
            g = a * torch.sqrt(s / (1 - sigma_t))
        else:
            g = torch.full_like(s, a)
        mean_fn = lambda x, v: x - delta * v - (g**2 * delta / (2 * s)) * (x + (1 - s) * v)  # noqa: E731
        return mean_fn, g * torch.sqrt(delta), g
    if kind == "cps":
        std = sn * math.sin(a * math.pi / 2)
        dir_ = torch.sqrt((sn**2 - std**2).clamp_min(0))
        mean_fn = lambda x, v: (1 - sn) * (x - s * v) + dir_ * (x + (1 - s) * v)  # noqa: E731
        return mean_fn, std, std
    raise ValueError(f"kind must be one of 'ode', 'flow', 'dance', 'cps' (got {kind!r})")


def guidance_direction(guidance: torch.Tensor, norm: str) -> torch.Tensor:
    """G, G / (||G||_sample + 1e-8) or G / (||G||_batch + 1e-8)."""
    g = guidance.detach()
    if norm == "none":
        return g
    if norm == "sample":
        n = g.flatten(1).norm(dim=1).reshape(-1, *([1] * (g.ndim - 1)))
        return g / (n + 1e-8)
    if norm == "batch":
        return g / (g.norm() + 1e-8)
    raise ValueError(f"guidance_norm must be 'none', 'sample' or 'batch' (got {norm!r})")


def sde_step(
    v: torch.Tensor,
    x: torch.Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    kind: str = "flow",
    noise_level: float = 0.7,
    *,
    noise: Optional[torch.Tensor] = None,
    prev_sample: Optional[torch.Tensor] = None,
    sigma_max: Optional[float] = None,
    guidance: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    guidance_norm: str = "none",
    scale_by_dt: bool = False,
    logprob_mean: str = "unguided",
    reduce: str = "mean",
    cps_logprob: str = "exact",
    ref_v: Optional[torch.Tensor] = None,
    kl: str = "flow_grpo",
    sample_dtype: Optional[torch.dtype] = None,
) -> dict:
    """One SDE step. v, x, noise, prev_sample, guidance, ref_v: [B, ...]; sigma, sigma_next: float or [B].

    Returns a dict with prev_sample [B, ...], mean [B, ...] (the mean the log-prob is taken under),
    log_prob [B] (None for ode), std [B], g [B] and kl [B] (None without ref_v). Math runs in v's dtype.
    sample_dtype rounds a drawn sample to that dtype before its log-prob is taken, as a kernel storing
    the sample in a low-precision tensor does.
    """
    mean_fn, std, g = sde_coefficients(sigma, sigma_next, kind, noise_level, sigma_max, x)
    mean = mean_fn(x, v)
    mean_g = mean
    if guidance is not None:
        c = guidance_scale * (_per_sample(sigma, x) - _per_sample(sigma_next, x)) if scale_by_dt else guidance_scale
        mean_g = mean + c * guidance_direction(guidance.to(x.dtype), guidance_norm)
    if prev_sample is None:
        prev_sample = mean_g if kind == "ode" else mean_g + std * noise.to(x.dtype)
        lp_sample = prev_sample.detach()
        if sample_dtype is not None:
            lp_sample = lp_sample.to(sample_dtype).to(x.dtype)
    else:
        lp_sample = prev_sample.detach().to(x.dtype)
    mean_lp = mean_g if logprob_mean == "guided" else mean
    log_prob = None
    if kind != "ode":
        if kind == "cps" and cps_logprob == "flow_grpo":
            log_prob = _reduce(-((lp_sample - mean_lp) ** 2), reduce)
        else:
            elem = -((lp_sample - mean_lp) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
            log_prob = _reduce(elem, reduce)
    kl_value = None
    if ref_v is not None:
        ref_mean = mean_fn(x, ref_v)
        divisor = 2 * (std**2 if kl == "exact" else g**2)
        kl_value = _reduce((mean - ref_mean) ** 2, reduce) / divisor.flatten()
    return dict(prev_sample=prev_sample, mean=mean_lp, log_prob=log_prob, std=std.flatten(), g=g.flatten(), kl=kl_value)


def sde_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: Scalar, reduce: str = "mean") -> torch.Tensor:
    """KL between two Gaussians of equal std: reduce((mean - ref_mean)^2) / (2 std^2), [B].

    Flow-GRPO's form passes its std_dev_t (g, without sqrt(delta)) as std; the exact form the std.
    """
    s = torch.as_tensor(std, dtype=mean.dtype, device=mean.device).reshape(-1)
    return _reduce((mean - ref_mean) ** 2, reduce) / (2 * s**2)


# ---------------------------------------------------------------------------------- noise


def philox_uint32(n_blocks: int, seed: int, offset: int) -> np.ndarray:
    """Philox4x32-10 outputs [n_blocks, 4] for counters (j, 0..) as in csrc/include/flowsteer/philox.h."""
    m = np.uint64(0xFFFFFFFF)
    j = np.arange(n_blocks, dtype=np.uint64)
    c = [j & m, j >> np.uint64(32), np.full_like(j, offset & 0xFFFFFFFF), np.full_like(j, (offset >> 32) & 0xFFFFFFFF)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m]
        k0 = (k0 + np.uint64(0x9E3779B9)) & m
        k1 = (k1 + np.uint64(0xBB67AE85)) & m
    return np.stack(c, axis=1).astype(np.uint32)


def philox_normal(n: int, seed: int, offset: int = 0, dtype=torch.float64) -> torch.Tensor:
    """The standard normals of flowsteer's in-kernel noise for elements 0..n-1, by exact Box-Muller.

    The uniforms are those the kernels form: u = fl32(fl32(k) 2^-32 + 2^-33), so near u = 1 they
    step by 2^-24 (as curand's do); the log, sqrt and sin/cos after that are exact here.
    """
    k = philox_uint32((n + 3) // 4, seed, offset).astype(np.float32)
    u = (k * np.float32(2.0**-32) + np.float32(2.0**-33)).astype(np.float64)
    r_a = np.sqrt(-2.0 * np.log(u[:, 0::2]))
    theta = 2.0 * np.pi * u[:, 1::2]
    z = np.empty_like(u)
    z[:, 0::2] = r_a * np.cos(theta)
    z[:, 1::2] = r_a * np.sin(theta)
    return torch.from_numpy(z.reshape(-1)[:n].copy()).to(dtype)


# ----------------------------------------------------------------------------- advantages


def group_zscore(r: torch.Tensor, group_ids: torch.Tensor, std: str, eps: float, global_std=None) -> torch.Tensor:
    """(r - mean_g) / (std + eps) for one reward column r [N]; a group of equal rewards gets 0."""
    out = torch.zeros_like(r)
    for gid in torch.unique(group_ids):
        idx = group_ids == gid
        rg = r[idx]
        centred = rg - rg.mean()
        if std == "group":
            z = centred / (rg.std(unbiased=False) + eps)
        elif std == "global":
            z = centred / (global_std + eps)
        else:
            z = centred
        out[idx] = torch.where(rg.max() == rg.min(), torch.zeros_like(z), z)
    return out


def log_tame(rewards: torch.Tensor) -> torch.Tensor:
    """PaCo-RL: log(1 + r_k) for the rewards whose batch coefficient of variation is above the mean."""
    h = rewards.std(dim=0, unbiased=False) / (rewards.mean(dim=0) + 1e-6)
    tame = h > h.mean()
    return torch.where(tame, torch.log1p(rewards), rewards)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std: str = "group",
    eps: float = 1e-4,
    clip: Optional[float] = 5.0,
    mode: str = "sum",
    weights: Optional[Sequence[float]] = None,
    batch_norm: bool = False,
) -> torch.Tensor:
    """Group-relative advantages [N] from rewards [N] or [N, K] and group_ids [N]."""
    r = rewards.reshape(rewards.shape[0], -1)
    w = torch.ones(r.shape[1], dtype=r.dtype) if weights is None else torch.as_tensor(weights, dtype=r.dtype)
    if mode == "log_tamed":
        r = log_tame(r)
    if mode in ("sum", "log_tamed"):
        r = (r * w).sum(dim=1, keepdim=True)
        w = torch.ones(1, dtype=r.dtype)
    adv = torch.zeros(r.shape[0], dtype=r.dtype)
    for k in range(r.shape[1]):
        global_std = r[:, k].std(unbiased=False)
        adv = adv + w[k] * group_zscore(r[:, k], group_ids, std, eps, global_std)
    if mode == "per_reward" and batch_norm:
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + eps)
    if clip is not None and clip > 0:
        adv = adv.clamp(-clip, clip)
    return adv


def win_rate(prefs: torch.Tensor) -> torch.Tensor:
    """Pref-GRPO rewards [M, G] from pairwise outcomes prefs [M, G, G] (1 win, 0 loss, 0.5 tie, NaN unparseable)."""
    p = torch.nan_to_num(prefs, nan=0.5)
    g = p.shape[-1]
    off_diag = ~torch.eye(g, dtype=torch.bool, device=p.device)
    return (p * off_diag).sum(dim=-1) / (g - 1)


def pareto_mask(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """True for the samples that no sample of their own group dominates (>= in every reward, > in one)."""
    n = rewards.shape[0]
    mask = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if group_ids[i] == group_ids[j] and bool((rewards[j] >= rewards[i]).all() and (rewards[j] > rewards[i]).any()):
                mask[i] = False
    return mask


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: Union[float, tuple] = 1e-4,
    kl: Optional[torch.Tensor] = None,
    beta: float = 0.0,
):
    """Clipped policy-gradient loss: mean(max(-A rho, -A clip(rho, 1 - lo, 1 + hi))) + beta mean(kl)."""
    lo, hi = clip_range if isinstance(clip_range, (tuple, list)) else (clip_range, clip_range)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - lo, 1.0 + hi)
    loss = torch.maximum(unclipped, clipped).mean()
    if kl is not None and beta != 0.0:
        loss = loss + beta * kl.mean()
    return loss, ratio

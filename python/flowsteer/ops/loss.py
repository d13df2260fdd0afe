"""The clipped GRPO policy loss and its statistics.

It is plain torch: a few elementwise ops on [B] tensors, which torch.compile fuses; a custom
kernel buys nothing here (benches/bench_ops.py measures it)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import reference
from .checks import check_batch, check_real, check_tensor

Tensor = torch.Tensor


class GRPOLossStats(NamedTuple):
    """Detached scalars: fraction of clipped ratios, approximate KL 0.5 mean (log rho)^2, ratio mean/min/max."""

    clip_frac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor
    ratio_min: Tensor
    ratio_max: Tensor


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: Union[float, Tuple[float, float]] = 1e-4,
    kl: Optional[Tensor] = None,
    beta: float = 0.0,
) -> Tuple[Tensor, GRPOLossStats]:
    """L = mean(max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))) + beta mean(kl), rho = exp(log p - log p_old).

    log_prob: [B] (or any shape with at least one element; B >= 1). old_log_prob, advantages and kl
    (None, or a tensor) must have exactly log_prob's shape and device: kl is not broadcast. beta: a
    finite float >= 0 (or a 0-d tensor). clip_range: eps or (eps_low, eps_high);
    Flow-GRPO's default 1e-4 suits per-element-mean log-probs. Returns (loss, GRPOLossStats).
    """
    float_dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    check_tensor("log_prob", log_prob, dtypes=float_dtypes, contiguous=False)
    check_batch("log_prob", log_prob)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("kl", kl)):
        if name == "kl" and t is None:
            continue
        check_tensor(name, t, dtypes=float_dtypes, contiguous=False)
        if t.shape != log_prob.shape:
            raise ValueError(f"{name} must have the shape of log_prob {tuple(log_prob.shape)} (got {tuple(t.shape)})")
        if t.device != log_prob.device:
            raise ValueError(f"{name} must be on the device of log_prob ({log_prob.device}; got {t.device})")
    check_real("beta", beta, min_value=0.0, allow_tensor=True)
    if kl is None and not torch.is_tensor(beta) and beta > 0:
        raise ValueError(f"beta = {beta} weights a KL term, but kl is None: pass kl (shaped like log_prob) or beta=0")
    lo, hi = clip_range if isinstance(clip_range, (tuple, list)) else (clip_range, clip_range)
    if not (lo >= 0 and hi >= 0):
        raise ValueError(f"clip_range must be >= 0 (got {clip_range!r})")
    loss, ratio = reference.grpo_loss(log_prob.float(), old_log_prob.float(), advantages.float(), (lo, hi),
                                      None if kl is None else kl.float(), beta)
    with torch.no_grad():
        r = ratio.detach()
        log_ratio = log_prob.detach().float() - old_log_prob.detach().float()
        stats = GRPOLossStats(
            clip_frac=((r < 1.0 - lo) | (r > 1.0 + hi)).float().mean(),
            approx_kl=0.5 * (log_ratio**2).mean(),
            ratio_mean=r.mean(),
            ratio_min=r.min(),
            ratio_max=r.max(),
        )
    return loss, stats

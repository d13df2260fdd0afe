"""Group-relative advantages (GRPO), multi-reward aggregation, Pref-GRPO win rates and Pareto masks."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import backends, reference
from .backends._common import empty, require_nonempty
from .checks import check_batch, check_choice, check_tensor
from .codes import STD_MODE

Tensor = torch.Tensor


def _group_zscore_impl(rewards: Tensor, group_ids: Tensor, weights: Tensor, global_std: Tensor, std_mode: int,
                       eps: float, clip: float) -> Tensor:
    """sum_k w_k z_g(r_k), clipped (clip <= 0: no clip). rewards fp32 [N, K], group_ids int64 [N]."""
    require_nonempty("group_advantages", "rewards", rewards)
    out = empty(rewards.shape[0], like=rewards, dtype=torch.float32)
    backends.module(rewards.device).group_zscore(rewards, group_ids, weights, global_std, std_mode, eps, clip, out)
    return out


_group_zscore_op = torch.library.custom_op("flowsteer::group_zscore", _group_zscore_impl, mutates_args=())


@_group_zscore_op.register_fake
def _(rewards, group_ids, weights, global_std, std_mode, eps, clip):
    return rewards.new_empty(rewards.shape[0], dtype=torch.float32)


def _win_rate_impl(prefs: Tensor) -> Tensor:
    """prefs fp32 [M, G, G] -> fp32 [M, G]."""
    require_nonempty("win_rate", "prefs", prefs)
    out = empty(prefs.shape[0], prefs.shape[1], like=prefs, dtype=torch.float32)
    backends.module(prefs.device).win_rate(prefs, out)
    return out


_win_rate_op = torch.library.custom_op("flowsteer::win_rate", _win_rate_impl, mutates_args=())


@_win_rate_op.register_fake
def _(prefs):
    return prefs.new_empty(prefs.shape[:2], dtype=torch.float32)


def _pareto_mask_impl(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """rewards fp32 [N, K], group_ids int64 [N] -> uint8 [N] (1: not dominated within its group)."""
    require_nonempty("pareto_mask", "rewards", rewards)
    out = empty(rewards.shape[0], like=rewards, dtype=torch.uint8)
    backends.module(rewards.device).pareto_mask(rewards, group_ids, out)
    return out


_pareto_mask_op = torch.library.custom_op("flowsteer::pareto_mask", _pareto_mask_impl, mutates_args=())


@_pareto_mask_op.register_fake
def _(rewards, group_ids):
    return rewards.new_empty(rewards.shape[0], dtype=torch.uint8)


def _run(op, impl, *args):
    """The registered op under torch.compile; its implementation, without the dispatcher, in eager
    mode (these ops have no autograd to record, and the dispatcher's first call imports dynamo)."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


def _check_rewards(rewards: Tensor, group_ids: Tensor) -> Tensor:
    check_tensor("rewards", rewards, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), contiguous=False)
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must be [N] or [N, K] (got shape {tuple(rewards.shape)})")
    check_batch("rewards", rewards, size="N")  # N >= 1 and K >= 1
    if not isinstance(group_ids, Tensor) or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor (got {getattr(group_ids, 'dtype', type(group_ids).__name__)})")
    if group_ids.shape != (rewards.shape[0],):
        raise ValueError(f"group_ids must be [N] = [{rewards.shape[0]}] to match rewards (got shape {tuple(group_ids.shape)})")
    if group_ids.device != rewards.device:
        raise ValueError(f"group_ids must be on the device of rewards ({rewards.device}; got {group_ids.device})")
    finite = torch.isfinite(rewards)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"rewards must be finite (got {rewards[tuple(bad)].item()} at index {tuple(bad)})")
    return rewards.float().reshape(rewards.shape[0], -1)


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std: str = "group",
    eps: float = 1e-4,
    clip: Optional[float] = 5.0,
    mode: str = "sum",
    weights: Optional[Sequence[float]] = None,
    batch_norm: bool = False,
) -> Tensor:
    """Group-relative advantages A [N] fp32, in one segmented pass over the groups.

    Args:
        rewards: [N] or [N, K] (K reward models), N >= 1 and K >= 1; must be finite.
        group_ids: [N] integers; samples with equal ids (usually one prompt) form a group.
        std: "group" (per-group std, ddof 0), "global" (std over all N) or "none".
        eps: added to the std. clip: |A| <= clip (None: no clip).
        mode: for K > 1, "sum" (normalise sum_k w_k r_k), "per_reward" (sum_k w_k z_g(r_k), GDPO-style)
            or "log_tamed" (PaCo-RL: log(1 + r_k) for rewards whose batch std / mean is above the
            mean over k, then "sum").
        weights: [K] reward weights (default all 1). batch_norm: with "per_reward", z-score A over the batch.

    A group whose rewards are all equal gets A = 0 exactly.
    """
    check_choice("std", std, STD_MODE)
    check_choice("mode", mode, ("sum", "per_reward", "log_tamed"))
    if batch_norm and mode != "per_reward":
        raise ValueError(f"batch_norm applies to mode='per_reward' (got mode={mode!r})")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a float >= 0 (got {eps!r})")
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"clip must be a float > 0 or None (got {clip!r})")
    r = _check_rewards(rewards, group_ids)
    k = r.shape[1]
    if weights is None:
        w = torch.ones(k, dtype=torch.float32, device=r.device)
    else:
        w = torch.as_tensor(weights, dtype=torch.float32).to(r.device)
        if w.shape != (k,):
            raise ValueError(f"weights must have one entry per reward column, [K] = [{k}] (got shape {tuple(w.shape)})")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"weights must be finite (got {w.tolist()})")
    if mode == "log_tamed":
        if bool((r <= -1).any()):
            raise ValueError("mode='log_tamed' takes log(1 + r): rewards must be > -1")
        r = reference.log_tame(r)
    if mode in ("sum", "log_tamed"):
        r = (r * w).sum(dim=1, keepdim=True)
        w = torch.ones(1, dtype=torch.float32, device=r.device)
        finite = torch.isfinite(r)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0, 0])
            raise ValueError(f"the weighted sum of the rewards is not finite at sample {i} ({float(r[i, 0])}): the "
                             "rewards times their weights overflow fp32")
    global_std = r.std(dim=0, unbiased=False)
    post_norm = mode == "per_reward" and batch_norm
    kernel_clip = float(clip) if (clip is not None and not post_norm) else 0.0
    adv = _run(_group_zscore_op, _group_zscore_impl, r.contiguous(), group_ids.to(torch.int64).contiguous(),
               w.contiguous(), global_std.contiguous(), STD_MODE[std], float(eps), kernel_clip)
    if post_norm:
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + eps)
        if clip is not None:
            adv = adv.clamp(-clip, clip)
    return adv


def win_rate(prefs: Tensor) -> Tensor:
    """Pref-GRPO rewards [M, G] (or [G]) from pairwise outcomes prefs [M, G, G] (or [G, G]), M >= 1, G >= 2.

    prefs[m, i, j] is the judge's verdict on sample i against j of group m: 1 win, 0 loss, 0.5 tie;
    NaN (an unparseable answer) counts as a tie. r_i is the mean over j != i; the diagonal is ignored.
    """
    check_tensor("prefs", prefs, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), contiguous=False)
    if prefs.ndim not in (2, 3) or prefs.shape[-1] != prefs.shape[-2] or prefs.shape[-1] < 2:
        raise ValueError(f"prefs must be [G, G] or [M, G, G] with G >= 2 (got shape {tuple(prefs.shape)})")
    check_batch("prefs", prefs, unit="group", size="M")
    p = prefs.float()
    known = p[~torch.isnan(p)]
    if known.numel() and bool(((known < 0) | (known > 1)).any()):
        raise ValueError("prefs must hold outcomes in [0, 1] (1 win, 0 loss, 0.5 tie) or NaN")
    out = _run(_win_rate_op, _win_rate_impl, p.reshape(-1, p.shape[-1], p.shape[-1]).contiguous())
    return out.reshape(p.shape[:-1])


def pareto_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """bool [N]: True where no sample of the same group dominates (>= in every reward, > in one).

    rewards: [N] or [N, K]; group_ids: [N]. One segmented pass: O(S^2 K) work per group of S.
    """
    r = _check_rewards(rewards, group_ids)
    return _run(_pareto_mask_op, _pareto_mask_impl, r.contiguous(), group_ids.to(torch.int64).contiguous()).bool()

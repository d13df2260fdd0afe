"""Several rewards at once: per-component values, weighted group advantages, logs, and the
reward-hacking guards (a regulariser slot and a Pareto filter)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch

from .. import ops
from .base import Reward, as_reward

Tensor = torch.Tensor


@dataclass
class RewardOutputs:
    """rewards: fp32 [N, K], one column per component; names: the K component names (a reward that
    returns a dict gives one component per key, named "reward/key"); weights: fp32 [K] on the CPU;
    regularizers: the names of the components that come from regularisers."""

    rewards: Tensor
    names: List[str]
    weights: Tensor
    regularizers: List[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(f"no reward component {name!r} (components: {', '.join(self.names)})")
        return self.rewards[:, self.names.index(name)]

    @property
    def components(self) -> Dict[str, Tensor]:
        return {n: self.rewards[:, k] for k, n in enumerate(self.names)}

    def weighted_sum(self) -> Tensor:
        """sum_k w_k r_k [N]: the scalar reward of mode "sum" before normalisation."""
        return self.rewards @ self.weights.to(self.rewards.device)


def check_weighted_finite(names: Sequence[str], rewards: Tensor, weights: Tensor) -> None:
    """Raise naming the first component whose weighted values overflow fp32 (rewards [N, K], weights [K])."""
    bad = ~torch.isfinite(rewards * weights.to(rewards.device)).all(dim=0)
    if bool(bad.any()):
        name = names[int(bad.nonzero()[0, 0])]
        raise ValueError(f"reward {name!r} times its weight is not finite (it overflows fp32); check its scale and weight")


class MultiReward:
    """Rewards combined with weights and one aggregation mode of ops.group_advantages.

    Args:
        rewards: {name: reward}; a reward is a flowsteer Reward or a callable (x, prompts, meta),
            taken as a pixel reward. A list of Rewards is keyed by their `name`.
        weights: {component or reward name: weight}, or one weight per reward and regulariser in
            order. A reward's weight applies to each of its dict keys unless "name/key" is given.
            Default 1. A component of weight 0 is computed and logged but takes no part in the
            advantages or the Pareto filter; a negative weight makes lower better.
        mode: "sum" (normalise sum_k w_k r_k per group), "per_reward" (sum_k w_k z_g(r_k)) or
            "log_tamed" (PaCo-RL); see ops.group_advantages.
        regularizers: {name: reward}, the KL-free regulariser slot: an artifact or realism reward
            combined with the main rewards under the same mode, with its own weight, and logged
            under "regularizer/<name>". Weights for them go in `weights` too.
        pareto: zero the advantages of samples that another sample of their group dominates on
            every active component (Parrot's Pareto-optimal selection, ops.pareto_mask).
        std, eps, clip, batch_norm: passed to ops.group_advantages.

    `__call__` returns RewardOutputs and `advantages(outputs, group_ids)` the fp32 [N] advantages;
    both fill `last_log`, a flat dict of floats: reward/<name>/mean, /std, /min, /max per component,
    reward/weighted_sum/mean, advantage/mean, advantage/std and pareto/kept_frac.
    """

    def __init__(self, rewards: Union[Mapping[str, object], Sequence[Reward]],
                 weights: Union[Mapping[str, float], Sequence[float], None] = None, *, mode: str = "sum",
                 regularizers: Optional[Mapping[str, object]] = None, pareto: bool = False, std: str = "group",
                 eps: float = 1e-4, clip: Optional[float] = 5.0, batch_norm: bool = False):
        if mode not in ("sum", "per_reward", "log_tamed"):
            raise ValueError(f"mode must be one of 'sum', 'per_reward', 'log_tamed' (got {mode!r})")
        if not isinstance(rewards, Mapping):
            rewards = list(rewards)
            for r in rewards:
                if not isinstance(r, Reward):
                    raise TypeError(f"rewards given as a list must be flowsteer Rewards (got {type(r).__name__}); "
                                    "pass a dict {name: callable} for plain functions")
            rewards = {r.name: r for r in rewards}
        if not rewards:
            raise ValueError("MultiReward needs at least one reward")
        regularizers = dict(regularizers or {})
        clash = set(rewards) & set(regularizers)
        if clash:
            raise ValueError(f"names {sorted(clash)} are used by both rewards and regularizers")
        for name in list(rewards) + list(regularizers):
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"reward names must be non-empty strings without '/' (got {name!r})")
        self.rewards = {n: as_reward(r, n) for n, r in rewards.items()}
        self.regularizers = {n: as_reward(r, n) for n, r in regularizers.items()}
        order = list(self.rewards) + list(self.regularizers)
        if weights is None:
            weights = {}
        elif not isinstance(weights, Mapping):
            weights = list(weights)
            if len(weights) != len(order):
                raise ValueError(f"weights has {len(weights)} entries for {len(order)} rewards and regularizers ({order})")
            weights = dict(zip(order, weights))
        for key, w in weights.items():
            if key.split("/", 1)[0] not in order:
                raise ValueError(f"weights names {key!r}, which is no reward or regularizer (have: {', '.join(order)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"weight {key!r} must be a finite number (got {w!r})")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.mode, self.pareto = mode, bool(pareto)
        self.std, self.eps, self.clip, self.batch_norm = std, eps, clip, batch_norm
        self.last_log: Dict[str, float] = {}
        self.last_pareto_mask: Optional[Tensor] = None

    def _weight(self, component: str) -> float:
        return self.weights.get(component, self.weights.get(component.split("/", 1)[0], 1.0))

    def __call__(self, images: Optional[Tensor] = None, prompts: Optional[Sequence[str]] = None, meta=None, *,
                 latents: Optional[Tensor] = None) -> RewardOutputs:
        """Runs every reward: pixel rewards on `images`, latent rewards on `latents`."""
        names: List[str] = []
        columns: List[Tensor] = []
        regs: List[str] = []
        for name, r in list(self.rewards.items()) + list(self.regularizers.items()):
            x = images if r.input == "pixels" else latents
            if x is None:
                arg = "images" if r.input == "pixels" else "latents="
                raise ValueError(f"reward {name!r} takes {r.input}: pass {arg}")
            out = r(x, prompts, meta)
            items = [(f"{name}/{k}", v) for k, v in out.items()] if isinstance(out, dict) else [(name, out)]
            for comp, v in items:
                names.append(comp)
                columns.append(v)
                if name in self.regularizers:
                    regs.append(comp)
        lengths = {c.shape[0] for c in columns}
        if len(lengths) != 1:
            raise ValueError(f"rewards returned different lengths: {dict(zip(names, (c.shape[0] for c in columns)))}")
        device = columns[0].device
        rewards = torch.stack([c.to(device) for c in columns], dim=1)
        out = RewardOutputs(rewards, names, torch.tensor([self._weight(n) for n in names], dtype=torch.float32), regs)
        log = {}
        for k, n in enumerate(names):
            col = rewards[:, k].detach().float()
            key = f"regularizer/{n}" if n in regs else f"reward/{n}"
            log.update({f"{key}/mean": float(col.mean()), f"{key}/std": float(col.std(unbiased=False)),
                        f"{key}/min": float(col.min()), f"{key}/max": float(col.max())})
        log["reward/weighted_sum/mean"] = float(out.weighted_sum().detach().mean())
        self.last_log = log
        return out

    def advantages(self, outputs: Union[RewardOutputs, Tensor], group_ids: Tensor) -> Tensor:
        """fp32 [N] group advantages of the active (non-zero weight) components; with pareto=True,
        0 for every dominated sample (the mask is kept in `last_pareto_mask`)."""
        if isinstance(outputs, Tensor):
            raise TypeError("advantages takes the RewardOutputs that MultiReward returned (it carries the component "
                            "names and weights); for a bare [N, K] tensor call ops.group_advantages")
        active = outputs.weights != 0
        if not bool(active.any()):
            raise ValueError(f"every reward component has weight 0 ({', '.join(outputs.names)}); nothing to optimise")
        idx = active.nonzero().flatten().to(outputs.rewards.device)
        r = outputs.rewards.detach().index_select(1, idx)
        w = outputs.weights[active]
        check_weighted_finite([outputs.names[int(j)] for j in idx.tolist()], r, w)
        adv = ops.group_advantages(r, group_ids, std=self.std, eps=self.eps, clip=self.clip, mode=self.mode,
                                   weights=w.tolist(), batch_norm=self.batch_norm)
        log = {"advantage/mean": float(adv.mean()), "advantage/std": float(adv.std(unbiased=False))}
        if self.pareto:
            mask = ops.pareto_mask(r * torch.sign(w).to(r.device), group_ids)
            adv = torch.where(mask, adv, torch.zeros_like(adv))
            self.last_pareto_mask = mask
            log["pareto/kept_frac"] = float(mask.float().mean())
        self.last_log.update(log)
        return adv

    def __repr__(self) -> str:
        return (f"MultiReward(rewards={list(self.rewards)}, regularizers={list(self.regularizers)}, "
                f"weights={self.weights}, mode={self.mode!r}, pareto={self.pareto})")

"""The algorithms as small strategy objects over one training loop.

An algorithm decides four things: the window of stochastic steps, how the rollout is guided (only
Euphonium), the advantages (per sample, or per sample and step for dual rewards) and what it
checks of the config and the reward. Everything numeric (step kind, noise, clip ranges, the
advantage's std, ddof and eps, the trained steps' order) is a config value that the recipes set.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..ops import group_advantages
from ..sampler import AllSteps, Branch, ProgressiveWindow, RandomWindow, SDEWindow
from .config import Config, ConfigError

Tensor = torch.Tensor


def make_window(cfg: Config) -> SDEWindow:
    w, T = cfg.sampling.window, cfg.sampling.num_steps
    if w.type == "all":
        return AllSteps()
    if w.type == "random":
        return RandomWindow(w.size, (w.start_min, T - w.size if w.start_max is None else w.start_max))
    if w.type == "progressive":
        return ProgressiveWindow(w.size, stride=w.stride, every=w.every)
    return Branch(w.at, w.size)


def grouped_advantages(rewards: Tensor, group_ids: Tensor, weights, mode: str, cfg: Config) -> Tensor:
    """fp32 [N] advantages of rewards [N, K] under train.advantages (std, ddof, eps, clip).

    ddof 0 is ops.group_advantages as it is. ddof 1 (DanceGRPO's torch.std) is the same recipe with
    the unbiased std: the reward (the weighted sum for "sum" and "log_tamed"; each reward for
    "per_reward", weighted after) minus its group mean, divided by the unbiased std of its group
    ("group") or of the whole batch ("global") plus eps. A group whose rewards are all equal gets 0.
    """
    a = cfg.train.advantages
    if a.ddof == 0 or a.std == "none":
        return group_advantages(rewards, group_ids, std=a.std, eps=a.eps, clip=a.clip, mode=mode, weights=weights)
    r = rewards.float().reshape(rewards.shape[0], -1)
    w = torch.as_tensor(weights, dtype=torch.float32, device=r.device)
    if mode == "log_tamed":
        from ..ops.reference import log_tame

        r = log_tame(r)
    if mode in ("sum", "log_tamed"):
        r, w = (r * w).sum(dim=1, keepdim=True), torch.ones(1, device=r.device)
    ids = group_ids.to(r.device).long()
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    mean = torch.zeros(counts.numel(), r.shape[1], device=r.device).index_add_(0, inverse, r) / counts[:, None]
    centred = r - mean[inverse]
    if a.std == "global":
        std = r.std(dim=0, unbiased=True, keepdim=True).nan_to_num(0.0).expand_as(r)
    else:
        sq = torch.zeros_like(mean).index_add_(0, inverse, centred**2)
        std = (sq / (counts[:, None] - 1).clamp(min=1)).sqrt()[inverse]
    z = torch.where(centred == 0, torch.zeros_like(centred), centred / (std + a.eps))
    adv = (z * w).sum(dim=1)
    return adv if a.clip is None else adv.clamp(-a.clip, a.clip)


class Algorithm:
    """The default strategy: outcome rewards, group advantages, the configured window."""

    name = "base"
    summary = ""
    #: the advantages need at least two samples per group
    needs_groups = True
    #: the window types the algorithm is defined with (None: any)
    windows: Optional[tuple] = None

    def check(self, cfg: Config, reward) -> None:
        if self.needs_groups and cfg.sampling.group_size < 2 and cfg.train.advantages.std == "group":
            raise ConfigError(f"algorithm {cfg.algorithm!r} normalises rewards within each group: sampling.group_size "
                              f"must be >= 2 (got {cfg.sampling.group_size}); or set train.advantages.std to "
                              "'global' or 'none'")
        if self.windows is not None and cfg.sampling.window.type not in self.windows:
            raise ConfigError(f"algorithm {cfg.algorithm!r} samples a window of steps: sampling.window.type must be "
                              f"{' or '.join(repr(w) for w in self.windows)} (got {cfg.sampling.window.type!r})")

    def window(self, cfg: Config) -> SDEWindow:
        return make_window(cfg)

    def sample_kwargs(self, trainer) -> Dict[str, Any]:
        """Extra keyword arguments of flowsteer.sample for this iteration's rollout."""
        return {}

    def advantages(self, trainer, outcome: Tensor, rollout) -> Tensor:
        """[N] or [N, S]: outcome is the [N] advantage of the outcome rewards."""
        return outcome

    def after_rewards(self, trainer, rollout, scalar_reward: Tensor) -> Dict[str, Tensor]:
        """Called once the rewards are in (Euphonium fits its PRM here); returns metrics."""
        return {}


class FlowGRPO(Algorithm):
    name = "flow_grpo"
    summary = "Flow-GRPO: the flow SDE on every step, PPO-clip, KL to the LoRA-off reference"


class FlowGRPOFast(Algorithm):
    name = "fast"
    summary = "Flow-GRPO-Fast: a random window of SDE steps, the rest ODE"
    windows = ("random", "branch")


class DanceGRPO(Algorithm):
    name = "dance_grpo"
    summary = "DanceGRPO: constant-eta SDE, same initial noise per group, shuffled steps per sample"


class MixGRPO(Algorithm):
    name = "mix_grpo"
    summary = "MixGRPO: SDE inside a progressive window, ODE outside"
    windows = ("progressive",)


class PrefGRPO(Algorithm):
    name = "pref_grpo"
    summary = "Pref-GRPO: pairwise win rates within each group as the reward"

    def check(self, cfg, reward):
        super().check(cfg, reward)
        from ..rewards import WinRateReward

        found = [r for r in reward.rewards.values() if isinstance(r, WinRateReward)]
        if not found:
            raise ConfigError("algorithm 'pref_grpo' needs a pairwise win-rate reward (rewards.win_rate with a judge, "
                              "or a flowsteer.rewards.WinRateReward)")
        for r in found:
            if r.group_size != cfg.sampling.group_size:
                raise ConfigError(f"reward {r.name!r} judges groups of {r.group_size}, but sampling.group_size is "
                                  f"{cfg.sampling.group_size}: the judge must see each whole group")


class Euphonium(Algorithm):
    """Euphonium: a LatentPRM fitted online guides the next rollout through its gradient; the
    advantage of trained step j is outcome_weight A_outcome + process_weight A_process(j), where
    A_process(j) is the group z-score of the PRM's prediction on the state that step j produced
    (x at sigma_{i+1}), and 0 until the PRM has been fitted once."""

    name = "euphonium"
    summary = "Euphonium: process-reward-gradient guided SDE, outcome + process advantages"

    def check(self, cfg, reward):
        super().check(cfg, reward)
        if cfg.sampling.window.type == "branch":
            raise ConfigError("algorithm 'euphonium' guides every stochastic step; sampling.window 'branch' is not "
                              "supported with it")

    def sample_kwargs(self, trainer):
        prm = trainer.prm
        if prm is None or not bool(prm.fitted):
            return {}
        p = trainer.config.prm
        return dict(reward_grad=lambda x, sigma, rows: prm.grad(x, sigma), reward_guidance_scale=p.guidance_scale,
                    reward_guidance_norm=p.guidance_norm, scale_by_dt=p.scale_by_dt)

    def advantages(self, trainer, outcome, rollout):
        p = trainer.config.prm
        S = rollout.log_probs.shape[1]
        adv = p.outcome_weight * outcome[:, None].expand(-1, S)
        prm = trainer.prm
        if prm is None or not bool(prm.fitted) or p.process_weight == 0:
            return adv.contiguous()
        a = trainer.config.train.advantages
        process = []
        for j, i in enumerate(rollout.steps):
            pred = prm.predict(rollout.next_latents[:, j], rollout.sigmas[i + 1])
            process.append(group_advantages(pred.float(), rollout.group_ids.to(pred.device), std=a.std, eps=a.eps,
                                            clip=a.clip))
        return (adv + p.process_weight * torch.stack(process, dim=1).to(adv.device)).contiguous()

    def after_rewards(self, trainer, rollout, scalar_reward):
        if not rollout.steps:  # nothing stochastic to fit on (a cps step onto sigma = 0 runs as ODE)
            return {}
        p = trainer.config.prm
        prm = trainer.ensure_prm(rollout)
        lat = rollout.latents.transpose(0, 1)  # [S, N, ...]
        sig = torch.tensor([rollout.sigmas[i] for i in rollout.steps], dtype=torch.float32)
        gen = torch.Generator().manual_seed(trainer.derived_seed("prm", trainer.iteration))
        losses = prm.fit(lat, sig, scalar_reward.detach().cpu().float(), steps=p.fit_steps, lr=p.fit_lr,
                         batch_size=p.fit_batch_size, generator=gen)
        return {"prm/loss_first": torch.tensor(losses[0]), "prm/loss_last": torch.tensor(losses[-1])}


ALGORITHM_CLASSES = {c.name: c for c in (FlowGRPO, FlowGRPOFast, DanceGRPO, MixGRPO, PrefGRPO, Euphonium)}


def make_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHM_CLASSES:
        raise ConfigError(f"unknown algorithm {name!r} (known: {', '.join(ALGORITHM_CLASSES)})")
    return ALGORITHM_CLASSES[name]()


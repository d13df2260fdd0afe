"""Fused ops for flow-matching RL: the SDE step with its log-prob and KL, group advantages, and the
GRPO loss. Each op runs on the backend `flowsteer.set_backend` picks; `reference` is the
pure-torch statement of every formula."""
from . import reference
from .advantages import group_advantages, pareto_mask, win_rate
from .loss import GRPOLossStats, grpo_loss
from .sde import SDEStepOutput, guidance_coefficient, philox_normal, sde_kl, sde_log_prob, sde_step

__all__ = [
    "SDEStepOutput",
    "GRPOLossStats",
    "group_advantages",
    "guidance_coefficient",
    "grpo_loss",
    "pareto_mask",
    "philox_normal",
    "reference",
    "sde_kl",
    "sde_log_prob",
    "sde_step",
    "win_rate",
]

"""Sigma schedules. Pipelines take theirs from their own scheduler config, exactly as their
`__call__` does (shift, or dynamic shift from the image sequence length); a bare velocity
function gets the flow-matching default with an optional shift."""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch


def shifted_sigmas(num_steps: int, shift: float = 1.0) -> list:
    """sigma_i = s t_i / (1 + (s - 1) t_i) for t_i = 1 - i / num_steps: num_steps + 1 values from 1 to 0."""
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be an int >= 1 (got {num_steps!r})")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (got {shift!r})")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float().tolist()


def euler_scheduler(scheduler):
    """The FlowMatchEulerDiscreteScheduler to take sigmas from: a copy of the pipeline's own (never
    move the pipeline's), or, for a flow-matching multistep solver (UniPC or DPM-Solver++ with
    use_flow_sigmas, as Wan's checkpoints ship them), the Euler scheduler with the same
    num_train_timesteps and flow_shift. flowsteer's steps are Euler(-Maruyama) steps; a multistep
    solver's own sigmas also start at 1 - 1e-6 rather than 1, where Flow-GRPO's std needs sigma_max."""
    from .._optional import require

    FlowMatchEulerDiscreteScheduler = require("diffusers", "diffusers",
                                              "sampling a diffusers pipeline").FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return copy.deepcopy(scheduler)
    config = scheduler.config
    if config.get("use_flow_sigmas", False) and config.get("flow_shift", None) is not None:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000),
                                               shift=float(config.flow_shift))
    raise ValueError(f"the pipeline's scheduler {type(scheduler).__name__} is not a flow-matching scheduler: "
                     "flowsteer takes its sigmas from FlowMatchEulerDiscreteScheduler, or from a multistep "
                     "solver's use_flow_sigmas and flow_shift; set pipe.scheduler = "
                     "FlowMatchEulerDiscreteScheduler(shift=...)")


def scheduler_sigmas(scheduler, num_steps: int, *, sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None):
    """(sigmas: list of num_steps + 1 floats, timesteps: fp32 tensor [num_steps]) from a diffusers
    FlowMatchEulerDiscreteScheduler (see euler_scheduler), set up as a pipeline's retrieve_timesteps does."""
    sched = euler_scheduler(scheduler)
    kwargs = {} if mu is None else {"mu": mu}
    if sigmas is not None:
        sched.set_timesteps(sigmas=list(sigmas), device="cpu", **kwargs)
    else:
        sched.set_timesteps(num_steps, device="cpu", **kwargs)
    out_sigmas = sched.sigmas.float().tolist()
    if len(out_sigmas) != num_steps + 1:
        raise ValueError(f"the scheduler gave {len(out_sigmas)} sigmas for {num_steps} steps")
    return out_sigmas, sched.timesteps.float()


def dynamic_shift_mu(scheduler, image_seq_len: int, default_max_shift: float) -> float:
    """FLUX/SD3's `calculate_shift`: mu linear in the image sequence length."""
    cfg = scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", default_max_shift)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)

"""flowsteer.sample: drop-in SDE rollouts with per-step log-probs for diffusers SD3, FLUX, Wan and
any velocity function."""
from .adapters import CallableAdapter, FluxAdapter, ModelAdapter, SD3Adapter, WanAdapter, as_adapter
from .rollout import NoiseKeys, Rollout, evaluate, sample
from .schedule import scheduler_sigmas, shifted_sigmas
from .windows import AllSteps, Branch, ProgressiveWindow, RandomWindow, SDEWindow, WindowPlan

__all__ = [
    "AllSteps", "Branch", "CallableAdapter", "FluxAdapter", "ModelAdapter", "NoiseKeys", "ProgressiveWindow", "RandomWindow",
    "Rollout", "SD3Adapter", "SDEWindow", "WanAdapter", "WindowPlan", "as_adapter", "evaluate", "sample",
    "scheduler_sigmas", "shifted_sigmas",
]

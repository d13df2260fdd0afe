"""flowsteer: fast, exact online RL post-training for flow-matching image and video generators.

The fused ops live in `flowsteer.ops`, the rollout sampler is `flowsteer.sample`, rewards are in
`flowsteer.rewards`; `flowsteer.backend_info()` says which kernels were found.
"""
from ._backend import backend_info, get_backend, set_backend
from . import ops, rewards
from .sampler import Rollout, evaluate, sample

__version__ = "0.1.0"

__all__ = ["Rollout", "backend_info", "evaluate", "get_backend", "ops", "rewards", "sample", "set_backend",
           "__version__"]

"""flowsteer: fast, exact online RL post-training for flow-matching image and video generators.

The fused ops live in `flowsteer.ops`, the rollout sampler is `flowsteer.sample`, rewards are in
`flowsteer.rewards`; `flowsteer.backend_info()` says which kernels were found.

The names below are imported on first use, so that importing the package (and `flowsteer --help`)
does not load torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._optional import silence_harmless_warnings

__version__ = "0.1.0"

__all__ = ["NoiseKeys", "Rollout", "backend_info", "evaluate", "get_backend", "ops", "rewards", "sample", "set_backend",
           "__version__"]

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "backend_info": (".ops.backends", "backend_info"),
    "get_backend": (".ops.backends", "get_backend"),
    "set_backend": (".ops.backends", "set_backend"),
    "ops": (".ops", None),
    "rewards": (".rewards", None),
    "NoiseKeys": (".sampler", "NoiseKeys"),
    "Rollout": (".sampler", "Rollout"),
    "evaluate": (".sampler", "evaluate"),
    "sample": (".sampler", "sample"),
}

silence_harmless_warnings()

if TYPE_CHECKING:  # pragma: no cover
    from . import ops, rewards
    from .ops.backends import backend_info, get_backend, set_backend
    from .sampler import NoiseKeys, Rollout, evaluate, sample


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'flowsteer' has no attribute {name!r}") from None
    value = importlib.import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

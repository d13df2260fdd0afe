"""flowsteer: fast, exact online RL post-training for flow-matching image and video generators.

The fused ops live in `flowsteer.ops`; `flowsteer.backend_info()` says which kernels were found.
"""
from ._backend import backend_info, get_backend, set_backend
from . import ops

__version__ = "0.1.0"

__all__ = ["backend_info", "get_backend", "set_backend", "ops", "__version__"]

"""The backends of the fused ops, and which one runs an op for tensors on a given device.

One module per backend -- torch (the reference), cpu (flowsteer._C's C++ kernels), cuda
(flowsteer._C's CUDA kernels), triton (flowsteer._triton) -- each implementing the same functions:
sde_forward, sde_backward, philox_normal, group_zscore, win_rate and pareto_mask, writing into
outputs the caller allocated (_common). `module(device)` returns the one to call.

`auto` picks the Triton kernels for CUDA tensors (the compiled CUDA kernels when Triton is not
installed), the compiled C++ kernels for CPU tensors, and the pure-torch reference when nothing else
fits. A backend asked for by name that is missing raises an error that names the fix.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Optional

# Aliased: importing the submodule flowsteer.ops.backends.torch binds the name `torch` in this
# package's namespace.
import torch as _torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

_state = {"backend": None}
_cache: dict = {}


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)} (got {name!r})")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for every flowsteer op: "auto", "cuda", "triton", "cpu" or "torch"."""
    _state["backend"] = _check_name(name, "backend")


def get_backend() -> str:
    """The backend asked for: set_backend's, else $FLOWSTEER_BACKEND, else "auto"."""
    if _state["backend"] is not None:
        return _state["backend"]
    return _check_name(os.environ.get("FLOWSTEER_BACKEND", "auto"), "FLOWSTEER_BACKEND")


#: the binding interface this Python code calls; csrc/bindings.cpp sets the same `abi_version`
C_ABI_VERSION = 3


def extension() -> Optional[ModuleType]:
    """flowsteer._C, or None when the package was installed without its compiled core, or when the
    one found cannot be used (a loader error, or a stale build from another version)."""
    if "_C" not in _cache:
        try:
            C = importlib.import_module("flowsteer._C")
            abi = getattr(C, "abi_version", None)
            if abi != C_ABI_VERSION:
                raise ImportError(f"flowsteer._C is stale: it has binding version {abi}, this flowsteer needs "
                                  f"{C_ABI_VERSION}; reinstall the package (`pip install --force-reinstall .`)")
            _cache["_C"], _cache["_C_error"] = C, None
        except Exception as exc:  # ImportError without a build; OSError from a loader; a stale build
            _cache["_C"] = None
            _cache["_C_error"] = f"{type(exc).__name__}: {exc}"
    return _cache["_C"]


def _warn_fallback() -> None:
    """Once per process: auto fell back to the pure-torch reference for CPU tensors."""
    if _cache.get("fallback_warned"):
        return
    _cache["fallback_warned"] = True
    warnings.warn(
        "flowsteer: the compiled extension flowsteer._C could not be used "
        f"({_cache.get('_C_error')}); CPU tensors run on the pure-torch reference backend. Its log-probs "
        "differ from the C++ kernels' in the last bits, so processes that loaded differently do not see an "
        "on-policy ratio of exactly 1. Reinstall with `pip install .`, or set_backend('torch') to choose it "
        "knowingly.", RuntimeWarning, stacklevel=3)


def triton_module(name: str) -> Optional[ModuleType]:
    """flowsteer._triton.<name>, or None when Triton (or the kernel module) is not importable."""
    key = "triton." + name
    if key not in _cache:
        try:
            _cache[key] = importlib.import_module("flowsteer._triton." + name)
        except Exception as exc:  # ImportError without triton; RuntimeError without a driver
            _cache[key] = None
            _cache[key + ".error"] = f"{type(exc).__name__}: {exc}"
    return _cache[key]


def _triton_usable_on(device: _torch.device) -> bool:
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve(device: _torch.device) -> str:
    """The backend that runs an op on tensors of `device`: "cuda", "triton", "cpu" or "torch"."""
    name = get_backend()
    C = extension()
    if name == "auto":
        if device.type == "cuda":
            # Triton first: on an H100 its sde_step kernels ran 1.1-2.3x faster than the compiled CUDA
            # ones at every measured shape and dtype (BENCHMARKS.md); the CUDA kernels serve installs
            # without Triton.
            if triton_module("sde_step") is not None:
                return "triton"
            return "cuda" if C is not None and C.has_cuda else "torch"
        if device.type == "cpu" and C is not None:
            return "cpu"
        if device.type == "cpu":
            _warn_fallback()
        return "torch"
    if name == "cpu":
        if C is None:
            raise RuntimeError(
                "backend 'cpu' needs the compiled extension flowsteer._C, which did not import "
                f"({_cache.get('_C_error')}); reinstall with `pip install .`, or use set_backend('torch')"
            )
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs CPU tensors (got tensors on {device}); use set_backend('auto')")
        return "cpu"
    if name == "cuda":
        if C is None or not C.has_cuda:
            raise RuntimeError(
                "backend 'cuda' needs flowsteer._C built with CUDA kernels; reinstall with nvcc on PATH "
                "(`pip install .`), or use set_backend('triton')"
            )
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs CUDA tensors (got tensors on {device})")
        return "cuda"
    if name == "triton":
        if triton_module("sde_step") is None:
            raise RuntimeError(
                "backend 'triton' needs Triton: `pip install triton` "
                f"({_cache.get('triton.sde_step.error')})"
            )
        if not _triton_usable_on(device):
            raise ValueError(
                f"backend 'triton' runs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import (got {device})"
            )
        return "triton"
    return "torch"


def module(device: _torch.device) -> ModuleType:
    """The backend module that runs ops on tensors of `device`: the one resolve(device) names."""
    name = resolve(device)
    mod = _modules.get(name)
    if mod is None:
        mod = _modules[name] = importlib.import_module(f"{__name__}.{name}")
    return mod


_modules: dict = {}


def backend_info() -> dict:
    """What was found: the extension and its kernels, Triton, the GPU, and what `auto` picks."""
    C = extension()
    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        pass
    info = {
        "backend": get_backend(),
        "extension": C is not None,
        "extension_error": _cache.get("_C_error"),
        "cpu_kernels": C is not None,
        "cuda_kernels": bool(C is not None and C.has_cuda),
        "cuda_archs": (C.cuda_archs if C is not None else ""),
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "torch": _torch.__version__,
        "cuda_available": _torch.cuda.is_available(),
    }
    if C is None and get_backend() == "auto":
        info["fallback"] = f"CPU tensors run on the torch reference: {_cache.get('_C_error')}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            info["cpu_pick"] = resolve(_torch.device("cpu"))
    except (RuntimeError, ValueError) as exc:
        info["cpu_pick"] = f"unavailable: {exc}"
    if _torch.cuda.is_available():
        try:
            info["cuda_pick"] = resolve(_torch.device("cuda"))
        except (RuntimeError, ValueError) as exc:
            info["cuda_pick"] = f"unavailable: {exc}"
    return info

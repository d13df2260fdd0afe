"""Input checks at the public boundary. Every message names the argument, what was expected and
what was received."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)} (got {value!r})")


def check_tensor(
    name: str,
    t,
    *,
    min_ndim: Optional[int] = None,
    like: Optional[torch.Tensor] = None,
    like_name: str = "",
    dtypes=FLOAT_DTYPES,
    contiguous: bool = True,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(t).__name__})")
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims [B, ...] (got shape {tuple(t.shape)})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {', '.join(str(d) for d in dtypes)} (got {t.dtype})")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)} (got {tuple(t.shape)})")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}; got {t.dtype})")
        if t.device != like.device:
            raise ValueError(f"{name} must be on the device of {like_name} ({like.device}; got {t.device})")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)}); call .contiguous()")


def values_checkable(t: torch.Tensor) -> bool:
    """Whether reading t's values is allowed here: not while tracing, not inside CUDA graph capture."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _as_per_sample(name: str, value: Union[float, torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            value = value.reshape(1).expand(batch)
        elif value.shape != (batch,):
            raise ValueError(f"{name} must be a float, a 0-d tensor or a [B] = [{batch}] tensor (got shape {tuple(value.shape)})")
        if value.device.type == "cuda" and device.type == "cuda" and value.device != device:
            raise ValueError(f"{name} must be on {device} or the CPU (got {value.device})")
        return value.to(device=device, dtype=torch.float32, non_blocking=True).contiguous()
    if not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor (got {type(value).__name__})")
    return torch.full((batch,), float(value), dtype=torch.float32, device=device)


def check_sigmas(sigma, sigma_next, batch: int, device: torch.device):
    """sigma, sigma_next as fp32 [B] on device, checked: 0 < sigma <= 1 and 0 <= sigma_next < sigma.

    Returns (sigma, sigma_next, any_sigma_is_one). Python floats and CPU tensors are checked for
    free; CUDA tensors cost one sync, skipped under torch.compile and CUDA graph capture.
    """
    if not isinstance(sigma, torch.Tensor) and not isinstance(sigma_next, torch.Tensor):
        s, sn = float(sigma), float(sigma_next)
        if not 0.0 < s <= 1.0:
            raise ValueError(f"sigma must be in (0, 1] (got sigma={s})")
        if not 0.0 <= sn < s:
            raise ValueError(f"sigma_next must be in [0, sigma) (got sigma={s}, sigma_next={sn})")
        return _as_per_sample("sigma", s, batch, device), _as_per_sample("sigma_next", sn, batch, device), s == 1.0
    sig = _as_per_sample("sigma", sigma, batch, device)
    sig_next = _as_per_sample("sigma_next", sigma_next, batch, device)
    if not values_checkable(sig):
        return sig, sig_next, False
    s = sig.detach().cpu().double()
    sn = sig_next.detach().cpu().double()
    bad = ~((s > 0) & (s <= 1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"sigma must be in (0, 1] (got sigma[{i}]={float(s[i])})")
    bad = ~((sn >= 0) & (sn < s))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"sigma_next must be in [0, sigma) (got sigma[{i}]={float(s[i])}, sigma_next[{i}]={float(sn[i])})")
    return sig, sig_next, bool((s == 1).any())


def check_kind_and_noise(kind: str, noise_level, kinds: Iterable) -> None:
    """The step kind and its noise level a: finite, >= 0, and <= 1 for "cps" (a = sin of the angle)."""
    check_choice("kind", kind, kinds)
    if not (isinstance(noise_level, (int, float)) and math.isfinite(noise_level) and noise_level >= 0):
        raise ValueError(f"noise_level must be a finite float >= 0 (got {noise_level!r})")
    if kind == "cps" and noise_level > 1:
        raise ValueError(f"noise_level must be in [0, 1] for kind='cps' (got {noise_level})")

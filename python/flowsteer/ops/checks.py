"""Input checks at the public boundary. Every message names the argument, what was expected and
what was received."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable, Optional, Union

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The largest noise_level (a) a step accepts. Published settings use a <= 1.2; Flow-GRPO's mean
# carries a^2 sigma / (1 - sigma), so a much larger a overflows the step's fp32 coefficients
# (a = 1e30 gives inf and NaN outputs) long before it is a meaningful SDE.
NOISE_LEVEL_MAX = 10.0

SEED_LIMIT = 2**63


def _is_real(value) -> bool:
    """A Python or numpy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


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


def check_batch(name: str, t: torch.Tensor, unit: str = "sample", size: str = "B") -> None:
    """t [B, ...] holds at least one sample (B >= 1) and at least one element per sample. Every op
    refuses an empty batch with this error, whatever the backend, rather than returning an empty
    or NaN result."""
    if t.ndim >= 1 and t.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one {unit}, {size} >= 1 (got shape {tuple(t.shape)})")
    if t.numel() == 0:
        raise ValueError(f"{name} must have at least one element per {unit} (got shape {tuple(t.shape)})")


def check_seed(name: str, value, limit: int = SEED_LIMIT) -> int:
    """value as a Python int in [0, limit): a Python int, a numpy integer or a 0-d integer tensor;
    never a bool (True is not a seed). One check for every seed and offset: sde_step, sample and
    philox_normal. Every failure, a wrong type included, is a ValueError."""
    ok = not isinstance(value, (bool, np.bool_))
    if isinstance(value, torch.Tensor):
        ok = ok and value.ndim == 0 and value.dtype not in (torch.bool,) and not value.dtype.is_floating_point \
            and not value.dtype.is_complex
    elif isinstance(value, np.ndarray):
        ok = ok and value.ndim == 0 and value.dtype.kind in "iu"
    try:
        index = operator.index(value) if ok else -1
    except TypeError:
        index = -1
    if not 0 <= index < limit:
        bound = "2**63" if limit == SEED_LIMIT else "2**63 - 1" if limit == SEED_LIMIT - 1 else str(limit)
        raise ValueError(f"{name} must be an int in [0, {bound}) (got {value!r})")
    return index


def check_real(name: str, value, *, min_value: Optional[float] = None, allow_tensor: bool = False) -> None:
    """A finite real number (not a bool), >= min_value when given. With allow_tensor, a 0-d float
    tensor too, whose value is checked where values_checkable allows (a CUDA tensor costs one sync)."""
    bound = "" if min_value is None else f" >= {min_value:g}"
    if allow_tensor and isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a finite float{bound} or a 0-d float tensor "
                             f"(got {value.dtype} of shape {tuple(value.shape)})")
        if not values_checkable(value):
            return
        number = float(value.detach().cpu())
    elif _is_real(value):
        number = float(value)
    else:
        raise ValueError(f"{name} must be a finite float{bound} (got {value!r})")
    if not math.isfinite(number) or (min_value is not None and number < min_value):
        raise ValueError(f"{name} must be a finite float{bound} (got {value!r})")


def check_guidance_scale(value, batch: int) -> None:
    """guidance_scale: a finite float, or a float tensor of shape () or [B]. A tensor's values are
    not read: that would be a host sync in every guided step of a rollout (the sampler passes the
    [B] coefficient guidance_coefficient computed from a checked float, and tests that its step loop
    never syncs). Same on every backend."""
    name = "guidance_scale"
    if isinstance(value, torch.Tensor):
        if value.shape not in ((), (batch,)) or not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float or a float tensor of shape () or [B] = [{batch}] "
                             f"(got {value.dtype} of shape {tuple(value.shape)})")
        return
    if not (_is_real(value) and math.isfinite(float(value))):
        raise ValueError(f"{name} must be a finite float or a float tensor of shape () or [B] = [{batch}] (got {value!r})")


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
    """The step kind and its noise level a: a finite float in [0, NOISE_LEVEL_MAX] (any kind, "ode"
    included), and <= 1 for "cps" (a = sin of the angle). Shared by sde_step and sample."""
    check_choice("kind", kind, kinds)
    if not (_is_real(noise_level) and 0 <= float(noise_level) <= NOISE_LEVEL_MAX):  # NaN fails too
        raise ValueError(f"noise_level must be a finite float >= 0 and <= {NOISE_LEVEL_MAX:g} (got {noise_level!r}); "
                         f"larger values overflow the step's coefficients")
    if kind == "cps" and noise_level > 1:
        raise ValueError(f"noise_level must be in [0, 1] for kind='cps' (got {noise_level})")

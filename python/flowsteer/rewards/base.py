"""The reward protocol: what a reward declares, and the checks at its boundary.

A reward is called as `reward(images_or_latents, prompts, meta)` and returns a Tensor [N], or a
dict of named Tensors [N]. Conventions:

- pixels: float [N, 3, H, W] in [0, 1], or video [N, 3, F, H, W] (channels first, like the latents);
- latents: float [N, C, H, W], or video [N, C, F, H, W];
- prompts: a list of N strings (or None for rewards that do not read them);
- meta: None, a list of N per-sample objects (Flow-GRPO's "metadatas"), or a dict whose values of
  length N (lists, tuples, tensors with a first dim of N) are per-sample and whose other values
  are shared.

`Reward.__call__` checks the inputs, splits them into batches of `batch_size`, runs `forward` on
the reward's `device` (under no_grad unless the reward is differentiable and grad mode is on), checks
every output (length, finiteness, dtype, device) with a message that names the reward, and returns
fp32 values on the device of the input.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..ops.checks import values_checkable

Tensor = torch.Tensor
RewardValue = Union[Tensor, Dict[str, Tensor]]

INPUTS = ("pixels", "latents")
# Decoded images may overshoot [0, 1] by rounding in the VAE's last op; more than this is a
# convention error (usually [-1, 1] images passed without (x / 2 + 0.5).clamp(0, 1)).
PIXEL_SLACK = 1e-3


class RewardError(ValueError):
    """A reward broke its contract: bad output length, NaN, wrong device or dtype."""


class Reward:
    """Base class for rewards. Subclasses set the declarations and implement `forward`.

    Attributes:
        name: used in logs and in every error message.
        input: "pixels" or "latents" (see the module docstring for shapes).
        differentiable: True when `forward` keeps the autograd graph back to its input. The call
            then runs with grad enabled (if the caller's grad mode is on); otherwise under no_grad.
        device: where `forward` runs; inputs are moved there. None: wherever the input is.
        batch_size: the most samples per `forward` call. None: all at once.
    """

    name: str = "reward"
    input: str = "pixels"
    differentiable: bool = False
    device: Optional[torch.device] = None
    batch_size: Optional[int] = None

    def forward(self, x: Tensor, prompts: Optional[List[str]], meta: Any) -> Union[RewardValue, Sequence[float]]:
        """x: one batch, on `device`; prompts and meta: the matching slices. Returns [n] or {key: [n]}."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, prompts, meta)")

    def __call__(self, images_or_latents: Tensor, prompts: Optional[Sequence[str]] = None, meta: Any = None) -> RewardValue:
        x = images_or_latents
        n = check_reward_input(self, x)
        prompts = check_prompts(self.name, prompts, n)
        meta = check_meta(self.name, meta, n)
        run_device = torch.device(self.device) if self.device is not None else x.device
        bs = n if not self.batch_size else int(self.batch_size)
        grad = bool(self.differentiable and torch.is_grad_enabled())
        chunks = []
        with torch.set_grad_enabled(grad):
            for start in range(0, n, bs):
                stop = min(n, start + bs)
                out = self.forward(x[start:stop].to(run_device), None if prompts is None else prompts[start:stop],
                                   slice_meta(meta, start, stop, n))
                chunks.append(check_reward_output(self.name, out, stop - start, run_device, offset=start,
                                                  declared=self.device is not None))
        return _concat(self.name, chunks, x.device)

    def __repr__(self) -> str:
        bs = "all" if not self.batch_size else self.batch_size
        return (f"{type(self).__name__}(name={self.name!r}, input={self.input!r}, differentiable={self.differentiable}, "
                f"device={self.device}, batch_size={bs})")


class FunctionReward(Reward):
    """A plain function `fn(x, prompts, meta) -> [n] | {key: [n]}` with the Reward declarations."""

    def __init__(self, fn: Callable, *, name: Optional[str] = None, input: str = "pixels", differentiable: bool = False,
                 device=None, batch_size: Optional[int] = None):
        if not callable(fn):
            raise TypeError(f"reward fn must be callable (got {type(fn).__name__})")
        if input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS} (got {input!r})")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int or None (got {batch_size!r})")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")
        self.input = input
        self.differentiable = bool(differentiable)
        self.device = None if device is None else torch.device(device)
        self.batch_size = batch_size

    def forward(self, x, prompts, meta):
        return self.fn(x, prompts, meta)


def reward(fn: Optional[Callable] = None, *, name: Optional[str] = None, input: str = "pixels",
           differentiable: bool = False, device=None, batch_size: Optional[int] = None):
    """Wrap `fn(x, prompts, meta)` as a Reward; also a decorator, `@reward(name="count", input="pixels")`."""
    kwargs = dict(name=name, input=input, differentiable=differentiable, device=device, batch_size=batch_size)
    if fn is None:
        return lambda f: FunctionReward(f, **kwargs)
    return FunctionReward(fn, **kwargs)


def as_reward(obj, name: str) -> Reward:
    """A Reward as given, or a plain callable wrapped as a pixel reward called `name`."""
    if isinstance(obj, Reward):
        return obj
    if callable(obj):
        return FunctionReward(obj, name=name)
    raise TypeError(f"reward {name!r} must be a flowsteer Reward or a callable (got {type(obj).__name__})")


# ---------------------------------------------------------------------------------------- checks


def check_reward_input(r: Reward, x) -> int:
    """Checks x against r's declared input; returns N."""
    what = "images" if r.input == "pixels" else "latents"
    if not isinstance(x, Tensor):
        raise TypeError(f"reward {r.name!r} takes {what} as a torch.Tensor (got {type(x).__name__})")
    if not x.dtype.is_floating_point:
        raise TypeError(f"reward {r.name!r} takes floating-point {what} (got {x.dtype})"
                        + ("; convert uint8 images with x.float() / 255" if x.dtype == torch.uint8 else ""))
    if r.input == "pixels":
        if x.ndim not in (4, 5) or x.shape[1] != 3:
            raise ValueError(f"reward {r.name!r} takes images [N, 3, H, W] or videos [N, 3, F, H, W] "
                             f"(got shape {tuple(x.shape)})")
        if x.numel() and values_checkable(x):
            lo, hi = (float(v) for v in torch.aminmax(x.detach()))
            if lo < -PIXEL_SLACK or hi > 1 + PIXEL_SLACK:
                raise ValueError(f"reward {r.name!r} takes images in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                                 "map [-1, 1] images with (x / 2 + 0.5).clamp(0, 1)")
    else:
        if x.ndim not in (4, 5):
            raise ValueError(f"reward {r.name!r} takes latents [N, C, H, W] or [N, C, F, H, W] (got shape {tuple(x.shape)})")
    if x.shape[0] == 0:
        raise ValueError(f"reward {r.name!r} got an empty batch (N = 0)")
    return x.shape[0]


def check_prompts(name: str, prompts, n: int) -> Optional[List[str]]:
    if prompts is None:
        return None
    if isinstance(prompts, str):
        raise TypeError(f"reward {name!r}: prompts must be a list of {n} strings, one per sample (got one str)")
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"reward {name!r}: prompts has {len(prompts)} entries for {n} samples")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"reward {name!r}: prompts[{i}] must be a str (got {type(p).__name__})")
    return prompts


def check_meta(name: str, meta, n: int):
    if meta is None or isinstance(meta, Mapping):
        return meta
    if isinstance(meta, (list, tuple)):
        if len(meta) != n:
            raise ValueError(f"reward {name!r}: meta has {len(meta)} entries for {n} samples")
        return list(meta)
    raise TypeError(f"reward {name!r}: meta must be None, a list of {n} per-sample entries or a dict "
                    f"(got {type(meta).__name__})")


def _per_sample(value, n: int) -> bool:
    if isinstance(value, Tensor):
        return value.ndim > 0 and value.shape[0] == n
    return isinstance(value, (list, tuple)) and len(value) == n


def slice_meta(meta, start: int, stop: int, n: int):
    """The meta of samples [start, stop): lists are sliced; so are dict values of length N."""
    if meta is None:
        return None
    if isinstance(meta, list):
        return meta[start:stop]
    return {k: (v[start:stop] if _per_sample(v, n) else v) for k, v in meta.items()}


def _check_value(name: str, key: Optional[str], value, n: int, device: torch.device, offset: int, declared: bool) -> Tensor:
    at = "" if key is None else f" in output {key!r}"
    if isinstance(value, Tensor):
        if value.is_complex() or not (value.dtype.is_floating_point or value.dtype in _INT_DTYPES):
            raise TypeError(f"reward {name!r} returned dtype {value.dtype}{at}; a reward returns real numbers")
        if not same_device(value.device, device):
            where = "its declared device" if declared else "the device of its input"
            raise RewardError(f"reward {name!r} returned a tensor on {value.device}{at}; expected {device} ({where})")
    else:
        try:
            value = torch.as_tensor(value, dtype=torch.float32, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"reward {name!r} returned a {type(value).__name__}{at}, which is not a tensor or a "
                            f"sequence of numbers ({exc})") from None
    if value.numel() != n:
        raise RewardError(f"reward {name!r} returned {value.numel()} values{at} for {n} samples")
    if value.ndim != 1:
        raise RewardError(f"reward {name!r} returned shape {tuple(value.shape)}{at}; a reward returns [N] = [{n}]")
    value = value.float() if value.dtype != torch.float32 else value
    if values_checkable(value):
        finite = torch.isfinite(value.detach())
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            raise RewardError(f"reward {name!r} returned {float(value[i])}{at} for sample {offset + i}; "
                              "rewards must be finite")
    return value


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, where an unindexed "cuda" matches any CUDA index (it means the current one)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_reward_output(name: str, out, n: int, device: torch.device, offset: int = 0,
                        declared: bool = False) -> RewardValue:
    """out as fp32 [n] (or {key: fp32 [n]}) after the boundary checks; messages name the reward."""
    if isinstance(out, Mapping):
        if not out:
            raise RewardError(f"reward {name!r} returned an empty dict")
        checked = {}
        for key, value in out.items():
            if not isinstance(key, str):
                raise TypeError(f"reward {name!r} returned a dict with a non-str key {key!r}")
            checked[key] = _check_value(name, key, value, n, device, offset, declared)
        return checked
    if out is None:
        raise RewardError(f"reward {name!r} returned None; a reward returns a Tensor [N] or a dict of them")
    return _check_value(name, None, out, n, device, offset, declared)


def _concat(name: str, chunks: List[RewardValue], device: torch.device) -> RewardValue:
    if isinstance(chunks[0], dict):
        keys = list(chunks[0])
        for i, c in enumerate(chunks):
            if not isinstance(c, dict) or list(c) != keys:
                got = list(c) if isinstance(c, dict) else "a tensor"
                raise RewardError(f"reward {name!r} returned keys {keys} for its first batch and {got} for batch {i}")
        return {k: torch.cat([c[k] for c in chunks]).to(device) for k in keys}
    if any(isinstance(c, dict) for c in chunks):
        raise RewardError(f"reward {name!r} returned a tensor for some batches and a dict for others")
    return torch.cat(chunks).to(device) if len(chunks) > 1 else chunks[0].to(device)


# ------------------------------------------------------------------------------------- helpers


def fold_frames(x: Tensor):
    """Pixel video [N, 3, F, H, W] -> frames [N * F, 3, H, W] and F (F = 1 for images [N, 3, H, W])."""
    if x.ndim == 4:
        return x, 1
    n, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w), f


def frame_mean(scores: Tensor, frames: int) -> Tensor:
    """Per-frame scores [N * F] -> per-sample mean [N]."""
    return scores if frames == 1 else scores.reshape(-1, frames).mean(dim=1)


def to_uint8_hwc(x: Tensor):
    """Images [N, 3, H, W] in [0, 1] -> numpy uint8 [N, H, W, 3], rounded as DDPO and Flow-GRPO do."""
    return (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

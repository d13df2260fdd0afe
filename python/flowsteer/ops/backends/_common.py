"""What every backend shares: output allocation (poisoned in tests), the empty-batch backstop, and
the group segments the GPU kernels take ready-made."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

Tensor = torch.Tensor

# Tests set this: outputs then start as NaN (or 255 for uint8), so an element a kernel never
# writes fails the comparison with the reference instead of passing on stale memory.
POISON_OUTPUTS = False


def empty(*shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    dtype = like.dtype if dtype is None else dtype
    shape = tuple(like.shape) if shape == () else shape
    if POISON_OUTPUTS:
        fill = 255 if dtype == torch.uint8 else float("nan")
        return torch.full(shape, fill, dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def require_nonempty(op: str, name: str, t: Tensor) -> None:
    """A backstop for direct calls of the registered ops (torch.ops.flowsteer.*), which skip the
    public functions' checks (checks.check_batch): every backend refuses an empty batch alike,
    before any kernel sees a null pointer or a zero-sized grid."""
    if t.ndim == 0 or t.shape[0] == 0 or t.numel() == 0:
        raise ValueError(f"{op}: {name} must hold at least one sample and one element per sample "
                         f"(got shape {tuple(t.shape)})")


class ForwardOut(NamedTuple):
    """sde_forward's outputs; one not asked for is an empty tensor."""

    sample: Tensor
    mean: Tensor
    log_prob: Tensor
    std: Tensor
    kl: Tensor


def forward_outputs(x: Tensor, prev_sample: Optional[Tensor], ref_v: Optional[Tensor], want_log_prob: bool,
                    want_mean: bool) -> ForwardOut:
    require_nonempty("sde_step", "x", x)
    B = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return ForwardOut(
        sample=empty(like=x) if prev_sample is None else x.new_empty(0),
        mean=empty(like=x) if want_mean else x.new_empty(0),
        log_prob=empty(B, like=x, dtype=torch.float32) if want_log_prob else torch.empty(0, **f32),
        std=empty(B, like=x, dtype=torch.float32),
        kl=empty(B, like=x, dtype=torch.float32) if ref_v is not None else torch.empty(0, **f32))


class BackwardOut(NamedTuple):
    grad_v: Tensor
    grad_x: Tensor
    grad_ref_v: Tensor


def backward_outputs(v: Tensor, x: Tensor, want_grad_v: bool, want_grad_x: bool, want_grad_ref_v: bool) -> BackwardOut:
    require_nonempty("sde_step_backward", "x", x)
    return BackwardOut(grad_v=empty(like=v) if want_grad_v else v.new_empty(0),
                       grad_x=empty(like=x) if want_grad_x else x.new_empty(0),
                       grad_ref_v=empty(like=v) if want_grad_ref_v else v.new_empty(0))


def present(t: Tensor) -> Optional[Tensor]:
    """None for an output that was not asked for (an empty tensor)."""
    return t if t.numel() else None


def flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(t.shape[0], -1)


def segments(group_ids: Tensor):
    """(order, offsets, counts): sample indices grouped by id (stable), and where each group starts."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return order, offsets, counts

"""Launchers: allocate outputs and run one backend's kernel. No checks of user input (the public
functions in flowsteer.ops did those) and no autograd (the registered ops in sde.py add it).

Every big tensor arrives contiguous as [B, ...] of one dtype (fp32, bf16 or fp16); per-sample
tensors arrive as fp32 [B]. The codes below are the binding contract with csrc/include/flowsteer.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import _backend
from . import reference

from .codes import DTYPE_CODE, KIND_CODE, KIND_NAME, KL_FORM, LP_FORM, STD_MODE  # noqa: F401

Tensor = torch.Tensor


# Tests set this: outputs then start as NaN (or -1 for integers), so an element a kernel never
# writes fails the comparison with the reference instead of passing on stale memory.
POISON_OUTPUTS = False



def _current_device(device: torch.device):
    """device as the current CUDA device for a Triton launch (Triton launches on the current device
    and stream, not the tensors'); nothing on the CPU (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

def _empty(*shape, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    dtype = like.dtype if dtype is None else dtype
    shape = tuple(like.shape) if shape == () else shape
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _require_nonempty(op: str, name: str, t: Tensor) -> None:
    """A backstop for direct calls of the registered ops (torch.ops.flowsteer.*), which skip the
    public functions' checks (checks.check_batch): every backend refuses an empty batch alike,
    before any kernel sees a null pointer or a zero-sized grid."""
    if t.ndim == 0 or t.shape[0] == 0 or t.numel() == 0:
        raise ValueError(f"{op}: {name} must hold at least one sample and one element per sample "
                         f"(got shape {tuple(t.shape)})")


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(t.shape[0], -1)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def sde_forward(
    backend: str,
    v: Tensor,
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise: Optional[Tensor],
    prev_sample: Optional[Tensor],
    guidance: Optional[Tensor],
    guidance_coef: Optional[Tensor],
    ref_v: Optional[Tensor],
    kind: int,
    noise_level: float,
    sigma_max: float,
    seed: int,
    offset: int,
    lp_form: int,
    kl_form: int,
    reduce_mean: bool,
    lp_guided: bool,
    want_log_prob: bool,
    want_mean: bool,
):
    """Returns (sample, mean, log_prob, std, kl); absent outputs are empty tensors."""
    _require_nonempty("sde_step", "x", x)
    B = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    sample = _empty(like=x) if prev_sample is None else x.new_empty(0)
    mean = _empty(like=x) if want_mean else x.new_empty(0)
    log_prob = _empty(B, like=x, dtype=torch.float32) if want_log_prob else torch.empty(0, **f32)
    std = _empty(B, like=x, dtype=torch.float32)
    kl = _empty(B, like=x, dtype=torch.float32) if ref_v is not None else torch.empty(0, **f32)
    if backend == "torch":
        _torch_forward(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v, kind, noise_level,
                       sigma_max, seed, offset, lp_form, kl_form, reduce_mean, lp_guided, sample, mean, log_prob, std, kl)
        return sample, mean, log_prob, std, kl
    common = dict(kind=kind, lp_form=lp_form, kl_form=kl_form, reduce_mean=reduce_mean, lp_guided=lp_guided,
                  noise_level=float(noise_level), sigma_max=float(sigma_max))
    if backend == "triton":
        with _current_device(x.device):  # Triton launches on the current CUDA device
            _backend.triton_module("sde_step").sde_forward(
                v=_flat(v), x=_flat(x), noise=_flat(noise), prev_sample=_flat(prev_sample), guidance=_flat(guidance),
                ref_v=_flat(ref_v), sigma=sigma, sigma_next=sigma_next, guidance_coef=guidance_coef,
                out_sample=_flat(sample) if prev_sample is None else None, out_mean=_flat(mean) if want_mean else None,
                out_log_prob=log_prob if want_log_prob else None, out_std=std, out_kl=kl if ref_v is not None else None,
                seed=seed, offset=offset, **common)
        return sample, mean, log_prob, std, kl
    C = _backend.extension()
    numel = x[0].numel()
    args = dict(
        v=_ptr(v), x=_ptr(x), noise=_ptr(noise), prev_sample=_ptr(prev_sample), guidance=_ptr(guidance),
        ref_v=_ptr(ref_v), sigma=_ptr(sigma), sigma_next=_ptr(sigma_next), guidance_coef=_ptr(guidance_coef),
        out_sample=_ptr(sample) if prev_sample is None else 0, out_mean=_ptr(mean) if want_mean else 0,
        out_log_prob=_ptr(log_prob) if want_log_prob else 0, out_std=_ptr(std),
        out_kl=_ptr(kl) if ref_v is not None else 0, batch=B, numel=numel, dtype=DTYPE_CODE[x.dtype],
        seed=seed, offset=offset, **common)
    if backend == "cpu":
        C.sde_forward_cpu(**args)
    else:
        chunks = (numel + C.cuda_chunk - 1) // C.cuda_chunk
        workspace = torch.empty(B * chunks * 2, **f32)
        with torch.cuda.device(x.device):
            C.sde_forward_cuda(workspace=workspace.data_ptr(), stream=_stream(x.device), **args)
    return sample, mean, log_prob, std, kl


def _torch_forward(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v, kind, noise_level,
                   sigma_max, seed, offset, lp_form, kl_form, reduce_mean, lp_guided, sample, mean, log_prob, std, kl):
    """The reference in fp32 (and the flowsteer noise stream), written into the given outputs."""
    f = torch.float32
    if prev_sample is None and noise is None and KIND_NAME[kind] != "ode":
        noise = reference.philox_normal(x.numel(), seed, offset, dtype=f).to(x.device).reshape(x.shape)
    shift = None
    if guidance is not None:
        shift = guidance.to(f) * guidance_coef.reshape(-1, *([1] * (x.ndim - 1)))
    out = reference.sde_step(
        v.to(f), x.to(f), sigma, sigma_next, KIND_NAME[kind], noise_level,
        noise=None if noise is None else noise.to(f), prev_sample=None if prev_sample is None else prev_sample.to(f),
        sigma_max=sigma_max, guidance=shift, guidance_scale=1.0, guidance_norm="none",
        logprob_mean="guided" if lp_guided else "unguided", reduce="mean" if reduce_mean else "sum",
        cps_logprob="flow_grpo" if lp_form == 1 else "exact", ref_v=None if ref_v is None else ref_v.to(f),
        kl="exact" if kl_form == 2 else "flow_grpo", sample_dtype=x.dtype)
    if prev_sample is None:
        sample.copy_(out["prev_sample"])
    if mean.numel():
        mean.copy_(out["mean"])
    if log_prob.numel():
        log_prob.copy_(out["log_prob"])
    std.copy_(out["std"])
    if kl.numel():
        kl.copy_(out["kl"])


def sde_backward(
    backend: str,
    v: Tensor,
    x: Tensor,
    sample: Optional[Tensor],
    sigma: Tensor,
    sigma_next: Tensor,
    guidance: Optional[Tensor],
    guidance_coef: Optional[Tensor],
    ref_v: Optional[Tensor],
    grad_log_prob: Optional[Tensor],
    grad_kl: Optional[Tensor],
    grad_mean: Optional[Tensor],
    grad_sample: Optional[Tensor],
    kind: int,
    noise_level: float,
    sigma_max: float,
    lp_form: int,
    kl_form: int,
    reduce_mean: bool,
    lp_guided: bool,
    want_grad_v: bool,
    want_grad_x: bool,
    want_grad_ref_v: bool,
):
    """Returns (grad_v, grad_x, grad_ref_v); one not wanted is an empty tensor."""
    _require_nonempty("sde_step_backward", "x", x)
    grad_v = _empty(like=v) if want_grad_v else v.new_empty(0)
    grad_x = _empty(like=x) if want_grad_x else x.new_empty(0)
    grad_ref_v = _empty(like=v) if want_grad_ref_v else v.new_empty(0)
    if backend == "torch":
        _torch_backward(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v, grad_log_prob, grad_kl,
                        grad_mean, grad_sample, kind, noise_level, sigma_max, lp_form, kl_form, reduce_mean, lp_guided,
                        grad_v, grad_x, grad_ref_v)
        return grad_v, grad_x, grad_ref_v
    common = dict(kind=kind, lp_form=lp_form, kl_form=kl_form, reduce_mean=reduce_mean, lp_guided=lp_guided,
                  noise_level=float(noise_level), sigma_max=float(sigma_max))
    if backend == "triton":
        with _current_device(x.device):  # Triton launches on the current CUDA device
            _backend.triton_module("sde_step").sde_backward(
                v=_flat(v), x=_flat(x), sample=_flat(sample), guidance=_flat(guidance), ref_v=_flat(ref_v),
                sigma=sigma, sigma_next=sigma_next, guidance_coef=guidance_coef, grad_log_prob=grad_log_prob,
                grad_kl=grad_kl, grad_mean=_flat(grad_mean), grad_sample=_flat(grad_sample),
                grad_v=_flat(grad_v) if want_grad_v else None, grad_x=_flat(grad_x) if want_grad_x else None,
                grad_ref_v=_flat(grad_ref_v) if want_grad_ref_v else None, **common)
        return grad_v, grad_x, grad_ref_v
    C = _backend.extension()
    args = dict(
        v=_ptr(v), x=_ptr(x), sample=_ptr(sample), guidance=_ptr(guidance), ref_v=_ptr(ref_v), sigma=_ptr(sigma),
        sigma_next=_ptr(sigma_next), guidance_coef=_ptr(guidance_coef), grad_log_prob=_ptr(grad_log_prob),
        grad_kl=_ptr(grad_kl), grad_mean=_ptr(grad_mean), grad_sample=_ptr(grad_sample),
        grad_v=_ptr(grad_v) if want_grad_v else 0, grad_x=_ptr(grad_x) if want_grad_x else 0,
        grad_ref_v=_ptr(grad_ref_v) if want_grad_ref_v else 0, batch=x.shape[0], numel=x[0].numel(),
        dtype=DTYPE_CODE[x.dtype], **common)
    if backend == "cpu":
        C.sde_backward_cpu(**args)
    else:
        with torch.cuda.device(x.device):
            C.sde_backward_cuda(stream=_stream(x.device), **args)
    return grad_v, grad_x, grad_ref_v


def _torch_backward(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v, grad_log_prob, grad_kl, grad_mean,
                    grad_sample, kind, noise_level, sigma_max, lp_form, kl_form, reduce_mean, lp_guided,
                    grad_v, grad_x, grad_ref_v):
    """The analytic gradient of the fp32 reference (registered-op implementations run below
    autograd, so the reference cannot be differentiated here), with the sample held fixed."""
    f = torch.float32
    xf, vf = x.to(f), v.to(f)
    mean_fn, std, g = reference.sde_coefficients(sigma, sigma_next, KIND_NAME[kind], noise_level, sigma_max, xf)
    # The mean is linear in (x, v): its coefficients are the mean of unit inputs.
    ones, zeros = torch.ones_like(std), torch.zeros_like(std)
    cx, cv = mean_fn(ones, zeros), mean_fn(zeros, ones)
    mean = cx * xf + cv * vf
    inv_n = 1.0 / x[0].numel() if reduce_mean else 1.0
    per_sample = lambda t: t.reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731
    g_mean = torch.zeros_like(xf)
    for gm in (grad_mean, grad_sample):
        if gm is not None:
            g_mean = g_mean + gm.to(f)
    if grad_log_prob is not None:
        mean_lp = mean
        if lp_guided and guidance is not None:
            mean_lp = mean + per_sample(guidance_coef) * guidance.to(f)
        scale = torch.ones_like(std) if lp_form == 1 else 1.0 / (2 * std**2)
        g_mean = g_mean + per_sample(grad_log_prob) * inv_n * 2 * scale * (sample.to(f) - mean_lp)
    g_kl = torch.zeros_like(xf)
    if grad_kl is not None:
        divisor = 2 * (std**2 if kl_form == 2 else g**2)
        g_kl = per_sample(grad_kl) * inv_n * 2 / divisor * (mean - (cx * xf + cv * ref_v.to(f)))
    if grad_v.numel():
        grad_v.copy_(cv * (g_mean + g_kl))
    if grad_x.numel():
        grad_x.copy_(cx * g_mean)
    if grad_ref_v.numel():
        grad_ref_v.copy_(-cv * g_kl)


def philox_normal(backend: str, n: int, seed: int, offset: int, device: torch.device) -> Tensor:
    out = _empty(n, like=torch.empty(0, device=device), dtype=torch.float32)
    if n == 0:
        return out
    if backend == "torch":
        out.copy_(reference.philox_normal(n, seed, offset, dtype=torch.float32))
    elif backend == "triton":
        with _current_device(out.device):  # Triton launches on the current CUDA device
            _backend.triton_module("sde_step").philox_normal(out, seed, offset)
    elif backend == "cpu":
        _backend.extension().philox_normal_cpu(out.data_ptr(), n, seed, offset)
    else:
        with torch.cuda.device(device):
            _backend.extension().philox_normal_cuda(out.data_ptr(), n, seed, offset, _stream(device))
    return out


def group_zscore(backend: str, rewards: Tensor, group_ids: Tensor, weights: Tensor, global_std: Tensor,
                 std_mode: int, eps: float, clip: float) -> Tensor:
    """sum_k w_k z_g(r_k), clipped (clip <= 0: no clip). rewards fp32 [N, K], group_ids int64 [N]."""
    _require_nonempty("group_advantages", "rewards", rewards)
    n, k = rewards.shape
    out = _empty(n, like=rewards, dtype=torch.float32)
    if backend == "torch":
        std_name = {v: name for name, v in STD_MODE.items()}[std_mode]
        acc = torch.zeros(n, dtype=torch.float32, device=rewards.device)
        for j in range(k):
            acc += weights[j] * reference.group_zscore(rewards[:, j], group_ids, std_name, eps, global_std[j])
        out.copy_(acc.clamp(-clip, clip) if clip > 0 else acc)
        return out
    if backend == "cpu":
        _backend.extension().group_advantages_cpu(
            rewards=rewards.data_ptr(), group_ids=group_ids.data_ptr(), weights=weights.data_ptr(),
            global_std=global_std.data_ptr(), out=out.data_ptr(), n=n, k=k, std_mode=std_mode, eps=eps, clip=clip)
        return out
    # GPU: the segments come from torch (a sort); the kernel then normalises every group in one launch.
    order, offsets, counts = _segments(group_ids)
    if backend == "triton":
        with _current_device(rewards.device):  # Triton launches on the current CUDA device
            _backend.triton_module("group_advantages").group_advantages(
                rewards=rewards, order=order, offsets=offsets, weights=weights, global_std=global_std, out=out,
                std_mode=std_mode, eps=eps, clip=clip)
    else:
        with torch.cuda.device(rewards.device):
            _backend.extension().group_advantages_cuda(
                rewards=rewards.data_ptr(), order=order.data_ptr(), offsets=offsets.data_ptr(),
                num_groups=counts.numel(), weights=weights.data_ptr(), global_std=global_std.data_ptr(),
                out=out.data_ptr(), n=n, k=k, std_mode=std_mode, eps=eps, clip=clip, stream=_stream(rewards.device))
    return out


def _segments(group_ids: Tensor):
    """(order, offsets, counts): sample indices grouped by id (stable), and where each group starts."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return order, offsets, counts


def win_rate(backend: str, prefs: Tensor) -> Tensor:
    """prefs fp32 [M, G, G] -> fp32 [M, G]."""
    _require_nonempty("win_rate", "prefs", prefs)
    m, g, _ = prefs.shape
    out = _empty(m, g, like=prefs, dtype=torch.float32)
    if backend == "torch":
        out.copy_(reference.win_rate(prefs))
    elif backend == "triton":
        with _current_device(prefs.device):  # Triton launches on the current CUDA device
            _backend.triton_module("group_advantages").win_rate(prefs=prefs, out=out)
    elif backend == "cpu":
        _backend.extension().win_rate_cpu(prefs=prefs.data_ptr(), out=out.data_ptr(), m=m, g=g)
    else:
        with torch.cuda.device(prefs.device):
            _backend.extension().win_rate_cuda(prefs=prefs.data_ptr(), out=out.data_ptr(), m=m, g=g,
                                               stream=_stream(prefs.device))
    return out


def _torch_pareto(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """The reference's pareto_mask vectorised over groups (padded to the largest group S: memory
    G * S^2 * K), for the torch backend; the reference itself loops over pairs in Python."""
    order, offsets, counts = _segments(group_ids)
    g_of = torch.repeat_interleave(torch.arange(counts.numel(), device=rewards.device), counts)
    rank = torch.arange(rewards.shape[0], device=rewards.device) - offsets[:-1][g_of]
    padded = torch.full((counts.numel(), int(counts.max()), rewards.shape[1]), float("-inf"), device=rewards.device)
    padded[g_of, rank] = rewards[order]
    valid = torch.zeros(padded.shape[:2], dtype=torch.bool, device=rewards.device)
    valid[g_of, rank] = True
    # dominates[g, i, j]: sample j dominates sample i.
    ge = (padded[:, None, :, :] >= padded[:, :, None, :]).all(dim=-1)
    gt = (padded[:, None, :, :] > padded[:, :, None, :]).any(dim=-1)
    dominated = (ge & gt & valid[:, None, :]).any(dim=-1)
    mask = torch.empty(rewards.shape[0], dtype=torch.uint8, device=rewards.device)
    mask[order] = (~dominated[g_of, rank]).to(torch.uint8)
    return mask


def pareto_mask(backend: str, rewards: Tensor, group_ids: Tensor) -> Tensor:
    """rewards fp32 [N, K], group_ids int64 [N] -> uint8 [N] (1: not dominated within its group)."""
    _require_nonempty("pareto_mask", "rewards", rewards)
    n, k = rewards.shape
    out = torch.full((n,), 255, dtype=torch.uint8, device=rewards.device) if POISON_OUTPUTS else \
        torch.empty(n, dtype=torch.uint8, device=rewards.device)
    if backend == "torch":
        out.copy_(_torch_pareto(rewards, group_ids))
        return out
    if backend == "cpu":
        _backend.extension().pareto_mask_cpu(rewards=rewards.data_ptr(), group_ids=group_ids.data_ptr(),
                                             out=out.data_ptr(), n=n, k=k)
        return out
    order, offsets, counts = _segments(group_ids)
    if backend == "triton":
        with _current_device(rewards.device):  # Triton launches on the current CUDA device
            _backend.triton_module("group_advantages").pareto_mask(
                rewards=rewards, order=order, offsets=offsets, out=out, max_group=int(counts.max()))
    else:
        with torch.cuda.device(rewards.device):
            _backend.extension().pareto_mask_cuda(rewards=rewards.data_ptr(), order=order.data_ptr(),
                                                  offsets=offsets.data_ptr(), num_groups=counts.numel(),
                                                  out=out.data_ptr(), n=n, k=k, stream=_stream(rewards.device))
    return out

"""The "cuda" backend: the compiled CUDA kernels of flowsteer._C (kernels/cuda), launched on the
tensors' device and its current stream. The group ops take their segments from torch (a sort)."""
from __future__ import annotations

import torch

from . import extension
from ._common import segments
from .cpu import backward_pointers, forward_pointers


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def sde_forward(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v, opts, out) -> None:
    C = extension()
    B, numel = x.shape[0], x[0].numel()
    chunks = (numel + C.cuda_chunk - 1) // C.cuda_chunk
    workspace = torch.empty(B * chunks * 2, dtype=torch.float32, device=x.device)  # the two-stage reduction's partials
    with torch.cuda.device(x.device):
        C.sde_forward_cuda(workspace=workspace.data_ptr(), stream=_stream(x.device),
                           **forward_pointers(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef,
                                              ref_v, out), **opts.keywords())


def sde_backward(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v, grad_log_prob, grad_kl, grad_mean,
                 grad_sample, opts, out) -> None:
    with torch.cuda.device(x.device):
        extension().sde_backward_cuda(stream=_stream(x.device),
                                      **backward_pointers(v, x, sample, sigma, sigma_next, guidance, guidance_coef,
                                                          ref_v, grad_log_prob, grad_kl, grad_mean, grad_sample, out),
                                      **opts.keywords())


def philox_normal(out, seed: int, offset: int) -> None:
    with torch.cuda.device(out.device):
        extension().philox_normal_cuda(out.data_ptr(), out.numel(), seed, offset, _stream(out.device))


def group_zscore(rewards, group_ids, weights, global_std, std_mode: int, eps: float, clip: float, out) -> None:
    order, offsets, counts = segments(group_ids)
    with torch.cuda.device(rewards.device):
        extension().group_advantages_cuda(
            rewards=rewards.data_ptr(), order=order.data_ptr(), offsets=offsets.data_ptr(), num_groups=counts.numel(),
            weights=weights.data_ptr(), global_std=global_std.data_ptr(), out=out.data_ptr(), n=rewards.shape[0],
            k=rewards.shape[1], std_mode=std_mode, eps=eps, clip=clip, stream=_stream(rewards.device))


def win_rate(prefs, out) -> None:
    m, group_size, _ = prefs.shape
    with torch.cuda.device(prefs.device):
        extension().win_rate_cuda(prefs=prefs.data_ptr(), out=out.data_ptr(), m=m, group_size=group_size,
                                  stream=_stream(prefs.device))


def pareto_mask(rewards, group_ids, out) -> None:
    order, offsets, counts = segments(group_ids)
    with torch.cuda.device(rewards.device):
        extension().pareto_mask_cuda(rewards=rewards.data_ptr(), order=order.data_ptr(), offsets=offsets.data_ptr(),
                                     num_groups=counts.numel(), out=out.data_ptr(), n=rewards.shape[0],
                                     k=rewards.shape[1], stream=_stream(rewards.device))

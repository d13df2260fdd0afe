"""The "triton" backend: the Triton kernels of flowsteer._triton (kernels/triton), launched on the
tensors' device (Triton launches on the current CUDA device and stream, not the tensors'), or run
by the interpreter on the CPU under TRITON_INTERPRET=1."""
from __future__ import annotations

import contextlib

import torch

from . import triton_module
from ._common import flat, present, segments


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def sde_forward(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v, opts, out) -> None:
    with _on(x.device):
        triton_module("sde_step").sde_forward(
            v=flat(v), x=flat(x), noise=flat(noise), prev_sample=flat(prev_sample), guidance=flat(guidance),
            ref_v=flat(ref_v), sigma=sigma, sigma_next=sigma_next, guidance_coef=guidance_coef,
            out_sample=flat(present(out.sample)), out_mean=flat(present(out.mean)), out_log_prob=present(out.log_prob),
            out_std=out.std, out_kl=present(out.kl), opts=opts)


def sde_backward(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v, grad_log_prob, grad_kl, grad_mean,
                 grad_sample, opts, out) -> None:
    with _on(x.device):
        triton_module("sde_step").sde_backward(
            v=flat(v), x=flat(x), sample=flat(sample), guidance=flat(guidance), ref_v=flat(ref_v), sigma=sigma,
            sigma_next=sigma_next, guidance_coef=guidance_coef, grad_log_prob=grad_log_prob, grad_kl=grad_kl,
            grad_mean=flat(grad_mean), grad_sample=flat(grad_sample), grad_v=flat(present(out.grad_v)),
            grad_x=flat(present(out.grad_x)), grad_ref_v=flat(present(out.grad_ref_v)), opts=opts)


def philox_normal(out, seed: int, offset: int) -> None:
    with _on(out.device):
        triton_module("sde_step").philox_normal(out, seed, offset)


def group_zscore(rewards, group_ids, weights, global_std, std_mode: int, eps: float, clip: float, out) -> None:
    order, offsets, _ = segments(group_ids)
    with _on(rewards.device):
        triton_module("group_advantages").group_advantages(
            rewards=rewards, order=order, offsets=offsets, weights=weights, global_std=global_std, out=out,
            std_mode=std_mode, eps=eps, clip=clip)


def win_rate(prefs, out) -> None:
    with _on(prefs.device):
        triton_module("group_advantages").win_rate(prefs=prefs, out=out)


def pareto_mask(rewards, group_ids, out) -> None:
    order, offsets, counts = segments(group_ids)
    with _on(rewards.device):
        triton_module("group_advantages").pareto_mask(rewards=rewards, order=order, offsets=offsets, out=out,
                                                      max_group=int(counts.max()))

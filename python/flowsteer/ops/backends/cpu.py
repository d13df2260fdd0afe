"""The "cpu" backend: the compiled C++ kernels of flowsteer._C (csrc/cpu), called with raw data
pointers and the step's options as keywords."""
from __future__ import annotations

from ..codes import DTYPE_CODE
from . import extension


def _ptr(t) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def sde_forward(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v, opts, out) -> None:
    extension().sde_forward_cpu(**forward_pointers(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef,
                                                   ref_v, out), **opts.keywords())


def forward_pointers(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v, out) -> dict:
    """The forward's tensors as the compiled core's keywords (shared with the CUDA backend)."""
    return dict(v=_ptr(v), x=_ptr(x), noise=_ptr(noise), prev_sample=_ptr(prev_sample), guidance=_ptr(guidance),
                ref_v=_ptr(ref_v), sigma=_ptr(sigma), sigma_next=_ptr(sigma_next), guidance_coef=_ptr(guidance_coef),
                out_sample=_ptr(out.sample), out_mean=_ptr(out.mean), out_log_prob=_ptr(out.log_prob),
                out_std=_ptr(out.std), out_kl=_ptr(out.kl), batch=x.shape[0], numel=x[0].numel(),
                dtype=DTYPE_CODE[x.dtype])


def backward_pointers(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v, grad_log_prob, grad_kl,
                      grad_mean, grad_sample, out) -> dict:
    return dict(v=_ptr(v), x=_ptr(x), sample=_ptr(sample), guidance=_ptr(guidance), ref_v=_ptr(ref_v),
                sigma=_ptr(sigma), sigma_next=_ptr(sigma_next), guidance_coef=_ptr(guidance_coef),
                grad_log_prob=_ptr(grad_log_prob), grad_kl=_ptr(grad_kl), grad_mean=_ptr(grad_mean),
                grad_sample=_ptr(grad_sample), grad_v=_ptr(out.grad_v), grad_x=_ptr(out.grad_x),
                grad_ref_v=_ptr(out.grad_ref_v), batch=x.shape[0], numel=x[0].numel(), dtype=DTYPE_CODE[x.dtype])


def sde_backward(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v, grad_log_prob, grad_kl, grad_mean,
                 grad_sample, opts, out) -> None:
    extension().sde_backward_cpu(**backward_pointers(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v,
                                                     grad_log_prob, grad_kl, grad_mean, grad_sample, out),
                                 **opts.keywords())


def philox_normal(out, seed: int, offset: int) -> None:
    extension().philox_normal_cpu(out.data_ptr(), out.numel(), seed, offset)


def group_zscore(rewards, group_ids, weights, global_std, std_mode: int, eps: float, clip: float, out) -> None:
    extension().group_advantages_cpu(
        rewards=rewards.data_ptr(), group_ids=group_ids.data_ptr(), weights=weights.data_ptr(),
        global_std=global_std.data_ptr(), out=out.data_ptr(), n=rewards.shape[0], k=rewards.shape[1],
        std_mode=std_mode, eps=eps, clip=clip)


def win_rate(prefs, out) -> None:
    m, group_size, _ = prefs.shape
    extension().win_rate_cpu(prefs=prefs.data_ptr(), out=out.data_ptr(), m=m, group_size=group_size)


def pareto_mask(rewards, group_ids, out) -> None:
    extension().pareto_mask_cpu(rewards=rewards.data_ptr(), group_ids=group_ids.data_ptr(), out=out.data_ptr(),
                                n=rewards.shape[0], k=rewards.shape[1])

"""The fused SDE step: registered torch ops with fakes and autograd, and the public `sde_step`."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from . import backends
from .backends import _common
from .checks import (SEED_LIMIT, check_batch, check_choice, check_guidance_scale, check_kind_and_noise, check_seed,
                      check_sigmas, check_tensor)
from .codes import KIND_CODE, KL_FORM, LP_FORM
from .options import SdeOptions

Tensor = torch.Tensor


# ------------------------------------------------------------------------------ registered ops


def _sde_step_impl(
    v: Tensor,
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise: Optional[Tensor],
    prev_sample: Optional[Tensor],
    guidance: Optional[Tensor],
    guidance_coef: Optional[Tensor],
    ref_v: Optional[Tensor],
    options: list[int],
    scalars: list[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """options, scalars: SdeOptions.to_op()'s ints and floats, then [want_log_prob, want_mean]
    after the ints. Flat lists because the dispatcher's per-call cost grows with the number of
    arguments (quadratically in torch 2.13's fill_defaults)."""
    opts, (want_log_prob, want_mean) = SdeOptions.from_op(options, scalars)
    out = _common.forward_outputs(x, prev_sample, ref_v, bool(want_log_prob), bool(want_mean))
    backends.module(x.device).sde_forward(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v,
                                          opts, out)
    return tuple(out)


_sde_step_op = torch.library.custom_op("flowsteer::sde_step", _sde_step_impl, mutates_args=())


@_sde_step_op.register_fake
def _(v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v, options, scalars):
    _, (want_log_prob, want_mean) = SdeOptions.from_op(options, scalars)
    B = x.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    return (
        torch.empty_like(x) if prev_sample is None else x.new_empty(0),
        torch.empty_like(x) if want_mean else x.new_empty(0),
        x.new_empty(B, dtype=torch.float32) if want_log_prob else torch.empty(0, **f32),
        x.new_empty(B, dtype=torch.float32),
        x.new_empty(B, dtype=torch.float32) if ref_v is not None else torch.empty(0, **f32),
    )


def _sde_step_backward_impl(
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
    options: list[int],
    scalars: list[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """options, scalars: SdeOptions.to_op()'s, then [want_grad_v, want_grad_x, want_grad_ref_v]."""
    opts, (want_grad_v, want_grad_x, want_grad_ref_v) = SdeOptions.from_op(options, scalars)
    out = _common.backward_outputs(v, x, bool(want_grad_v), bool(want_grad_x), bool(want_grad_ref_v))
    backends.module(x.device).sde_backward(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v,
                                           grad_log_prob, grad_kl, grad_mean, grad_sample, opts, out)
    return tuple(out)


_sde_step_backward_op = torch.library.custom_op("flowsteer::sde_step_backward", _sde_step_backward_impl,
                                                mutates_args=())


@_sde_step_backward_op.register_fake
def _(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v, grad_log_prob, grad_kl, grad_mean, grad_sample,
      options, scalars):
    _, (want_grad_v, want_grad_x, want_grad_ref_v) = SdeOptions.from_op(options, scalars)
    return (
        torch.empty_like(v) if want_grad_v else v.new_empty(0),
        torch.empty_like(x) if want_grad_x else x.new_empty(0),
        torch.empty_like(v) if want_grad_ref_v else v.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    v, x, sigma, sigma_next, noise, prev_sample, guidance, guidance_coef, ref_v, options, scalars = inputs
    opts, (want_log_prob, _) = SdeOptions.from_op(options, scalars)
    sample = output[0] if prev_sample is None else prev_sample
    ctx.sampled = prev_sample is None
    ctx.has_log_prob = bool(want_log_prob)
    ctx.has_kl = ref_v is not None
    ctx.options, ctx.scalars = opts.to_op()
    ctx.save_for_backward(v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v)
    ctx.set_materialize_grads(False)


def _present(g: Optional[Tensor]) -> Optional[Tensor]:
    return None if g is None or g.numel() == 0 else g.contiguous()


def _backward(ctx, grad_sample, grad_mean, grad_log_prob, grad_std, grad_kl, backward_fn=None):
    v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v = ctx.saved_tensors
    want_v, want_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    want_ref = ctx.needs_input_grad[8] and ctx.has_kl
    grad_log_prob = _present(grad_log_prob) if ctx.has_log_prob else None
    grad_kl = _present(grad_kl) if ctx.has_kl else None
    grad_sample = _present(grad_sample) if ctx.sampled else None
    grad_mean = _present(grad_mean)
    if grad_log_prob is None and grad_kl is None and grad_sample is None and grad_mean is None:
        return (None,) * 11
    grad_v, grad_x, grad_ref_v = (backward_fn or _sde_step_backward_op)(
        v, x, sample, sigma, sigma_next, guidance, guidance_coef, ref_v, grad_log_prob, grad_kl,
        None if grad_mean is None else grad_mean.to(x.dtype), None if grad_sample is None else grad_sample.to(x.dtype),
        ctx.options + [int(want_v), int(want_x), int(want_ref)], ctx.scalars)
    return ((grad_v if want_v else None, grad_x if want_x else None) + (None,) * 6
            + (grad_ref_v if want_ref else None, None, None))


_sde_step_op.register_autograd(_backward, setup_context=_setup_context)


class _SdeStepFunction(torch.autograd.Function):
    """The same forward, context and backward as the registered op's autograd, for eager mode: it
    avoids the dispatcher's per-call cost and its first-call import of torch._dynamo (about 4 s).
    Under torch.compile the registered op runs instead, so tracers see one opaque op."""

    @staticmethod
    def forward(*args):
        return _sde_step_impl(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads, backward_fn=_sde_step_backward_impl)


# ------------------------------------------------------------------------------ public function


class SDEStepOutput(NamedTuple):
    """prev_sample [B, ...], log_prob [B] fp32 (None without noise), mean [B, ...] (None unless
    return_mean), std [B] fp32, kl [B] fp32 (None without ref_v)."""

    prev_sample: Tensor
    log_prob: Optional[Tensor]
    mean: Optional[Tensor]
    std: Tensor
    kl: Optional[Tensor]


def sde_step(
    v: Tensor,
    x: Tensor,
    sigma: Union[float, Tensor],
    sigma_next: Union[float, Tensor],
    kind: str = "flow",
    noise_level: float = 0.7,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    prev_sample: Optional[Tensor] = None,
    sigma_max: Optional[float] = None,
    guidance: Optional[Tensor] = None,
    guidance_scale: Union[float, Tensor] = 1.0,
    guidance_norm: str = "none",
    scale_by_dt: bool = False,
    logprob_mean: str = "unguided",
    reduce: str = "mean",
    cps_logprob: str = "exact",
    ref_v: Optional[Tensor] = None,
    kl: str = "flow_grpo",
    return_mean: bool = True,
) -> SDEStepOutput:
    """One step sigma -> sigma_next of a flow-matching sampler, with the log-prob of its sample.

    Args:
        v: [B, C, H, W], [B, C, F, H, W] or any [B, ...] velocity; fp32, bf16 or fp16. B >= 1 and at
            least one element per sample (an empty batch is a ValueError on every backend).
        x: latents x_sigma, same shape, dtype and device as v.
        sigma, sigma_next: floats or [B] tensors, 0 < sigma <= 1 and 0 <= sigma_next < sigma.
        kind: "ode" (Euler), "flow" (Flow-GRPO), "dance" (DanceGRPO) or "cps" (coefficient-preserving).
        noise_level: a in the design's table (Flow-GRPO's noise_level, DanceGRPO's eta): a finite
            float in [0, 10] ([0, 1] for "cps"); larger values overflow the step's coefficients.
        noise: [B, ...] standard normals for the sample; without it the kernel draws Philox4x32-10
            normals from (seed, offset): element i of the flattened batch uses counter i // 4.
            seed and offset: ints in [0, 2**63) (Python or numpy integers or 0-d integer tensors; not
            bools). seed defaults to one drawn from torch's default CPU generator.
        prev_sample: [B, ...] evaluate mode: nothing is drawn; log_prob is that of prev_sample.
        sigma_max: Flow-GRPO's sigma~ at sigma == 1 (its sigmas[1], in [0, 1)); required by "flow" there.
        guidance: [B, ...] reward gradient G (Euphonium); the sampling mean moves by c * G_hat with
            c = guidance_scale (a finite float or a [B] tensor; times delta when scale_by_dt) and G_hat = G,
            or G over its per-sample ("sample") or whole-batch ("batch") L2 norm plus 1e-8
            (`guidance_coefficient` computes c).
        logprob_mean: "unguided" (default: distils the guidance) or "guided".
        reduce: "mean" (Flow-GRPO, DanceGRPO) or "sum" over the non-batch elements.
        cps_logprob: "exact" Gaussian log-density or Flow-GRPO's simplified "flow_grpo" -mean (x' - mean)^2.
        ref_v: [B, ...] reference-policy velocity: adds kl [B] = reduce((mean - ref_mean)^2) / (2 g^2)
            ("flow_grpo", g = Flow-GRPO's std_dev_t) or / (2 std^2) ("exact"), fused in the same pass.
        return_mean: also write mean [B, ...] (the mean the log-prob is taken under).

    Returns SDEStepOutput(prev_sample, log_prob, mean, std, kl). All math is fp32. prev_sample and
    mean have x's dtype; the log-prob of a drawn sample is that of the sample as stored. log_prob,
    kl, mean and a drawn prev_sample are differentiable with respect to v, x (and ref_v); sigmas,
    noise, guidance and a given prev_sample are not (Flow-GRPO detaches prev_sample the same way).
    """
    check_kind_and_noise(kind, noise_level, KIND_CODE)
    check_choice("reduce", reduce, ("mean", "sum"))
    check_choice("cps_logprob", cps_logprob, LP_FORM)
    check_choice("logprob_mean", logprob_mean, ("unguided", "guided"))
    check_choice("guidance_norm", guidance_norm, ("none", "sample", "batch"))
    check_choice("kl", kl, ("flow_grpo", "exact"))
    check_tensor("v", v, min_ndim=2)
    check_batch("v", v)
    check_tensor("x", x, like=v, like_name="v")
    for name, t in (("noise", noise), ("prev_sample", prev_sample), ("guidance", guidance), ("ref_v", ref_v)):
        if t is not None:
            check_tensor(name, t, like=v, like_name="v")
    stochastic = kind != "ode" and noise_level > 0
    if prev_sample is not None and (noise is not None or seed is not None):
        raise ValueError("noise and seed draw a sample; they cannot be combined with prev_sample (evaluate mode)")
    if noise is not None and seed is not None:
        raise ValueError("give either noise or seed, not both")
    if ref_v is not None and not stochastic:
        raise ValueError(f"ref_v (the KL term) needs a stochastic step; kind={kind!r} with noise_level={noise_level} has std 0")
    if prev_sample is not None and not stochastic:
        raise ValueError(f"prev_sample (evaluate mode) needs a stochastic step; kind={kind!r} with noise_level={noise_level} has no log-prob")
    if sigma_max is not None and not (0.0 <= float(sigma_max) < 1.0):  # 0: a one-step schedule's sigmas[1]
        raise ValueError(f"sigma_max must be in [0, 1) (got {sigma_max})")
    if seed is not None:
        seed = check_seed("seed", seed)
    offset = check_seed("offset", offset)

    B = x.shape[0]
    check_guidance_scale(guidance_scale, B)
    sig, sig_next, sigma_at_one = check_sigmas(sigma, sigma_next, B, x.device)
    if kind == "flow" and stochastic and sigma_at_one and sigma_max is None:
        raise ValueError("kind='flow' at sigma == 1 needs sigma_max (Flow-GRPO passes sigmas[1])")

    guidance_coef = None
    if guidance is not None:
        guidance_coef = _guidance_coef(guidance, sig, sig_next, guidance_scale, guidance_norm, scale_by_dt)
        guidance = guidance.detach()

    if prev_sample is None and stochastic and noise is None and seed is None:
        seed = int(torch.randint(0, SEED_LIMIT - 1, (1,), dtype=torch.int64).item())
    opts = SdeOptions(kind=KIND_CODE[kind], noise_level=float(noise_level),
                      sigma_max=float(sigma_max) if sigma_max is not None else 0.0, seed=int(seed or 0),
                      offset=int(offset), lp_form=LP_FORM[cps_logprob], kl_form=KL_FORM[kl] if ref_v is not None else 0,
                      reduce_mean=reduce == "mean", lp_guided=logprob_mean == "guided")
    options, scalars = opts.to_op()
    options += [int(stochastic), int(return_mean)]
    args = (v, x, sig, sig_next, noise if stochastic else None, None if prev_sample is None else prev_sample.detach(),
            guidance, guidance_coef, ref_v)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (v, x, ref_v))
    if torch.compiler.is_compiling():
        sample, mean, log_prob, std, kl_value = _sde_step_op(*args, options, scalars)
    elif differentiable:
        sample, mean, log_prob, std, kl_value = _SdeStepFunction.apply(*args, options, scalars)
    else:
        # Nothing to record for autograd or a tracer: skip the dispatcher (about 0.1 ms a call on a
        # 2-core CPU, which is most of a rollout step's overhead) and run the same implementation.
        sample, mean, log_prob, std, kl_value = _sde_step_impl(*args, options, scalars)
    return SDEStepOutput(
        prev_sample=sample if prev_sample is None else prev_sample,
        log_prob=log_prob if stochastic else None,
        mean=mean if return_mean else None,
        std=std,
        kl=kl_value if ref_v is not None else None,
    )


def _guidance_coef(guidance: Tensor, sig: Tensor, sig_next: Tensor, guidance_scale, guidance_norm: str,
                   scale_by_dt: bool) -> Tensor:
    """c [B] fp32; guidance_scale was checked by check_guidance_scale."""
    B = guidance.shape[0]
    if torch.is_tensor(guidance_scale):
        c = guidance_scale.detach().to(device=guidance.device, dtype=torch.float32).expand(B)
    else:
        c = torch.full((B,), float(guidance_scale), dtype=torch.float32, device=guidance.device)
    if scale_by_dt:
        c = c * (sig - sig_next)
    if guidance_norm == "sample":
        c = c / (guidance.detach().float().flatten(1).norm(dim=1) + 1e-8)
    elif guidance_norm == "batch":
        c = c / (guidance.detach().float().norm() + 1e-8)
    return c.contiguous()


def guidance_coefficient(guidance: Tensor, sigma, sigma_next, guidance_scale=1.0, guidance_norm: str = "none",
                         scale_by_dt: bool = False) -> Tensor:
    """c [B] fp32 of sde_step's guided mean, mean + c * G: guidance_scale (a float or [B]), times
    sigma - sigma_next when scale_by_dt, over G's per-sample ("sample") or whole-batch ("batch")
    L2 norm plus 1e-8. Passing it back as guidance_scale with guidance_norm="none" and
    scale_by_dt=False gives the same step for any subset of the rows (the sampler keeps it so that
    re-evaluating a minibatch rebuilds the mean the whole batch was sampled with)."""
    check_choice("guidance_norm", guidance_norm, ("none", "sample", "batch"))
    check_tensor("guidance", guidance, min_ndim=2)
    check_batch("guidance", guidance)
    check_guidance_scale(guidance_scale, guidance.shape[0])
    sig, sig_next, _ = check_sigmas(sigma, sigma_next, guidance.shape[0], guidance.device)
    return _guidance_coef(guidance, sig, sig_next, guidance_scale, guidance_norm, scale_by_dt)


def sde_log_prob(
    v: Tensor,
    x: Tensor,
    prev_sample: Tensor,
    sigma: Union[float, Tensor],
    sigma_next: Union[float, Tensor],
    kind: str = "flow",
    noise_level: float = 0.7,
    *,
    ref_v: Optional[Tensor] = None,
    **kwargs,
):
    """The training-time path: (log_prob [B], kl [B] or None) of a stored step, differentiable with
    respect to v through one fused forward and one fused backward. Other keywords as in sde_step."""
    out = sde_step(v, x, sigma, sigma_next, kind, noise_level, prev_sample=prev_sample, ref_v=ref_v,
                   return_mean=False, **kwargs)
    return out.log_prob, out.kl


def sde_kl(mean: Tensor, ref_mean: Tensor, std: Union[float, Tensor], reduce: str = "mean") -> Tensor:
    """KL [B] between N(mean, std^2) and N(ref_mean, std^2): reduce((mean - ref_mean)^2) / (2 std^2).

    Flow-GRPO's form passes its std_dev_t (g, without sqrt(delta)) as std. When v, ref_v, x and the
    sample are at hand, sde_step(..., ref_v=...) computes the same term fused with the log-prob.
    """
    check_tensor("mean", mean, min_ndim=1, dtypes=None)
    check_batch("mean", mean)
    check_tensor("ref_mean", ref_mean, like=mean, like_name="mean", contiguous=False)
    check_choice("reduce", reduce, ("mean", "sum"))
    from .reference import sde_kl as _ref

    return _ref(mean.float(), ref_mean.float(), std, reduce)


def philox_normal(shape, seed: int, offset: int = 0, device: Union[str, torch.device] = "cpu") -> Tensor:
    """The fp32 standard normals sde_step draws in-kernel for a batch of this shape and (seed, offset).
    Not a batched op: a shape with no elements gives an empty tensor, as torch.randn does."""
    seed = check_seed("seed", seed)
    offset = check_seed("offset", offset)
    shape = tuple(shape) if not isinstance(shape, int) else (shape,)
    device = torch.device(device)
    n = math.prod(shape)
    out = _common.empty(n, like=torch.empty(0, device=device), dtype=torch.float32)
    if n:
        backends.module(device).philox_normal(out, seed, offset)
    return out.reshape(shape)

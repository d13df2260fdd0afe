"""sde_step on every backend against the fp64 reference: kinds, modes, dtypes, shapes, gradients."""
import math

import pytest
import torch

import flowsteer
from flowsteer.ops import reference as R
from flowsteer.ops import sde_step

from helpers import assert_close

# B = 1; odd sizes; a 5-D video latent; a sample larger than one CPU chunk (16384) with a size
# that is not a multiple of 4, so Philox blocks straddle samples.
SHAPES = [(1, 4, 8, 8), (3, 4, 7, 5), (2, 3, 3, 5, 6), (2, 5, 59, 61)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["ode", "flow", "dance", "cps"]
NOISE_LEVEL = {"ode": 0.0, "flow": 0.7, "dance": 0.3, "cps": 0.6}
SIGMA_MAX = 0.96  # Flow-GRPO's sigmas[1] for the step at sigma = 1


def shape_id(shape):
    return "B%d-" % shape[0] + "x".join(str(s) for s in shape[1:])


def dtype_id(dtype):
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def sigmas(batch, device):
    """Per-sample sigmas with the edges: sigma = 1 at the first step and a tiny sigma_next at the last."""
    sigma = torch.tensor([1.0, 0.6, 0.25, 0.8, 0.5][:batch] if batch <= 5 else [0.5] * batch)
    sigma_next = torch.tensor([0.96, 0.45, 1e-3, 0.7, 0.3][:batch] if batch <= 5 else [0.4] * batch)
    return sigma.to(device), sigma_next.to(device)


def make(shape, dtype, device, seed=0):
    """Random tensors as stored in dtype (never zeros), and their fp64 values for the reference."""
    g = torch.Generator().manual_seed(seed)
    vals = [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]
    return [t.to(device) for t in vals], [t.double() for t in vals]


def ref_pair(v64, x64, sigma, sigma_next, kind, dtype, **kw):
    """(fp64 reference, reference evaluated as the kernel does: fp32 math, outputs in dtype)."""
    r64 = R.sde_step(v64, x64, sigma.double().cpu(), sigma_next.double().cpu(), kind, NOISE_LEVEL[kind],
                     sigma_max=SIGMA_MAX, **{k: (t.double() if torch.is_tensor(t) else t) for k, t in kw.items()})
    kw32 = {k: (t.float() if torch.is_tensor(t) else t) for k, t in kw.items()}
    r32 = R.sde_step(v64.float(), x64.float(), sigma.float().cpu(), sigma_next.float().cpu(), kind, NOISE_LEVEL[kind],
                     sigma_max=SIGMA_MAX, **kw32)
    for key in ("prev_sample", "mean"):
        r32[key] = r32[key].to(dtype)
    return r64, r32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_sample_mode_philox(backend, shape, dtype, kind):
    name, device = backend
    (v, x, _, _), (v64, x64, _, _) = make(shape, dtype, device)
    sig, sig_next = sigmas(shape[0], device)
    out = sde_step(v, x, sig, sig_next, kind, NOISE_LEVEL[kind], seed=1234, offset=5, sigma_max=SIGMA_MAX)
    noise = R.philox_normal(v.numel(), 1234, 5).reshape(shape)
    r64, r32 = ref_pair(v64, x64, sig, sig_next, kind, dtype, noise=noise, sample_dtype=dtype)
    # Philox normals differ from the exact Box-Muller by a few fp32 ulp; scaled by std they stay
    # inside the sample tolerance. The fp32 reference uses the exact normals too.
    assert out.prev_sample.dtype == dtype and out.mean.dtype == dtype
    assert_close("prev_sample", out.prev_sample, r64["prev_sample"], r32["prev_sample"])
    assert_close("mean", out.mean, r64["mean"], r32["mean"])
    assert_close("std", out.std, r64["std"], r32["std"])
    if kind == "ode":
        assert out.log_prob is None
        return
    # The log-prob is that of the sample as stored: compare with the reference evaluated there.
    e64, e32 = ref_pair(v64, x64, sig, sig_next, kind, dtype, prev_sample=out.prev_sample.cpu())
    assert_close("log_prob", out.log_prob, e64["log_prob"], e32["log_prob"])


@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_evaluate_mode_with_kl(backend, shape, dtype, kind):
    name, device = backend
    (v, x, ref_v, z), (v64, x64, ref_v64, z64) = make(shape, dtype, device)
    sig, sig_next = sigmas(shape[0], device)
    # A sample near the step's mean, as a rollout stores it.
    prev = R.sde_step(v64, x64, sig.double().cpu(), sig_next.double().cpu(), kind, NOISE_LEVEL[kind], noise=z64,
                      sigma_max=SIGMA_MAX)["prev_sample"].to(dtype)
    for kl in ("flow_grpo", "exact"):
        out = sde_step(v, x, sig, sig_next, kind, NOISE_LEVEL[kind], prev_sample=prev.to(device), sigma_max=SIGMA_MAX,
                       ref_v=ref_v, kl=kl)
        r64, r32 = ref_pair(v64, x64, sig, sig_next, kind, dtype, prev_sample=prev, ref_v=ref_v64, kl=kl)
        assert torch.equal(out.prev_sample.cpu(), prev)
        assert_close("log_prob", out.log_prob, r64["log_prob"], r32["log_prob"])
        assert_close(f"kl[{kl}]", out.kl, r64["kl"], r32["kl"])
        assert_close("mean", out.mean, r64["mean"], r32["mean"])


def _grads(fn, inputs, upstream):
    outs = fn(*inputs)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream) if o is not None)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("kind", ["flow", "dance", "cps"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=shape_id)
def test_evaluate_mode_gradients(backend, shape, dtype, kind):
    """grad of (log_prob, kl, mean) with respect to v, x and ref_v: the fused backward."""
    name, device = backend
    (v, x, ref_v, z), (v64, x64, ref_v64, z64) = make(shape, dtype, device, seed=3)
    sig, sig_next = sigmas(shape[0], device)
    prev = R.sde_step(v64, x64, sig.double().cpu(), sig_next.double().cpu(), kind, NOISE_LEVEL[kind], noise=z64,
                      sigma_max=SIGMA_MAX)["prev_sample"].to(dtype)
    g = torch.Generator().manual_seed(9)
    up_lp, up_kl = torch.randn(shape[0], generator=g), torch.randn(shape[0], generator=g)
    up_mean = torch.randn(shape, generator=g).to(dtype)

    def kernel(v_, x_, r_):
        o = sde_step(v_, x_, sig, sig_next, kind, NOISE_LEVEL[kind], prev_sample=prev.to(device), sigma_max=SIGMA_MAX,
                     ref_v=r_)
        return o.log_prob.cpu(), o.kl.cpu(), o.mean.cpu()

    def reference(dt):
        def f(v_, x_, r_):
            o = R.sde_step(v_, x_, sig.to(dt).cpu(), sig_next.to(dt).cpu(), kind, NOISE_LEVEL[kind],
                           prev_sample=prev.to(dt), sigma_max=SIGMA_MAX, ref_v=r_)
            return o["log_prob"], o["kl"], o["mean"]
        return f

    got = _grads(kernel, [t.clone().requires_grad_() for t in (v, x, ref_v)], (up_lp, up_kl, up_mean))
    want64 = _grads(reference(torch.float64), [t.clone().requires_grad_() for t in (v64, x64, ref_v64)],
                    (up_lp.double(), up_kl.double(), up_mean.double()))
    want32 = _grads(reference(torch.float32), [t.float().requires_grad_() for t in (v64, x64, ref_v64)],
                    (up_lp, up_kl, up_mean.float()))
    for n_, a, b, c in zip(("grad_v", "grad_x", "grad_ref_v"), got, want64, want32):
        assert a.dtype == dtype
        assert_close(n_, a, b, c.to(dtype))


@pytest.mark.parametrize("kind", ["flow", "cps"])
def test_sample_mode_gradients(backend, kind):
    """A drawn sample is mean + std * eps: gradients reach v and x through it and through the mean."""
    name, device = backend
    shape = (2, 3, 5, 7)
    (v, x, _, _), (v64, x64, _, _) = make(shape, torch.float32, device, seed=4)
    sig, sig_next = sigmas(2, device)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    up = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in (5, 6)] + [torch.randn(2)]

    def kernel(v_, x_):
        o = sde_step(v_, x_, sig, sig_next, kind, NOISE_LEVEL[kind], noise=noise.to(device), sigma_max=SIGMA_MAX)
        return o.prev_sample.cpu(), o.mean.cpu(), o.log_prob.cpu()

    def reference(v_, x_):
        o = R.sde_step(v_, x_, sig.double().cpu(), sig_next.double().cpu(), kind, NOISE_LEVEL[kind],
                       noise=noise.double(), sigma_max=SIGMA_MAX)
        return o["prev_sample"], o["mean"], o["log_prob"]

    got = _grads(kernel, [v.clone().requires_grad_(), x.clone().requires_grad_()], up)
    want = _grads(reference, [v64.clone().requires_grad_(), x64.clone().requires_grad_()], [u.double() for u in up])
    for n_, a, b in zip(("grad_v", "grad_x"), got, want):
        assert_close(n_, a, b, ulps=64)


@pytest.mark.parametrize("norm", ["none", "sample", "batch"])
@pytest.mark.parametrize("logprob_mean", ["unguided", "guided"])
@pytest.mark.parametrize("scale_by_dt", [False, True], ids=["c", "c*dt"])
def test_guidance(backend, norm, logprob_mean, scale_by_dt):
    name, device = backend
    shape = (3, 4, 7, 5)
    (v, x, G, z), (v64, x64, G64, z64) = make(shape, torch.float32, device, seed=7)
    sig, sig_next = sigmas(3, device)
    kw = dict(guidance_scale=0.8, guidance_norm=norm, scale_by_dt=scale_by_dt, logprob_mean=logprob_mean)
    out = sde_step(v, x, sig, sig_next, "flow", 0.7, noise=z, guidance=G, sigma_max=SIGMA_MAX, **kw)
    r64, r32 = ref_pair(v64, x64, sig, sig_next, "flow", torch.float32, noise=z64, guidance=G64, **kw)
    assert_close("prev_sample", out.prev_sample, r64["prev_sample"], r32["prev_sample"])
    assert_close("mean", out.mean, r64["mean"], r32["mean"])
    assert_close("log_prob", out.log_prob, r64["log_prob"], r32["log_prob"])
    # Evaluate mode with guidance, differentiable: the guidance shift is a constant.
    vv = v.clone().requires_grad_()
    lp = sde_step(vv, x, sig, sig_next, "flow", 0.7, prev_sample=out.prev_sample, guidance=G, sigma_max=SIGMA_MAX,
                  **kw).log_prob
    (gv,) = torch.autograd.grad(lp.sum(), vv)
    v64g = v64.clone().requires_grad_()
    lp64 = R.sde_step(v64g, x64, sig.double().cpu(), sig_next.double().cpu(), "flow", 0.7,
                      prev_sample=out.prev_sample.double().cpu(), guidance=G64, sigma_max=SIGMA_MAX, **kw)["log_prob"]
    (gv64,) = torch.autograd.grad(lp64.sum(), v64g)
    assert_close("log_prob(eval)", lp, lp64, r32["log_prob"])
    assert_close("grad_v", gv, gv64, ulps=64)


@pytest.mark.parametrize("kind,cps_logprob", [("flow", "exact"), ("dance", "exact"), ("cps", "exact"), ("cps", "flow_grpo")])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_reduce_and_cps_form(backend, kind, reduce, cps_logprob):
    name, device = backend
    shape = (2, 3, 3, 5, 6)
    (v, x, _, z), (v64, x64, _, z64) = make(shape, torch.float32, device, seed=11)
    sig, sig_next = sigmas(2, device)
    out = sde_step(v, x, sig, sig_next, kind, NOISE_LEVEL[kind], noise=z, sigma_max=SIGMA_MAX, reduce=reduce,
                   cps_logprob=cps_logprob)
    r64, r32 = ref_pair(v64, x64, sig, sig_next, kind, torch.float32, noise=z64, reduce=reduce, cps_logprob=cps_logprob)
    assert_close("log_prob", out.log_prob, r64["log_prob"], r32["log_prob"])


def test_scalar_and_tensor_sigmas_agree(backend):
    name, device = backend
    (v, x, _, z), _ = make((2, 4, 6, 6), torch.float32, device)
    a = sde_step(v, x, 0.5, 0.4, "flow", 0.7, noise=z)
    b = sde_step(v, x, torch.tensor([0.5, 0.5]), torch.tensor(0.4), "flow", 0.7, noise=z)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_on_policy_ratio_is_exactly_one(backend, dtype):
    """Re-evaluating a drawn sample with the same inputs gives the same log-prob bits."""
    name, device = backend
    (v, x, _, _), _ = make((3, 4, 7, 5), dtype, device)
    sig, sig_next = sigmas(3, device)
    for kind in ("flow", "dance", "cps"):
        drawn = sde_step(v, x, sig, sig_next, kind, NOISE_LEVEL[kind], seed=77, sigma_max=SIGMA_MAX)
        again = sde_step(v, x, sig, sig_next, kind, NOISE_LEVEL[kind], prev_sample=drawn.prev_sample, sigma_max=SIGMA_MAX)
        assert torch.equal(torch.exp(again.log_prob - drawn.log_prob), torch.ones_like(drawn.log_prob)), kind


def test_return_mean_false_skips_mean(backend):
    name, device = backend
    (v, x, _, _), _ = make((2, 3, 4, 4), torch.float32, device)
    out = sde_step(v, x, 0.5, 0.4, "flow", 0.7, seed=3, return_mean=False)
    assert out.mean is None and out.log_prob is not None

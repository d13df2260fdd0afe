"""The step kinds against the published research code and diffusers' Euler scheduler."""
import pytest
import torch

from flowsteer.ops import sde_step

from helpers import assert_close
from published import dance_grpo_step, flow_grpo_cps_step, flow_grpo_sde_step


def _inputs(device, shape=(3, 4, 9, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device) for _ in range(3)]


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.96), (0.6, 0.45), (0.05, 1e-3)])
def test_flow_matches_flow_grpo(backend, sigma, sigma_next):
    name, device = backend
    v, x, z = _inputs(device)
    sig = torch.full((3,), sigma, dtype=torch.float64)
    sig_next = torch.full((3,), sigma_next, dtype=torch.float64)
    b = (-1,) + (1,) * 3
    prev, lp, mean, std_dev_t = flow_grpo_sde_step(v.double().cpu(), x.double().cpu(), sig.reshape(b), sig_next.reshape(b),
                                                   0.7, 0.96, noise=z.double().cpu())
    out = sde_step(v, x, sigma, sigma_next, "flow", 0.7, noise=z, sigma_max=0.96, ref_v=v * 0.9)
    assert_close("prev_sample", out.prev_sample, prev)
    assert_close("mean", out.mean, mean)
    _, lp_eval, _, _ = flow_grpo_sde_step(v.double().cpu(), x.double().cpu(), sig.reshape(b), sig_next.reshape(b), 0.7, 0.96,
                                          prev_sample=out.prev_sample.double().cpu())
    assert_close("log_prob", out.log_prob, lp_eval)
    # Flow-GRPO's KL: mean((mean - ref_mean)^2) / (2 std_dev_t^2), std_dev_t without sqrt(dt).
    _, _, ref_mean, _ = flow_grpo_sde_step(v.double().cpu() * 0.9, x.double().cpu(), sig.reshape(b), sig_next.reshape(b),
                                           0.7, 0.96, noise=z.double().cpu())
    kl = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t.flatten() ** 2)
    assert_close("kl", out.kl, kl, ulps=256)


def test_cps_matches_flow_grpo(backend):
    name, device = backend
    v, x, z = _inputs(device, seed=1)
    sigma, sigma_next = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.45, dtype=torch.float64)
    prev, _, mean = flow_grpo_cps_step(v.double().cpu(), x.double().cpu(), sigma, sigma_next, 0.8, noise=z.double().cpu())
    out = sde_step(v, x, 0.6, 0.45, "cps", 0.8, noise=z, cps_logprob="flow_grpo")
    assert_close("prev_sample", out.prev_sample, prev)
    assert_close("mean", out.mean, mean)
    _, lp, _ = flow_grpo_cps_step(v.double().cpu(), x.double().cpu(), sigma, sigma_next, 0.8,
                                  prev_sample=out.prev_sample.double().cpu())
    assert_close("log_prob", out.log_prob, lp)


def test_dance_matches_dance_grpo(backend):
    name, device = backend
    v, x, z = _inputs(device, seed=2)
    sigma, sigma_next = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.62, dtype=torch.float64)
    prev, _, mean = dance_grpo_step(v.double().cpu(), x.double().cpu(), 0.3, sigma, sigma_next, noise=z.double().cpu())
    out = sde_step(v, x, 0.7, 0.62, "dance", 0.3, noise=z)
    assert_close("prev_sample", out.prev_sample, prev)
    assert_close("mean", out.mean, mean)
    # DanceGRPO takes its log-prob in fp32: compare at fp32 rounding of the per-element terms.
    _, lp, _ = dance_grpo_step(v.double().cpu(), x.double().cpu(), 0.3, sigma, sigma_next,
                               prev_sample=out.prev_sample.double().cpu())
    assert_close("log_prob", out.log_prob, lp.double(), ulps=64)


@pytest.mark.parametrize("kind", ["ode", "flow", "dance", "cps"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_level_zero_is_diffusers_euler(backend, kind, shift):
    """noise_level = 0 reproduces FlowMatchEulerDiscreteScheduler.step at every step of its schedule."""
    diffusers = pytest.importorskip("diffusers")
    name, device = backend
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(6)
    sigmas = sched.sigmas.tolist()
    v_all = _inputs(device, shape=(2, 4, 6, 5), seed=3)
    x = v_all[2]
    for i, t in enumerate(sched.timesteps):
        v = v_all[i % 2] * 0.5
        want = sched.step(v.cpu(), t, x.cpu()).prev_sample
        got = sde_step(v, x, sigmas[i], sigmas[i + 1], kind, 0.0).prev_sample
        assert_close(f"step {i}", got, want.double(), ulps=4)
        x = got

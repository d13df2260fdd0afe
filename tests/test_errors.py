"""Bad input gets an error that names the argument."""
import numpy as np
import pytest
import torch

import flowsteer
from flowsteer.ops import (group_advantages, grpo_loss, guidance_coefficient, pareto_mask, philox_normal, sde_kl,
                           sde_step, win_rate)


def _vx(shape=(2, 3, 4, 4), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.randn(2, 3, 4, 5)), "x must have the shape of v"),
        (dict(x=torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)), "x must have the dtype of v"),
        (dict(noise=torch.randn(2, 3, 4, 5)), "noise must have the shape of v"),
        (dict(prev_sample=torch.randn(2, 3, 4, 4).half()), "prev_sample must have the dtype of v"),
        (dict(x=torch.randn(2, 3, 4, 8)[..., ::2]), "x must be contiguous"),
        (dict(ref_v=torch.randn(2, 4, 4, 3).permute(0, 3, 1, 2)), "ref_v must be contiguous"),
        (dict(sigma=0.4, sigma_next=0.5), r"sigma_next must be in \[0, sigma\)"),
        (dict(sigma=0.5, sigma_next=0.5), r"sigma_next must be in \[0, sigma\)"),
        (dict(sigma=1.2, sigma_next=0.5), r"sigma must be in \(0, 1\]"),
        (dict(sigma=0.0, sigma_next=0.0), r"sigma must be in \(0, 1\]"),
        (dict(sigma=torch.tensor([0.5, 1.5])), r"sigma must be in \(0, 1\] \(got sigma\[1\]=1.5"),
        (dict(sigma=torch.tensor([0.5, 0.5]), sigma_next=torch.tensor([0.4, 0.6])), r"sigma_next\[1\]=0.6"),
        (dict(sigma=torch.tensor([0.5, 0.5, 0.5])), r"sigma must be a float, a 0-d tensor or a \[B\]"),
        (dict(sigma=1.0, sigma_next=0.9), "needs sigma_max"),
        (dict(kind="euler"), "kind must be one of"),
        (dict(reduce="max"), "reduce must be one of"),
        (dict(noise_level=-0.1), "noise_level must be a finite float >= 0"),
        (dict(seed=-1), r"seed must be an int in \[0, 2\*\*63\)"),
        (dict(seed=3, noise=torch.randn(2, 3, 4, 4)), "either noise or seed"),
        (dict(kind="ode", noise_level=0.0, ref_v=torch.randn(2, 3, 4, 4)), "ref_v .* needs a stochastic step"),
        (dict(guidance_norm="l1", guidance=torch.randn(2, 3, 4, 4)), "guidance_norm must be one of"),
        (dict(kind="cps", noise_level=1.5), r"noise_level must be in \[0, 1\] for kind='cps'"),
    ],
)
def test_sde_step_errors(kwargs, match):
    v, x = _vx()
    args = dict(v=v, x=x, sigma=0.5, sigma_next=0.4, kind="flow", noise_level=0.7)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        sde_step(**args)


def test_sde_step_rejects_integer_and_1d():
    with pytest.raises(TypeError, match="v must be one of"):
        sde_step(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32), 0.5, 0.4)
    with pytest.raises(ValueError, match=r"v must have at least 2 dims"):
        sde_step(torch.ones(3), torch.ones(3), 0.5, 0.4)


@pytest.mark.parametrize(
    "rewards,ids,kwargs,match",
    [
        (torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0, 0, 1]), {}, "rewards must be finite .*index \\(1,\\)"),
        (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0, 0]), {}, r"group_ids must be \[N\] = \[3\]"),
        (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), {}, "group_ids must be an integer tensor"),
        (torch.tensor([]), torch.tensor([], dtype=torch.long), {}, "at least one sample"),
        (torch.ones(4, 2), torch.zeros(4, dtype=torch.long), dict(weights=[1.0]), r"weights must have one entry per reward column"),
        (torch.ones(4), torch.zeros(4, dtype=torch.long), dict(std="batch"), "std must be one of"),
        (torch.ones(4), torch.zeros(4, dtype=torch.long), dict(mode="max"), "mode must be one of"),
        (torch.ones(4), torch.zeros(4, dtype=torch.long), dict(batch_norm=True), "batch_norm applies to mode='per_reward'"),
        (-torch.ones(4, 2) * 2, torch.zeros(4, dtype=torch.long), dict(mode="log_tamed"), "rewards must be > -1"),
        (torch.ones(4), torch.zeros(4, dtype=torch.long), dict(clip=-1.0), "clip must be a float > 0 or None"),
    ],
)
def test_group_advantages_errors(rewards, ids, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        group_advantages(rewards, ids, **kwargs)


def test_other_errors():
    with pytest.raises(ValueError, match=r"prefs must be \[G, G\] or \[M, G, G\]"):
        win_rate(torch.ones(2, 3))
    with pytest.raises(ValueError, match="prefs must hold outcomes in"):
        win_rate(torch.full((3, 3), 2.0))
    with pytest.raises(ValueError, match="advantages must have the shape of log_prob"):
        grpo_loss(torch.zeros(4), torch.zeros(4), torch.zeros(3))


# --------------------------------------------------------------------------------------------
# One check per argument: the same input gets the same error on every backend, raised by the
# public function before dispatch (the reproductions of the hardening issue, one line each).

_B4 = torch.zeros(4)
_IDS4 = torch.zeros(4, dtype=torch.long)
_NAN = float("nan")


def _step(shape=(2, 3, 4, 4), **kw):
    return sde_step(torch.randn(shape), torch.randn(shape), 0.5, 0.4, **kw)


SAME_ERROR_EVERYWHERE = [
    # An empty batch (B = 0) and zero elements per sample: a ValueError on every backend.
    ("sde_step B=0", lambda: _step((0, 3, 4, 4)), r"v must hold at least one sample, B >= 1 \(got shape \(0, 3, 4, 4\)"),
    ("sde_step B=0 ode", lambda: _step((0, 3), kind="ode", noise_level=0.0), r"v must hold at least one sample"),
    ("sde_step 0 elements", lambda: _step((2, 0)), r"v must have at least one element per sample \(got shape \(2, 0\)"),
    ("sde_step 0 elements eval", lambda: sde_step(torch.ones(2, 0), torch.ones(2, 0), 0.5, 0.4,
                                                  prev_sample=torch.ones(2, 0)), "v must have at least one element"),
    ("guidance_coefficient B=0", lambda: guidance_coefficient(torch.ones(0, 3), 0.5, 0.4), "guidance must hold at least one sample"),
    ("sde_kl B=0", lambda: sde_kl(torch.ones(0, 3), torch.ones(0, 3), 1.0), "mean must hold at least one sample"),
    ("win_rate M=0", lambda: win_rate(torch.empty(0, 3, 3)), r"prefs must hold at least one group, M >= 1"),
    ("group_advantages N=0", lambda: group_advantages(torch.empty(0), torch.empty(0, dtype=torch.long)), "rewards must hold at least one sample, N >= 1"),
    ("group_advantages K=0", lambda: group_advantages(torch.empty(4, 0), _IDS4), "rewards must have at least one element per sample"),
    ("group_advantages K=0 per_reward", lambda: group_advantages(torch.empty(4, 0), _IDS4, mode="per_reward"), "rewards must have at least one element"),
    ("pareto_mask N=0", lambda: pareto_mask(torch.empty(0, 2), torch.empty(0, dtype=torch.long)), "rewards must hold at least one sample"),
    ("pareto_mask K=0", lambda: pareto_mask(torch.empty(4, 0), _IDS4), "rewards must have at least one element per sample"),
    ("grpo_loss B=0", lambda: grpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0)), r"log_prob must hold at least one sample, B >= 1"),
    # Seeds: the check sample uses (a bool is no seed).
    ("sde_step seed=True", lambda: _step(seed=True), r"seed must be an int in \[0, 2\*\*63\) \(got True\)"),
    ("sde_step seed=np.True_", lambda: _step(seed=np.bool_(True)), r"seed must be an int in \[0, 2\*\*63\)"),
    ("sde_step seed=bool tensor", lambda: _step(seed=torch.tensor(True)), r"seed must be an int in \[0, 2\*\*63\)"),
    ("sde_step seed=[3] tensor", lambda: _step(seed=torch.tensor([3])), r"seed must be an int in \[0, 2\*\*63\)"),
    ("sde_step seed=3.0", lambda: _step(seed=3.0), r"seed must be an int in \[0, 2\*\*63\)"),
    ("sde_step seed=2**63", lambda: _step(seed=np.uint64(2**63)), r"seed must be an int in \[0, 2\*\*63\)"),
    ("sde_step offset=True", lambda: _step(seed=1, offset=True), r"offset must be an int in \[0, 2\*\*63\)"),
    ("philox_normal seed=True", lambda: philox_normal((4,), True), r"seed must be an int in \[0, 2\*\*63\)"),
    # noise_level: finite, in [0, 10]; guidance_scale: finite.
    ("noise_level=1e30", lambda: _step(noise_level=1e30), r"noise_level must be a finite float >= 0 and <= 10 \(got 1e\+30\)"),
    ("noise_level=inf", lambda: _step(noise_level=float("inf")), r"noise_level must be a finite float >= 0 and <= 10"),
    ("noise_level=10.5 ode", lambda: _step(kind="ode", noise_level=10.5), r"noise_level must be a finite float >= 0 and <= 10"),
    ("noise_level=True", lambda: _step(noise_level=True), r"noise_level must be a finite float"),
    ("guidance_scale=nan", lambda: _step(guidance=torch.randn(2, 3, 4, 4), guidance_scale=_NAN), r"guidance_scale must be a finite float .*\(got nan\)"),
    ("guidance_scale=inf", lambda: _step(guidance=torch.randn(2, 3, 4, 4), guidance_scale=float("inf")), "guidance_scale must be a finite float"),
    ("guidance_scale=nan unused", lambda: _step(guidance_scale=_NAN), "guidance_scale must be a finite float"),
    ("guidance_scale=[3 entries]", lambda: _step(guidance=torch.randn(2, 3, 4, 4), guidance_scale=torch.ones(3)),
     r"guidance_scale must be a float or a float tensor of shape \(\) or \[B\] = \[2\]"),
    ("guidance_coefficient scale=nan", lambda: guidance_coefficient(torch.ones(2, 3), 0.5, 0.4, _NAN), "guidance_scale must be a finite float"),
    # grpo_loss: kl shaped like log_prob; beta finite and >= 0.
    ("grpo_loss kl=[1]", lambda: grpo_loss(_B4, _B4, _B4, kl=torch.zeros(1), beta=0.1), r"kl must have the shape of log_prob \(4,\) \(got \(1,\)\)"),
    ("grpo_loss kl=[8]", lambda: grpo_loss(_B4, _B4, _B4, kl=torch.zeros(8), beta=0.1), r"kl must have the shape of log_prob \(4,\) \(got \(8,\)\)"),
    ("grpo_loss kl=[4, 4]", lambda: grpo_loss(_B4, _B4, _B4, kl=torch.zeros(4, 4), beta=0.1), r"kl must have the shape of log_prob \(4,\) \(got \(4, 4\)\)"),
    ("grpo_loss beta=nan", lambda: grpo_loss(_B4, _B4, _B4, kl=_B4, beta=_NAN), r"beta must be a finite float >= 0 \(got nan\)"),
    ("grpo_loss beta=-1", lambda: grpo_loss(_B4, _B4, _B4, kl=_B4, beta=-1.0), r"beta must be a finite float >= 0 \(got -1.0\)"),
    ("grpo_loss beta=inf", lambda: grpo_loss(_B4, _B4, _B4, kl=_B4, beta=float("inf")), "beta must be a finite float >= 0"),
    ("grpo_loss beta=nan tensor", lambda: grpo_loss(_B4, _B4, _B4, kl=_B4, beta=torch.tensor(_NAN)), "beta must be a finite float >= 0"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in SAME_ERROR_EVERYWHERE], ids=[c[0] for c in SAME_ERROR_EVERYWHERE])
def test_same_error_on_every_backend(backend, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_seed_accepts_what_sample_accepts(backend):
    """numpy integers and 0-d integer tensors are seeds for sde_step, as for sample, with the same bits."""
    _, device = backend
    v, x = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(i)).to(device) for i in (0, 1))
    want = sde_step(v, x, 0.5, 0.4, seed=3, offset=2)
    for seed, offset in ((np.int64(3), np.int32(2)), (np.uint64(3), 2), (torch.tensor(3), torch.tensor(2, dtype=torch.int32))):
        got = sde_step(v, x, 0.5, 0.4, seed=seed, offset=offset)
        assert torch.equal(got.prev_sample, want.prev_sample) and torch.equal(got.log_prob, want.log_prob)
    assert torch.equal(philox_normal((5,), np.int64(3), np.int64(2)), philox_normal((5,), 3, 2))


def test_largest_noise_level_is_finite(backend):
    """noise_level = 10, the bound, still gives finite outputs for ordinary latents."""
    _, device = backend
    v, x = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(i)).to(device) for i in (0, 1))
    for kind in ("flow", "dance"):
        out = sde_step(v, x, 0.9, 0.8, kind, 10.0, seed=1)
        assert all(bool(torch.isfinite(t).all()) for t in (out.prev_sample, out.log_prob, out.mean, out.std))


def test_grpo_loss_accepts_matching_kl_and_tensor_beta():
    lp = torch.tensor([0.1, -0.2, 0.0, 0.3])
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss, _ = grpo_loss(lp, lp, torch.zeros(4), kl=kl, beta=0.5)
    assert torch.allclose(loss, torch.tensor(1.25))
    assert torch.equal(grpo_loss(lp, lp, torch.zeros(4), kl=kl, beta=torch.tensor(0.5))[0], loss)
    assert torch.equal(grpo_loss(lp, lp, torch.zeros(4), kl=kl, beta=0)[0], torch.tensor(0.0))


def test_registered_op_refuses_an_empty_batch_on_every_backend(backend):
    """Calling the registered op directly skips the public checks; the launcher's backstop still
    refuses an empty batch alike on every backend (no null pointer reaches a kernel)."""
    _, device = backend
    empty = torch.empty(0, 4, device=device)
    with pytest.raises(ValueError, match=r"sde_step: x must hold at least one sample"):
        torch.ops.flowsteer.sde_step(empty, empty, torch.empty(0, device=device), torch.empty(0, device=device),
                                     None, None, None, None, None, [1, 0, 0, 0, 0, 1, 0, 1, 1], [0.7, 0.0])
    with pytest.raises(ValueError, match=r"win_rate: prefs must hold at least one sample"):
        torch.ops.flowsteer.win_rate(torch.empty(0, 3, 3, device=device))


def test_sample_shares_the_seed_check():
    """sample and sde_step take their seed through one check: the same types, the same refusals."""
    shape = (2, 3)

    def run(seed):
        return flowsteer.sample(lambda x, sigma, cond: x - cond, ["a"], num_steps=2, latent_shape=shape,
                                cond=torch.zeros(1, *shape), decode=False, seed=seed)

    want = run(3).final_latents
    for seed in (np.int64(3), torch.tensor(3)):
        assert torch.equal(run(seed).final_latents, want)
    for bad in (True, np.bool_(True), torch.tensor(True), torch.tensor([3]), 3.0, -1, 2**63 - 1):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63 - 1\)"):
            run(bad)


def test_grpo_loss_refuses_beta_without_kl():
    lp = torch.zeros(4)
    with pytest.raises(ValueError, match="beta = 0.1 weights a KL term, but kl is None"):
        grpo_loss(lp, lp, torch.ones(4), beta=0.1)
    grpo_loss(lp, lp, torch.ones(4), beta=0.0)

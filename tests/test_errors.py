"""Bad input gets an error that names the argument."""
import pytest
import torch

from flowsteer.ops import group_advantages, grpo_loss, sde_step, win_rate


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

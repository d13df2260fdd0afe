"""flowsteer.sample with a bare velocity function: windows, branch mode, reproducibility, the
on-policy ratio, guidance, and bad input."""
import math

import numpy as np
import pytest
import torch

import flowsteer
from flowsteer.ops import sde_step
from flowsteer.sampler import Branch, ProgressiveWindow, RandomWindow, evaluate, shifted_sigmas

SHAPE = (4, 6, 5)
TARGETS = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))


def velocity(x, sigma, cond):
    """The exact velocity towards a point mass at cond: v = (x - x0) / sigma."""
    return (x - cond) / sigma.view(-1, *([1] * (x.ndim - 1))).clamp_min(1e-3)


def run(**kw):
    args = dict(group_size=4, num_steps=6, latent_shape=SHAPE, cond=TARGETS, decode=False, seed=3)
    args.update(kw)
    return flowsteer.sample(velocity, ["a", "b", "c"], **args)


def test_ode_matches_a_plain_euler_loop():
    r = run(kind="ode", noise_level=0.0, shift=3.0)
    sigmas = shifted_sigmas(6, 3.0)
    x = torch.randn((12,) + SHAPE, generator=torch.Generator().manual_seed(3))
    cond = TARGETS.repeat_interleave(4, 0)
    for i in range(6):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, torch.full((12,), sigmas[i]), cond)
    assert torch.allclose(r.final_latents, x, atol=1e-6, rtol=1e-6)
    assert r.steps == [] and r.log_probs.shape == (12, 0)


@pytest.mark.parametrize("kind,noise_level", [("flow", 0.7), ("dance", 0.5), ("cps", 0.6)])
def test_rollout_shapes_and_on_policy_ratio(kind, noise_level):
    r = run(kind=kind, noise_level=noise_level)
    T = len(r.steps)
    assert r.latents.shape == (12, T) + SHAPE and r.next_latents.shape == (12, T) + SHAPE
    assert r.log_probs.shape == (12, T) and torch.isfinite(r.log_probs).all()
    assert r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r.prompts[:5] == ["a"] * 4 + ["b"]
    if kind == "cps":
        assert 5 not in r.steps  # the step onto sigma = 0 has std 0: run as ODE, not trained
    for j in range(T):
        lp, _ = evaluate(r, j)
        assert float((torch.exp(lp - r.log_probs[:, j]) - 1).abs().max()) < 1e-6


def test_consecutive_steps_share_one_trajectory():
    """latents and next_latents are views of one [N, S + 1] trajectory: S + 1 slots, not 2S."""
    for window in ["all", RandomWindow(3), Branch(2)]:
        r = run(window=window)
        S = len(r.steps)
        assert r.latents.untyped_storage().data_ptr() == r.next_latents.untyped_storage().data_ptr()
        assert r.latents.untyped_storage().nbytes() == 12 * (S + 1) * r.latents[0, 0].numel() * 4
        assert torch.equal(r.next_latents[:, :-1], r.latents[:, 1:])
        if r.steps[-1] == 5:
            assert torch.equal(r.next_latents[:, -1], r.final_latents)
    # Steps that are not consecutive (a custom window) are stored apart.

    class EveryOther(flowsteer.sampler.SDEWindow):
        def plan(self, num_steps, iteration, generator):
            return flowsteer.sampler.WindowPlan([i % 2 == 0 for i in range(num_steps)])

    r = run(window=EveryOther())
    assert r.steps == [0, 2, 4] and r.latents.shape == r.next_latents.shape == (12, 3) + SHAPE
    assert r.latents.untyped_storage().data_ptr() != r.next_latents.untyped_storage().data_ptr()
    for j in range(3):
        lp, _ = evaluate(r, j)
        assert torch.equal(lp, r.log_probs[:, j])

    class BadBranch(flowsteer.sampler.SDEWindow):
        def plan(self, num_steps, iteration, generator):
            return flowsteer.sampler.WindowPlan([True] * num_steps, branch_at=2)

    with pytest.raises(ValueError, match="before its branch step 2 must be deterministic"):
        run(window=BadBranch())


def test_same_seed_same_rollout_and_seed_matters():
    a, b, c = run(), run(), run(seed=4)
    assert torch.equal(a.final_latents, b.final_latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.final_latents, c.final_latents)


def test_same_noise_shares_initial_latents_per_group():
    r = run(same_noise=True)
    x0 = r.latents[:, 0]
    assert torch.equal(x0[0], x0[3]) and not torch.equal(x0[0], x0[4])
    assert not torch.equal(r.final_latents[0], r.final_latents[1])  # the SDE noise is not shared


def test_rows_equal_within_groups_run_the_model_once_per_prompt():
    """Branch mode and same_noise: the model runs on one row per prompt until the first stochastic
    step, that step included (its velocity is the same for the group; its noise is not)."""
    calls = []

    def counting(x, sigma, cond):
        calls.append(x.shape[0])
        return velocity(x, sigma, cond)

    def go(**kw):
        calls.clear()
        args = dict(group_size=4, num_steps=6, latent_shape=SHAPE, cond=TARGETS, decode=False, seed=3)
        return flowsteer.sample(counting, ["a", "b", "c"], **dict(args, **kw))

    go(window=Branch(3))
    assert calls == [3] * 4 + [12] * 2
    r = go(same_noise=True)
    assert calls == [3] + [12] * 5 and r.latents.shape[0] == 12
    assert torch.equal(r.latents[0, 0], r.latents[3, 0]) and not torch.equal(r.next_latents[0, 0], r.next_latents[1, 0])
    for j in range(len(r.steps)):
        lp, _ = evaluate(r, j)
        assert float((lp - r.log_probs[:, j]).abs().max()) == 0.0
    r = go(same_noise=True, window=RandomWindow(2))
    assert calls == [3] * (r.steps[0] + 1) + [12] * (5 - r.steps[0])
    # No stochastic step: the whole rollout runs once per prompt, expanded at the end; the same as
    # the Euler loop over the 12 rows.
    r = go(same_noise=True, kind="ode", noise_level=0.0, shift=3.0)
    assert calls == [3] * 6 and r.final_latents.shape == (12,) + SHAPE
    sigmas = shifted_sigmas(6, 3.0)
    x = torch.randn((3,) + SHAPE, generator=torch.Generator().manual_seed(3)).repeat_interleave(4, 0)
    cond = TARGETS.repeat_interleave(4, 0)
    for i in range(6):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, torch.full((12,), sigmas[i]), cond)
    assert torch.allclose(r.final_latents, x, atol=1e-6, rtol=1e-6)


def test_branch_mode_shares_the_prefix():
    r = run(window=Branch(3))
    assert r.steps == [3, 4, 5]
    x = r.latents[:, 0].reshape(3, 4, *SHAPE)
    assert torch.equal(x[:, :1].expand_as(x), x)  # identical up to the branch step
    nxt = r.next_latents[:, 0].reshape(3, 4, *SHAPE)
    assert not torch.equal(nxt[:, 0], nxt[:, 1])  # and different after it
    lp, _ = evaluate(r, 0)
    assert float((lp - r.log_probs[:, 0]).abs().max()) == 0.0


def test_random_and_progressive_windows():
    r = run(window=RandomWindow(2))
    assert len(r.steps) == 2 and r.steps[1] == r.steps[0] + 1
    assert run(window=RandomWindow(2)).steps == r.steps  # drawn from the seed
    starts = [run(window=ProgressiveWindow(2, stride=1, every=2), iteration=it).steps[0] for it in (0, 2, 4, 100)]
    assert starts == [0, 1, 2, 4]


def test_reward_guidance_is_fused_into_the_step():
    grad = torch.randn((12,) + SHAPE, generator=torch.Generator().manual_seed(9))
    seen = []

    def reward_grad(x, sigma, prompt_index):
        seen.append((sigma, prompt_index.tolist()))
        return grad

    r = run(reward_grad=reward_grad, reward_guidance_scale=0.3, window=Branch(4))
    assert len(seen) == 2 and seen[0][1] == [0] * 4 + [1] * 4 + [2] * 4
    # The stored step is the guided sample; its log-prob is under the unguided mean.
    x, i = r.latents[:, 0].contiguous(), r.steps[0]
    v = velocity(x, torch.full((12,), r.sigmas[i]), TARGETS.repeat_interleave(4, 0))
    want = sde_step(v, x, r.sigmas[i], r.sigmas[i + 1], "flow", 0.7, seed=3, offset=i, guidance=grad,
                    guidance_scale=0.3, guidance_norm="batch", scale_by_dt=True, sigma_max=r.sigmas[1])
    assert torch.equal(want.prev_sample, r.next_latents[:, 0]) and torch.equal(want.log_prob, r.log_probs[:, 0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(group_size=0), "group_size must be an int >= 1"),
        (dict(window=RandomWindow(7)), r"window size must be in \[1, num_steps\]"),
        (dict(window=Branch(6)), r"branch step must be in \[0, num_steps\)"),
        (dict(window=Branch(2), group_size=1), "branch mode needs group_size >= 2"),
        (dict(window="some"), "window must be 'all' or an SDEWindow"),
        (dict(cond=TARGETS[:2]), "cond has 2 rows for 3 prompts"),
        (dict(num_steps=0), "num_steps must be an int >= 1"),
        (dict(reward_grad=lambda x, s, p: x[:, :1]), "reward_grad returned .* it must return a tensor of the same shape"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run(**kwargs)


def test_prompts_per_image():
    """A per-image prompt list (each prompt repeated group_size times) gives the same rollout."""
    want = run()
    per_image = [p for p in ["a", "b", "c"] for _ in range(4)]
    args = dict(group_size=4, num_steps=6, latent_shape=SHAPE, cond=TARGETS, decode=False, seed=3)
    got = flowsteer.sample(velocity, per_image, prompts_per_image=True, **args)
    assert got.prompts == per_image and torch.equal(got.group_ids, want.group_ids)
    assert torch.equal(got.final_latents, want.final_latents) and torch.equal(got.log_probs, want.log_probs)
    with pytest.raises(ValueError, match="11 prompts do not split into groups of group_size=4"):
        flowsteer.sample(velocity, per_image[:11], prompts_per_image=True, **args)
    shuffled = per_image[:3] + ["b"] + per_image[4:]
    with pytest.raises(ValueError, match=r"prompts\[0:4\] are not one prompt repeated group_size=4 times"):
        flowsteer.sample(velocity, shuffled, prompts_per_image=True, **args)


@pytest.mark.parametrize("window", ["all", Branch(3)])
def test_max_batch_size_chunks_the_model_calls(window):
    calls = []

    def counting(x, sigma, cond):
        calls.append(x.shape[0])
        return velocity(x, sigma, cond)

    def go(**kw):
        args = dict(group_size=4, num_steps=6, latent_shape=SHAPE, cond=TARGETS, decode=False, seed=3, window=window)
        return flowsteer.sample(counting, ["a", "b", "c"], **args, **kw)

    want = go()
    calls.clear()
    got = go(max_batch_size=5)
    # 12 rows in chunks of 5, 5, 2 (up to a branch at step 3, that step included: the 3 prompts' rows, one chunk).
    assert calls == ([3] * 4 + [5, 5, 2] * 2 if isinstance(window, Branch) else [5, 5, 2] * 6)
    assert torch.equal(got.final_latents, want.final_latents) and torch.equal(got.log_probs, want.log_probs)
    with pytest.raises(ValueError, match="max_batch_size must be None or an int >= 1"):
        go(max_batch_size=0)


def test_bad_prompts_and_models():
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        flowsteer.sample(velocity, "a cat", latent_shape=SHAPE)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        flowsteer.sample(velocity, [], latent_shape=SHAPE)

    class FakePipeline:
        transformer = None
        scheduler = None

    with pytest.raises(TypeError, match="unsupported pipeline FakePipeline"):
        flowsteer.sample(FakePipeline(), ["a"])
    with pytest.raises(ValueError, match="needs latent_shape"):
        flowsteer.sample(velocity, ["a"], latent_shape=())


def test_no_host_sync_inside_the_step_loop():
    """No .item(), bool() or other tensor-to-host read between the first and last model call:
    every aten._local_scalar_dense (what a device sync would be on a GPU) is recorded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    events = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                events.append("sync")
            return func(*args, **(kwargs or {}))

    def recording_velocity(x, sigma, cond):
        events.append("model")
        return velocity(x, sigma, cond)

    guidance = torch.randn((12,) + SHAPE)
    with Record():
        flowsteer.sample(recording_velocity, ["a", "b", "c"], group_size=4, num_steps=6, latent_shape=SHAPE,
                         cond=TARGETS, decode=False, seed=3, window=Branch(2),
                         reward_grad=lambda x, s, p: guidance[: x.shape[0]])
    first, last = events.index("model"), len(events) - 1 - events[::-1].index("model")
    assert events.count("model") == 6
    assert "sync" not in events[first:last], events


@pytest.mark.parametrize("extra", [{}, dict(logprob_mean="guided")])
def test_evaluate_with_one_step_per_sample(extra):
    """Trainers that shuffle each sample's steps (DDPO, DanceGRPO) evaluate a batch whose rows sit
    at different steps: one call with per-row timesteps and sigmas gives each row what evaluating
    its own step gives it, the KL term included."""
    grad = torch.randn((12,) + SHAPE, generator=torch.Generator().manual_seed(9))
    kw = dict(reward_grad=lambda x, s, p: grad, reward_guidance_norm="sample", **extra)
    r = run(**kw)
    S = len(r.steps)
    j = torch.randint(0, S, (12,), generator=torch.Generator().manual_seed(1))
    assert len(set(j.tolist())) > 2
    other = lambda x, sigma, cond: 0.9 * velocity(x, sigma, cond)  # noqa: E731 (a reference model)
    ref = flowsteer.sampler.CallableAdapter(other, SHAPE, cond=TARGETS)
    lp, kl = evaluate(r, j, ref_model=ref)
    per_step = [evaluate(r, k, ref_model=ref) for k in range(S)]
    for row in range(12):
        k = int(j[row])
        assert torch.equal(lp[row], per_step[k][0][row]) and torch.equal(kl[row], per_step[k][1][row])
        assert torch.equal(lp[row], r.log_probs[row, k])
    # A subset of the samples, steps as a list.
    for one in (torch.tensor(2), np.int64(2)):  # a 0-d integer is one step for all
        assert torch.equal(evaluate(r, one)[0], per_step[2][0])
    lp_sub, _ = evaluate(r, [0, S - 1, 1], [5, 0, 11])
    assert torch.equal(lp_sub, torch.stack([r.log_probs[5, 0], r.log_probs[0, S - 1], r.log_probs[11, 1]]))


def test_evaluate_step_errors():
    r = run()
    for bad, match in [(6, r"in \[0, 6\)"), ([0, 1], "one int per sample \\(12"), (torch.zeros(12), "float32"),
                       (torch.full((12,), 6), r"every entry must index rollout.steps, in \[0, 6\)"),
                       ("a", "step must be an int or one int per sample")]:
        with pytest.raises(ValueError, match=match):
            evaluate(r, bad)


@pytest.mark.parametrize("window", [RandomWindow(2), Branch(3)])
def test_shared_prefix_with_chunks_and_guidance(window):
    """same_noise or branch mode (rows shared per prompt first), chunked model calls and fused
    guidance together: the same rollout as without chunks, and evaluate reproduces it."""
    grad = torch.randn((12,) + SHAPE, generator=torch.Generator().manual_seed(9))
    kw = dict(same_noise=True, window=window, reward_grad=lambda x, s, p: grad[: x.shape[0]], logprob_mean="guided")
    want, got = run(**kw), run(max_batch_size=5, **kw)
    assert torch.equal(got.final_latents, want.final_latents) and torch.equal(got.log_probs, want.log_probs)
    assert torch.equal(got.latents[0, 0], got.latents[3, 0])  # one start per group
    for j in range(len(got.steps)):
        assert torch.equal(evaluate(got, j)[0], got.log_probs[:, j])


def test_compile_a_velocity_function():
    """compile=True with a bare velocity function: torch.compile'd, the same rollout to rounding."""
    want, got = run(), run(compile=True)
    assert torch.allclose(got.final_latents, want.final_latents, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)


def test_guided_log_probs_re_evaluate_on_minibatches():
    """The guided mean's batch norm is the whole step's: evaluate on any subset of the rows, or
    with one step per sample, rebuilds it from the coefficients kept at sampling."""
    grad = torch.randn((12,) + SHAPE, generator=torch.Generator().manual_seed(9))
    r = run(reward_grad=lambda x, s, p: grad, reward_guidance_norm="batch", reward_guidance_scale=0.5,
            logprob_mean="guided")
    assert r.guidance_coef.shape == (12, len(r.steps))
    for rows in ([0, 1, 2, 3], [11], list(range(12))):
        for j in range(len(r.steps)):
            assert torch.equal(evaluate(r, j, rows)[0], r.log_probs[rows, j])
    steps = torch.arange(12) % len(r.steps)
    assert torch.equal(evaluate(r, steps)[0], r.log_probs[torch.arange(12), steps])


def test_one_step_rollouts():
    """num_steps = 1: Flow-GRPO's sigma~ at sigma = 1 is sigmas[1] = 0, so its std is a."""
    for kind in ("flow", "dance"):
        r = run(num_steps=1, kind=kind)
        assert r.steps == [0] and torch.isfinite(r.log_probs).all()
        assert torch.equal(evaluate(r, 0)[0], r.log_probs[:, 0])


def test_sample_and_evaluate_argument_errors():
    with pytest.raises(ValueError, match="noise_level must be a finite float >= 0"):
        run(noise_level=-0.7)
    with pytest.raises(ValueError, match="noise_level must be a finite float >= 0"):
        run(noise_level=float("nan"))
    with pytest.raises(ValueError, match="kind"):
        run(kind="flwo", noise_level=0.0)
    with pytest.raises(ValueError, match="reward_guidance_norm"):
        run(reward_guidance_norm="global")
    for bad in (-1, 1.5, "3", True, 2**63):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63 - 1\)"):
            run(seed=bad)
    with pytest.raises(ValueError, match="noise_level must be in \\[0, 1\\] for kind='cps'"):
        run(kind="cps", noise_level=1.5)
    assert torch.equal(run(seed=np.int64(3)).final_latents, run(seed=3).final_latents)
    with pytest.raises(ValueError, match="cannot decode"):
        flowsteer.sample(velocity, ["a"], latent_shape=SHAPE, cond=TARGETS[:1])
    r = run()
    with pytest.raises(ValueError, match="step must be an int or one int per sample"):
        evaluate(r, True)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[4, 7, 9]] = True
    assert torch.equal(evaluate(r, 0, mask)[0], r.log_probs[[4, 7, 9], 0])  # a bool mask selects those rows
    for bad, match in [([4.9, 7.2], "1-D list or tensor of sample indices"), ([], "at least one sample"),
                       ([12], r"in \[0, 12\)"), (torch.ones(3, dtype=torch.bool), "bool mask must be"),
                       ([[0, 1]], "1-D list")]:
        with pytest.raises(ValueError, match=match):
            evaluate(r, 0, bad)
    # A model whose schedule is not the rollout's (another shift) would evaluate at the wrong sigmas.
    r3 = run(shift=3.0)
    with pytest.raises(ValueError, match="model: its schedule"):
        evaluate(r3, 0, model=flowsteer.sampler.CallableAdapter(velocity, SHAPE, cond=TARGETS))
    with pytest.raises(ValueError, match="ref_model: its schedule"):
        evaluate(r3, 0, ref_model=flowsteer.sampler.CallableAdapter(velocity, SHAPE, cond=TARGETS))
    lp, _ = evaluate(r3, 0, model=flowsteer.sampler.CallableAdapter(velocity, SHAPE, cond=TARGETS, shift=3.0))
    assert torch.equal(lp, r3.log_probs[:, 0])


def test_evaluate_with_a_velocity_function_reference_and_prm_fit_on_a_rollout():
    """Two gaps a demo prototype hit: a bare velocity function as ref_model (it needs the rollout's
    latent shape), and LatentPRM.fit given a Rollout (latents [N, S, ...], sigmas of the schedule)."""
    from flowsteer.rewards import LatentPRM

    def policy(x, sigma, cond):
        return 0.5 * x

    def frozen(x, sigma, cond):
        return 0.4 * x

    r = flowsteer.sample(policy, ["a", "b"], group_size=2, num_steps=4, decode=False, latent_shape=(4, 8, 8), seed=3)
    lp, kl = flowsteer.evaluate(r, 1, ref_model=frozen)
    assert lp.shape == (4,) and kl.shape == (4,) and bool((kl > 0).all())
    _, kl_self = flowsteer.evaluate(r, 1, ref_model=policy)
    assert torch.equal(kl_self, torch.zeros(4))
    prm = LatentPRM(4, hidden=8, depth=1)
    losses = prm.fit(r, rewards=torch.tensor([0.0, 1.0, 0.5, 0.2]), steps=3, batch_size=8,
                     generator=torch.Generator().manual_seed(0))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)

"""The reward protocol and its boundary checks, MultiReward against hand-computed advantages, the
JPEG rewards, the Pref-GRPO win rate with a deterministic judge, and the latent PRM."""
from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

from flowsteer.rewards import (
    JpegCompressibility,
    JpegIncompressibility,
    LatentPRM,
    MultiReward,
    PairwiseJudge,
    Reward,
    RewardError,
    WinRateReward,
    reward,
)


def images(n=4, h=16, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def brightness(x, prompts, meta):
    return x.flatten(1).mean(1)


# ------------------------------------------------------------------------------------ protocol


def test_reward_wrapper_declares_and_batches():
    seen = []

    def fn(x, prompts, meta):
        seen.append((x.shape[0], list(prompts), meta))
        return x.flatten(1).mean(1)

    r = reward(fn, name="bright", batch_size=2)
    assert isinstance(r, Reward)
    assert (r.name, r.input, r.differentiable, r.batch_size) == ("bright", "pixels", False, 2)
    x = images(5)
    prompts = [f"p{i}" for i in range(5)]
    meta = {"ids": torch.arange(5), "shared": "s"}
    out = r(x, prompts, meta)
    assert out.shape == (5,) and out.dtype == torch.float32
    torch.testing.assert_close(out, x.flatten(1).mean(1))
    assert [s[0] for s in seen] == [2, 2, 1]
    assert seen[2][1] == ["p4"]
    assert seen[1][2]["ids"].tolist() == [2, 3] and seen[1][2]["shared"] == "s"


def test_reward_decorator_and_list_meta():
    @reward(name="first_meta", input="latents")
    def r(x, prompts, meta):
        return torch.tensor([float(m["v"]) for m in meta])

    out = r(torch.randn(3, 4, 5, 6), None, [{"v": 1}, {"v": 2}, {"v": 3}])
    assert r.input == "latents" and out.tolist() == [1.0, 2.0, 3.0]


def test_reward_dict_outputs_and_int_values():
    r = reward(lambda x, p, m: {"score": x.flatten(1).mean(1), "ok": (x.flatten(1).mean(1) > 0.5).long()},
               name="multi", batch_size=3)
    out = r(images(4))
    assert set(out) == {"score", "ok"}
    assert out["ok"].dtype == torch.float32 and out["ok"].shape == (4,)


@pytest.mark.parametrize("case,match", [
    ("short", "reward 'bad' returned 3 values for 4 samples"),
    ("nan", "reward 'bad' returned nan for sample 2"),
    ("inf", "reward 'bad' returned inf for sample 1"),
    ("column", r"reward 'bad' returned shape \(4, 1\); a reward returns \[N\] = \[4\]"),
    ("device", r"reward 'bad' returned a tensor on meta; expected cpu \(the device of its input\)"),
    ("none", "reward 'bad' returned None"),
    ("dict_nan", "reward 'bad' returned nan in output 'b' for sample 0"),
])
def test_reward_output_errors_name_the_reward(case, match):
    def fn(x, p, m):
        n = x.shape[0]
        v = torch.arange(n, dtype=torch.float32)
        if case == "short":
            return v[:3]
        if case == "nan":
            v[2] = math.nan
        if case == "inf":
            v[1] = math.inf
        if case == "column":
            return v[:, None]
        if case == "device":
            return torch.zeros(n, device="meta")
        if case == "none":
            return None
        if case == "dict_nan":
            return {"a": v, "b": torch.full((n,), math.nan)}
        return v

    with pytest.raises(RewardError, match=match):
        reward(fn, name="bad")(images(4))


def test_reward_nan_index_counts_across_batches():
    def fn(x, p, m):
        v = x.flatten(1).mean(1)
        return v if x.shape[0] == 2 else torch.full_like(v, math.nan)

    with pytest.raises(RewardError, match="nan for sample 4"):
        reward(fn, name="late", batch_size=2)(images(5))


def test_reward_rejects_complex_and_unconvertible():
    with pytest.raises(TypeError, match="reward 'c' returned dtype torch.complex64"):
        reward(lambda x, p, m: torch.zeros(x.shape[0], dtype=torch.complex64), name="c")(images(2))
    with pytest.raises(TypeError, match="reward 'o' returned a object, which is not a tensor"):
        reward(lambda x, p, m: object(), name="o")(images(2))


def test_reward_input_errors():
    r = reward(brightness, name="bright")
    with pytest.raises(ValueError, match=r"reward 'bright' takes images in \[0, 1\].*x / 2 \+ 0.5"):
        r(images(2) * 2 - 1)
    with pytest.raises(ValueError, match=r"reward 'bright' takes images \[N, 3, H, W\]"):
        r(torch.rand(2, 4, 8, 8))
    with pytest.raises(TypeError, match="floating-point images.*x.float\\(\\) / 255"):
        r(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="reward 'bright': prompts has 1 entries for 2 samples"):
        r(images(2), ["a"])
    with pytest.raises(TypeError, match="prompts must be a list of 2 strings"):
        r(images(2), "a")
    with pytest.raises(ValueError, match="reward 'bright': meta has 3 entries for 2 samples"):
        r(images(2), None, [1, 2, 3])
    with pytest.raises(ValueError, match="empty batch"):
        r(torch.rand(0, 3, 4, 4))
    with pytest.raises(ValueError, match=r"reward 'lat' takes latents \[N, C, H, W\] or \[N, C, F, H, W\]"):
        reward(brightness, name="lat", input="latents")(torch.randn(2, 3, 4))


def test_video_pixels_accepted():
    out = reward(brightness, name="b")(torch.rand(2, 3, 4, 8, 8))
    assert out.shape == (2,)


def test_differentiable_reward_keeps_graph_and_others_do_not():
    x = images(3).requires_grad_(True)
    diff = reward(lambda x, p, m: (x ** 2).flatten(1).mean(1), name="sq", differentiable=True)
    out = diff(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach() / x[0].numel())
    nondiff = reward(lambda x, p, m: (x ** 2).flatten(1).mean(1), name="sq_nd")
    assert not nondiff(x).requires_grad
    with torch.no_grad():
        assert not diff(x).requires_grad


# ---------------------------------------------------------------------------------- MultiReward

# Two rewards over two groups of two; every expected value below is worked by hand from
# the formulas of docs/ops.md (Group advantages) (eps = 1e-4 in the group std, ddof 0, clip 5 never reached).
A = [1.0, 2.0, 3.0, 4.0]
B = [0.0, 1.0, 1.0, 0.0]
GROUPS = torch.tensor([0, 0, 1, 1])
EPS = 1e-4


def _const(values, name):
    return reward(lambda x, p, m: torch.tensor(values), name=name)


def _multi(**kw):
    return MultiReward({"a": _const(A, "a"), "b": _const(B, "b")}, {"a": 1.0, "b": 2.0}, **kw)


def test_multi_sum_hand_computed():
    m = _multi(mode="sum")
    out = m(images(4))
    assert out.names == ["a", "b"] and out.rewards.shape == (4, 2)
    torch.testing.assert_close(out["b"], torch.tensor(B))
    # s = a + 2 b = [1, 4, 5, 4]; group 0: mean 2.5, std 1.5; group 1: mean 4.5, std 0.5.
    want = torch.tensor([-1.5 / (1.5 + EPS), 1.5 / (1.5 + EPS), 0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS)])
    torch.testing.assert_close(m.advantages(out, GROUPS), want)
    log = m.last_log
    assert log["reward/a/mean"] == pytest.approx(2.5) and log["reward/a/std"] == pytest.approx(math.sqrt(1.25))
    assert log["reward/b/mean"] == pytest.approx(0.5) and log["reward/b/max"] == 1.0
    assert log["reward/weighted_sum/mean"] == pytest.approx(3.5)
    assert "advantage/mean" in log and "pareto/kept_frac" not in log


def test_multi_per_reward_hand_computed():
    m = _multi(mode="per_reward")
    # z(a) = [-1, 1, -1, 1] * 0.5 / (0.5 + eps); z(b) = [-1, 1, 1, -1] * 0.5 / (0.5 + eps).
    z = 0.5 / (0.5 + EPS)
    want = torch.tensor([-3 * z, 3 * z, z, -z])
    torch.testing.assert_close(m.advantages(m(images(4)), GROUPS), want)


def test_multi_log_tamed_hand_computed():
    m = _multi(mode="log_tamed")
    # h_a = sqrt(1.25) / 2.5 = 0.447, h_b = 0.5 / 0.5 = 1.0 > mean(h): b is tamed to log(1 + b).
    # s = a + 2 log(1 + b) = [1, 2 + 2 ln 2, 3 + 2 ln 2, 4]; a pair's z-scores are +-d / (d + eps) with
    # d = |difference| / 2 (its std), the larger member positive.
    d0, d1 = (1.0 + 2 * math.log(2)) / 2, (2 * math.log(2) - 1.0) / 2  # group 1: s[2] = 4.386 > s[3] = 4
    want = torch.tensor([-d0 / (d0 + EPS), d0 / (d0 + EPS), d1 / (d1 + EPS), -d1 / (d1 + EPS)])
    torch.testing.assert_close(m.advantages(m(images(4)), GROUPS), want)


def test_multi_dict_components_zero_weight_and_regularizer():
    judge = reward(lambda x, p, m: {"score": torch.tensor(A), "debug": torch.tensor([9.0, 9, 9, 9])}, name="judge")
    realism = _const(B, "realism")
    m = MultiReward({"judge": judge}, {"judge/debug": 0.0, "realism": -1.0}, regularizers={"realism": realism})
    out = m(images(4))
    assert out.names == ["judge/score", "judge/debug", "realism"] and out.regularizers == ["realism"]
    assert out.weights.tolist() == [1.0, 0.0, -1.0]
    assert m.last_log["reward/judge/debug/mean"] == 9.0 and m.last_log["regularizer/realism/mean"] == 0.5
    # Only judge/score (w 1) and realism (w -1) are active: s = a - b = [1, 1, 2, 4].
    want = torch.tensor([0.0, 0.0, -1 / (1 + EPS), 1 / (1 + EPS)])
    torch.testing.assert_close(m.advantages(out, GROUPS), want)
    torch.testing.assert_close(out.weighted_sum(), torch.tensor(A) - torch.tensor(B))


def test_multi_pareto_filter():
    # Group 0: sample 1 dominates sample 0 on (a, b). Group 1: 2 and 3 trade off, both kept.
    m = MultiReward({"a": _const([1.0, 2.0, 3.0, 1.0], "a"), "b": _const([0.0, 1.0, 0.0, 1.0], "b")},
                    mode="per_reward", pareto=True)
    out = m(images(4))
    adv = m.advantages(out, GROUPS)
    assert m.last_pareto_mask.tolist() == [False, True, True, True]
    assert adv[0] == 0 and adv[1] > 0
    assert m.last_log["pareto/kept_frac"] == 0.75
    # A negative weight turns "lower is better": now sample 0 of group 0 wins on b.
    m2 = MultiReward({"a": _const([1.0, 1.0, 3.0, 4.0], "a"), "b": _const([0.0, 1.0, 0.0, 1.0], "b")},
                     {"b": -1.0}, pareto=True)
    m2.advantages(m2(images(4)), GROUPS)
    assert m2.last_pareto_mask.tolist() == [True, False, True, True]


def test_multi_latent_and_pixel_rewards():
    lat = reward(lambda x, p, m: x.flatten(1).mean(1), name="lat", input="latents")
    m = MultiReward([lat, reward(brightness, name="pix")])
    z = torch.randn(4, 4, 3, 3)
    out = m(images(4), latents=z)
    torch.testing.assert_close(out["lat"], z.flatten(1).mean(1))
    with pytest.raises(ValueError, match="reward 'lat' takes latents: pass latents="):
        m(images(4))


def test_multi_errors():
    with pytest.raises(ValueError, match="weights names 'c', which is no reward"):
        _multi_with({"c": 1.0})
    with pytest.raises(ValueError, match="weights has 1 entries for 2 rewards"):
        _multi_with([1.0])
    with pytest.raises(ValueError, match="mode must be one of"):
        MultiReward({"a": brightness}, mode="max")
    with pytest.raises(ValueError, match="used by both rewards and regularizers"):
        MultiReward({"a": brightness}, regularizers={"a": brightness})
    m = MultiReward({"a": brightness}, {"a": 0.0})
    with pytest.raises(ValueError, match="every reward component has weight 0"):
        m.advantages(m(images(4)), GROUPS)
    nan = MultiReward({"a": brightness, "n": _const([0.0, math.nan, 0.0, 0.0], "n")})
    with pytest.raises(RewardError, match="reward 'n' returned nan for sample 1"):
        nan(images(4))


def _multi_with(weights):
    return MultiReward({"a": brightness, "b": brightness}, weights)


# ------------------------------------------------------------------------------------------ JPEG


def _jpeg_kb(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def test_jpeg_matches_pil_and_orders_images():
    x = torch.cat([torch.full((1, 3, 32, 32), 0.5), images(2, 32, 32)])
    got = JpegCompressibility()(x)
    arrs = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    want = torch.tensor([-_jpeg_kb(a) for a in arrs])
    torch.testing.assert_close(got, want)
    assert got[0] > got[1]  # a flat image compresses better than noise
    torch.testing.assert_close(JpegIncompressibility()(x), -got)
    torch.testing.assert_close(JpegCompressibility(scale=1 / 500)(x), got / 500)  # Flow-GRPO's scale
    torch.testing.assert_close(JpegCompressibility()(x), got)  # deterministic


def test_jpeg_video_averages_frames():
    v = torch.rand(2, 3, 3, 16, 16)
    per_frame = JpegCompressibility()(v.permute(0, 2, 1, 3, 4).reshape(6, 3, 16, 16))
    torch.testing.assert_close(JpegCompressibility()(v), per_frame.reshape(2, 3).mean(1))


def test_jpeg_bad_quality():
    with pytest.raises(ValueError, match="quality must be an int in"):
        JpegCompressibility(quality=0)


# ----------------------------------------------------------------------------------- win rate


class BrightnessJudge:
    """Prefers the brighter image; equal brightness is a tie."""

    def __init__(self):
        self.calls = 0
        self.batch_calls = 0

    def __call__(self, a, b, prompt):
        self.calls += 1
        ma, mb = float(a.mean()), float(b.mean())
        return 1.0 if ma > mb else 0.0 if ma < mb else 0.5


class BatchedBrightnessJudge(BrightnessJudge):
    def batch(self, a, b, prompts):
        self.batch_calls += 1
        ma, mb = a.flatten(1).mean(1), b.flatten(1).mean(1)
        return torch.where(ma > mb, 1.0, torch.where(ma < mb, 0.0, 0.5))


def _levels(values):
    return torch.tensor(values).reshape(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()


LEVELS = [0.1, 0.5, 0.3, 0.5, 0.9, 0.2, 0.4, 0.6]
# Group 0 (0.1, 0.5, 0.3, 0.5): sample 1 beats 0 and 2 and ties 3 -> 2.5 / 3, and so on.
WIN_RATES = [0.0, 2.5 / 3, 1 / 3, 2.5 / 3, 1.0, 0.0, 1 / 3, 2 / 3]


@pytest.mark.parametrize("judge_cls", [BrightnessJudge, BatchedBrightnessJudge], ids=["per-pair", "batched"])
def test_win_rate_hand_computed(judge_cls):
    judge = judge_cls()
    assert isinstance(judge, PairwiseJudge)
    r = WinRateReward(judge, group_size=4, pair_batch_size=5)
    out = r(_levels(LEVELS), ["a"] * 4 + ["b"] * 4)
    torch.testing.assert_close(out, torch.tensor(WIN_RATES))
    assert r.last_prefs.shape == (2, 4, 4)
    assert r.last_prefs[0, 1, 0] == 1 and r.last_prefs[0, 0, 1] == 0 and r.last_prefs[0, 1, 3] == 0.5
    pairs = 2 * 4 * 3  # G (G - 1) ordered pairs per group
    if judge_cls is BatchedBrightnessJudge:
        assert judge.batch_calls == math.ceil(pairs / 5) and judge.calls == 0
    else:
        assert judge.calls == pairs


def test_win_rate_nan_is_tie_and_bad_verdicts():
    r = WinRateReward(lambda a, b, p: math.nan, group_size=3)
    torch.testing.assert_close(r(_levels([0.1, 0.2, 0.3])), torch.full((3,), 0.5))
    with pytest.raises(RewardError, match=r"reward 'win_rate': the judge returned 0.7.*samples \(0, 1\)"):
        WinRateReward(lambda a, b, p: 0.7, group_size=2)(_levels([0.1, 0.2]))
    with pytest.raises(RewardError, match="the judge returned 'A'"):
        WinRateReward(lambda a, b, p: "A", group_size=2)(_levels([0.1, 0.2]))
    with pytest.raises(ValueError, match="5 samples do not split into groups of 2"):
        WinRateReward(BrightnessJudge(), group_size=2)(_levels([0.1] * 5))
    with pytest.raises(ValueError, match="group 0 .* mixes prompts"):
        WinRateReward(BrightnessJudge(), group_size=2)(_levels([0.1, 0.2]), ["a", "b"])
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        WinRateReward(BrightnessJudge(), group_size=1)


# ---------------------------------------------------------------------------------- latent PRM

PRM_SIGMAS = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.05])


def _synthetic(n, shape, g):
    """Structured 'clean latents' (a per-channel level plus texture) and the known reward
    r(x0) = mean(x0[:, 0]) - mean(x0[:, 1])."""
    c = shape[0]
    level = torch.randn(n, c, generator=g).reshape(n, c, *([1] * (len(shape) - 1)))
    x0 = level + 0.5 * torch.randn(n, *shape, generator=g)
    means = x0.flatten(2).mean(2)
    return x0, means[:, 0] - means[:, 1]


def _noisy(x0, sigma, g):
    s = sigma.reshape(-1, *([1] * (x0.ndim - sigma.ndim))) if isinstance(sigma, torch.Tensor) else sigma
    return (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)


@pytest.fixture
def one_thread():
    # The PRM's convs are tiny: a second OpenMP thread buys nothing and its synchronisation cost
    # dominates on a busy machine (this test took 18 s with 2 threads and 5 s with 1 on the 2-core
    # dev box under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("video", [False, True], ids=["image-C4-8x8", "video-C4-F2-8x8"])
def test_prm_learns_synthetic_reward(video, one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    shape = (4, 2, 8, 8) if video else (4, 8, 8)
    x0, r = _synthetic(256, shape, g)
    latents = _noisy(x0[None].expand(len(PRM_SIGMAS), *x0.shape), PRM_SIGMAS, g)  # [T, N, ...]
    prm = LatentPRM(4, hidden=16, depth=2, video=video)
    losses = prm.fit(latents, PRM_SIGMAS, r, steps=120, lr=3e-3, batch_size=128,
                     generator=torch.Generator().manual_seed(1))
    assert losses[-1] < 0.3 * losses[0]
    # Held out, at moderate noise (sigma <= 0.6): at sigma = 0.6 the per-channel mean keeps an SNR
    # of about 0.4^2 / (0.6^2 / 64) = 28 over its noise, so a good predictor reaches r ~ 0.98.
    xt, rt = _synthetic(256, shape, g)
    for sigma in (0.2, 0.4, 0.6):
        pred = prm.predict(_noisy(xt, sigma, g), sigma)
        assert pred.shape == (256,)
        corr = float(torch.corrcoef(torch.stack([pred, rt]))[0, 1])
        assert corr > 0.9, f"held-out Pearson r = {corr:.3f} at sigma = {sigma}"


@pytest.mark.parametrize("video", [False, True], ids=["image-B3-C4-7x5", "video-B3-C4-F3-7x5"])
def test_prm_grad_matches_finite_differences(video):
    torch.manual_seed(0)
    prm = LatentPRM(4, cond_dim=6, hidden=8, depth=2, video=video).double()
    x = torch.randn(3, 4, *((3,) if video else ()), 7, 5, dtype=torch.float64)
    cond = torch.randn(3, 6, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.5, 0.9])
    g = prm.grad(x, sigma, cond)
    assert g.shape == x.shape and g.dtype == x.dtype and bool(torch.isfinite(g).all())
    assert all(p.grad is None for p in prm.parameters())
    d = torch.randn_like(x)
    h = 1e-4
    fd = (prm.predict(x + h * d, sigma, cond) - prm.predict(x - h * d, sigma, cond)) / (2 * h)
    # fp64 PRM: the central difference's error is O(h^2) ~ 1e-8 plus rounding ~ 1e-16 / h ~ 1e-12.
    torch.testing.assert_close((g * d).flatten(1).sum(1), fd, rtol=1e-6, atol=1e-8)


def test_prm_fit_accepts_lists_rollouts_and_cond():
    prm = LatentPRM(2, cond_dim=3, hidden=8, depth=1)
    steps = [torch.randn(5, 2, 4, 4) for _ in range(3)]
    rewards, cond = torch.randn(5), torch.randn(5, 3)
    assert len(prm.fit(steps, [0.9, 0.5, 0.1], rewards, cond, steps=2)) == 2

    class Rollout:
        latents = torch.stack(steps)
        sigmas = torch.tensor([[0.9] * 5, [0.5] * 5, [0.1] * 5])

    assert len(prm.fit(Rollout(), None, rewards, cond, steps=3)) == 3
    assert float(prm.target_std) > 0 and bool(prm.fitted)
    assert prm.predict(steps[0], 0.5, cond).shape == (5,)


def test_prm_errors():
    prm = LatentPRM(4, hidden=8, depth=1)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\] with C = 4 \(got shape \(2, 3, 4, 4\)\)"):
        prm.predict(torch.randn(2, 3, 4, 4), 0.5)
    with pytest.raises(ValueError, match="build LatentPRM\\(video=True\\)"):
        prm.predict(torch.randn(2, 4, 2, 4, 4), 0.5)
    with pytest.raises(ValueError, match=r"sigma must be in \[0, 1\] \(got 1.5\)"):
        prm.predict(torch.randn(2, 4, 4, 4), 1.5)
    with pytest.raises(ValueError, match=r"sigma must be in \[0, 1\] \(got values in \[-0.5, 0.5\]\)"):
        prm.predict(torch.randn(2, 4, 4, 4), torch.tensor([0.5, -0.5]))
    with pytest.raises(ValueError, match=r"sigma must be a float, a 0-d tensor or \[N\] = \[2\]"):
        prm.predict(torch.randn(2, 4, 4, 4), torch.rand(3))
    with pytest.raises(ValueError, match="pass cond=None"):
        prm.predict(torch.randn(2, 4, 4, 4), 0.5, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"cond must be \[N, cond_dim\] = \[2, 3\]"):
        LatentPRM(4, cond_dim=3, hidden=8, depth=1).predict(torch.randn(2, 4, 4, 4), 0.5)
    with pytest.raises(ValueError, match=r"rewards must be a tensor \[N\] = \[2\]"):
        prm.fit(torch.randn(3, 2, 4, 4, 4), [0.9, 0.5, 0.1], torch.randn(3))
    with pytest.raises(ValueError, match=r"sigmas must be \[T\] = \[3\]"):
        prm.fit(torch.randn(3, 2, 4, 4, 4), [0.9, 0.5], torch.randn(2))
    with pytest.raises(ValueError, match="rewards must be finite"):
        prm.fit(torch.randn(1, 2, 4, 4, 4), [0.5], torch.tensor([0.0, math.nan]))

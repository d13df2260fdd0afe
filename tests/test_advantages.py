"""group_advantages, win_rate, pareto_mask and grpo_loss against the reference."""
import pytest
import torch

from flowsteer.ops import group_advantages, grpo_loss, pareto_mask, reference as R, win_rate

from helpers import assert_close


def _rewards(n, k, groups, seed=0, sparse_ids=False):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(n, k, generator=g) * 2 - 0.5
    ids = torch.randint(0, groups, (n,), generator=g)
    if sparse_ids:  # arbitrary ids, as hashes of prompts give: exercises the sorting path
        ids = ids * 1_000_003 - 7
    return r, ids


@pytest.mark.parametrize("std", ["group", "global", "none"])
@pytest.mark.parametrize("mode,k", [("sum", 1), ("sum", 3), ("per_reward", 3), ("log_tamed", 3)])
@pytest.mark.parametrize("sparse_ids", [False, True], ids=["dense-ids", "sparse-ids"])
def test_matches_reference(backend, std, mode, k, sparse_ids):
    name, device = backend
    r, ids = _rewards(203, k, 17, sparse_ids=sparse_ids)
    w = [0.5, 1.0, 2.0][:k]
    got = group_advantages(r.to(device), ids.to(device), std=std, mode=mode, weights=w, clip=2.0)
    want = R.group_advantages(r.double(), ids, std=std, mode=mode, weights=w, clip=2.0)
    want32 = R.group_advantages(r, ids, std=std, mode=mode, weights=w, clip=2.0)
    assert got.dtype == torch.float32 and got.shape == (203,)
    assert_close("advantages", got, want, want32, ulps=32)


def test_per_reward_batch_norm(backend):
    name, device = backend
    r, ids = _rewards(64, 2, 8, seed=1)
    got = group_advantages(r.to(device), ids.to(device), mode="per_reward", batch_norm=True, weights=[1.0, 0.5])
    want = R.group_advantages(r.double(), ids, mode="per_reward", batch_norm=True, weights=[1.0, 0.5])
    assert_close("advantages", got, want, ulps=64)


def test_zero_variance_group_is_zero_not_nan(backend):
    name, device = backend
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7, 0.2, 0.2])
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    for std in ("group", "global", "none"):
        a = group_advantages(r.to(device), ids.to(device), std=std).cpu()
        assert torch.isfinite(a).all()
        assert torch.equal(a[[0, 1, 2, 5, 6]], torch.zeros(5)), std
        assert a[3] < 0 < a[4]


def test_single_sample_groups_and_one_group(backend):
    name, device = backend
    r = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(group_advantages(r.to(device), torch.arange(3).to(device)).cpu(), torch.zeros(3))
    a = group_advantages(r.to(device), torch.zeros(3, dtype=torch.long).to(device), clip=None).cpu()
    assert_close("one group", a, (r.double() - 2) / ((2 / 3) ** 0.5 + 1e-4))


def test_clip(backend):
    name, device = backend
    r = torch.tensor([0.0] * 50 + [10.0])
    a = group_advantages(r.to(device), torch.zeros(51, dtype=torch.long).to(device), clip=3.0).cpu()
    assert float(a.max()) == 3.0


@pytest.mark.parametrize("n,groups", [(100_000, 4000), (5000, 1)])
def test_large(kernel_backend, n, groups):
    """Many groups (the segmented kernel's usual load) and one large group (longer than a block)."""
    name, device = kernel_backend
    if name == "triton" and device.type == "cpu":
        n, groups = n // 10, max(1, groups // 10)  # the interpreter runs one program per group
    r, ids = _rewards(n, 1, groups, seed=3)
    got = group_advantages(r.to(device), ids.to(device)).cpu()
    # fp64 statement of the same normalisation, vectorised with scatter (the reference's loop
    # over 4000 groups would dominate the test time).
    ids_dense = torch.unique(ids, return_inverse=True)[1]
    x = r[:, 0].double()
    count = torch.bincount(ids_dense).double()
    mean = torch.zeros_like(count).index_add_(0, ids_dense, x) / count
    var = torch.zeros_like(count).index_add_(0, ids_dense, (x - mean[ids_dense]) ** 2) / count
    want = ((x - mean[ids_dense]) / (var.sqrt()[ids_dense] + 1e-4)).clamp(-5, 5)
    assert_close("advantages", got, want, ulps=64)


def test_win_rate(backend):
    name, device = backend
    prefs = torch.tensor([[[0.0, 1.0, 0.5], [0.0, 0.0, float("nan")], [0.5, 1.0, 0.0]]])
    got = win_rate(prefs.to(device)).cpu()
    assert torch.allclose(got, torch.tensor([[0.75, 0.25, 0.75]]))
    assert torch.equal(win_rate(prefs[0].to(device)).cpu(), got[0])
    g = torch.Generator().manual_seed(3)
    big = torch.randint(0, 3, (7, 21, 21), generator=g).float() / 2
    big[big == 1.0] = float("nan")  # unparseable answers
    assert_close("win_rate", win_rate(big.to(device)), R.win_rate(big.double()), ulps=8)


@pytest.mark.parametrize("k,groups", [(2, 5), (3, 1), (1, 40)])
def test_pareto_mask(backend, k, groups):
    name, device = backend
    g = torch.Generator().manual_seed(4)
    r = torch.rand(60, k, generator=g).round(decimals=1)  # ties included
    ids = torch.randint(0, groups, (60,), generator=g) * 7 - 3
    got = pareto_mask(r.to(device), ids.to(device)).cpu()
    assert got.dtype == torch.bool and torch.equal(got, R.pareto_mask(r, ids))


def test_grpo_loss_matches_reference_and_stats():
    g = torch.Generator().manual_seed(5)
    lp = torch.randn(16, generator=g) * 1e-3
    old = lp + torch.randn(16, generator=g) * 1e-3
    adv = torch.randn(16, generator=g)
    kl = torch.rand(16, generator=g)
    lpg = lp.clone().requires_grad_()
    loss, stats = grpo_loss(lpg, old, adv, clip_range=(2e-4, 3e-4), kl=kl, beta=0.04)
    want, ratio = R.grpo_loss(lp.double(), old.double(), adv.double(), (2e-4, 3e-4), kl.double(), 0.04)
    assert_close("loss", loss, want, ulps=64)
    assert stats.ratio_max == ratio.max().float() or abs(float(stats.ratio_max - ratio.max())) < 1e-6
    assert 0.0 < float(stats.clip_frac) < 1.0
    loss.backward()
    assert lpg.grad is not None and torch.isfinite(lpg.grad).all()


def test_on_policy_ratio_is_one():
    lp = torch.randn(8)
    loss, stats = grpo_loss(lp, lp.clone(), torch.randn(8))
    assert float(stats.ratio_min) == 1.0 and float(stats.ratio_max) == 1.0 and float(stats.clip_frac) == 0.0


def _id_sets():
    """Group ids of every kind a caller may pass: random, the int64 extremes, and prompt hashes."""
    g = torch.Generator().manual_seed(5)
    lo, hi = -2**63, 2**63 - 1
    hashed = torch.tensor([hash(f"prompt {i % 7}") for i in range(40)], dtype=torch.int64)
    return {
        "extremes": torch.tensor([lo, hi] * 5),
        "extremes-and-zero": torch.tensor([lo, 0, hi, lo, 0, hi, 5, 5]),
        "near-max": torch.tensor([hi, hi - 1, hi, hi - 1, hi - 2]),
        "near-min": torch.tensor([lo, lo + 1, lo, lo + 1]),
        "random-int64": torch.randint(lo, hi, (8,), generator=g).repeat(3),
        "hashed-prompts": hashed,
    }


@pytest.mark.parametrize("kind", list(_id_sets()))
def test_any_int64_group_ids(backend, kind):
    """Ids spanning more than 2**63 - 1 once overflowed the CPU kernel's range arithmetic (a segfault)."""
    name, device = backend
    ids = _id_sets()[kind]
    n = ids.numel()
    r = torch.rand(n, 2, generator=torch.Generator().manual_seed(n))
    got = group_advantages(r.to(device), ids.to(device), weights=[1.0, 0.5])
    want = R.group_advantages(r.double(), ids, weights=[1.0, 0.5])
    assert_close("advantages", got, want, R.group_advantages(r, ids, weights=[1.0, 0.5]), ulps=32)
    # the same groups under dense ids give the same advantages
    dense = torch.unique(ids, return_inverse=True)[1]
    assert torch.equal(got.cpu(), group_advantages(r.to(device), dense.to(device), weights=[1.0, 0.5]).cpu())
    mask = pareto_mask(r.to(device), ids.to(device))
    assert torch.equal(mask.cpu(), pareto_mask(r.to(device), dense.to(device)).cpu())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_rejected(backend, bad):
    name, device = backend
    r, ids = _rewards(8, 2, 2)
    with pytest.raises(ValueError, match="weights must be finite"):
        group_advantages(r.to(device), ids.to(device), weights=[1.0, bad])


def test_an_aggregate_that_overflows_is_rejected(backend):
    name, device = backend
    r = torch.full((4, 2), 3e38)
    with pytest.raises(ValueError, match="weighted sum of the rewards is not finite"):
        group_advantages(r.to(device), torch.tensor([0, 0, 1, 1]).to(device), weights=[1.0, 1.0])

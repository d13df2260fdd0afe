"""pytest-benchmark suites: every backend against the pure-torch reference, eager and compiled.

    python -m pytest benches/bench_ops.py --benchmark-only --benchmark-group-by=group

Groups are op + shape; extra_info carries the device, shape and dtype. On the CPU the Triton
interpreter is skipped (it is a correctness tool). Quote ratios measured in one run.
"""
import pytest
import torch

import flowsteer
from flowsteer.bench import research_group_advantages
from flowsteer.ops import reference as R

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INFO = flowsteer.backend_info()
KERNELS = (["cuda"] if INFO["cuda_kernels"] else []) + (["triton"] if INFO["triton"] else []) if DEVICE.type == "cuda" else ["cpu"]
SHAPES = [(16, 16, 64, 64), (8, 16, 128, 128), (4, 16, 21, 60, 104)] if DEVICE.type == "cuda" else [(8, 16, 64, 64)]
IMPLS = KERNELS + ["eager", "compile"]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, group, **info):
    benchmark.group = group
    benchmark.extra_info.update(device=str(DEVICE), **info)
    fn()  # warm-up (and compilation)

    def timed():
        fn()
        _sync()

    benchmark(timed)


def _ref_sample(v, x):
    noise = torch.randn(x.shape, device=x.device)
    return R.sde_step(v, x, 0.6, 0.5, "flow", 0.7, noise=noise)["prev_sample"]


def _ref_eval(v, x, prev):
    return R.sde_step(v, x, 0.6, 0.5, "flow", 0.7, prev_sample=prev)["log_prob"]


_compiled = {}


def _compiled_fn(name, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sde_step_sample(benchmark, impl, shape):
    """Sample mode with in-kernel noise (the reference draws torch.randn), fp32."""
    v, x = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    if impl in KERNELS:
        flowsteer.set_backend(impl)
        fn = lambda: flowsteer.ops.sde_step(v, x, 0.6, 0.5, "flow", 0.7, seed=1, return_mean=False)  # noqa: E731
    else:
        ref = _ref_sample if impl == "eager" else _compiled_fn("sample", _ref_sample)
        fn = lambda: ref(v, x)  # noqa: E731
    _run(benchmark, fn, f"sde_step sample {list(shape)}", shape=list(shape), dtype="fp32", impl=impl)
    flowsteer.set_backend("auto")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sde_step_evaluate_fwd_bwd(benchmark, impl, shape):
    """The training-time path: log-prob of a stored sample, forward and backward to v, fp32."""
    v, x, prev = (torch.randn(shape, device=DEVICE) for _ in range(3))
    if impl in KERNELS:
        flowsteer.set_backend(impl)

        def fn():
            vg = v.detach().requires_grad_()
            flowsteer.ops.sde_step(vg, x, 0.6, 0.5, "flow", 0.7, prev_sample=prev, return_mean=False).log_prob.sum().backward()
    else:
        ref = _ref_eval if impl == "eager" else _compiled_fn("eval", _ref_eval)

        def fn():
            vg = v.detach().requires_grad_()
            ref(vg, x, prev).sum().backward()

    _run(benchmark, fn, f"sde_step evaluate fwd+bwd {list(shape)}", shape=list(shape), dtype="fp32", impl=impl)
    flowsteer.set_backend("auto")


@pytest.mark.parametrize("impl", KERNELS + ["research_loop"])
def test_group_advantages(benchmark, impl):
    """N = 100k rewards in 4k groups."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(100_000, generator=g).to(DEVICE)
    ids = torch.randint(0, 4000, (100_000,), generator=g).to(DEVICE)
    if impl in KERNELS:
        flowsteer.set_backend(impl)
        fn = lambda: flowsteer.ops.group_advantages(rewards, ids)  # noqa: E731
    else:
        fn = lambda: research_group_advantages(rewards, ids)  # noqa: E731
    _run(benchmark, fn, "group_advantages N=100k G=4k", n=100_000, groups=4000, impl=impl)
    flowsteer.set_backend("auto")


@pytest.mark.parametrize("impl", ["eager", "compile"])
def test_grpo_loss(benchmark, impl):
    """Plain torch: the compiled version shows what a fused kernel could at most buy."""
    lp = torch.randn(4096, device=DEVICE, requires_grad=True)
    old, adv = torch.randn(4096, device=DEVICE), torch.randn(4096, device=DEVICE)
    loss_fn = flowsteer.ops.grpo_loss if impl == "eager" else _compiled_fn("loss", R.grpo_loss)

    def fn():
        loss = loss_fn(lp, old, adv, 1e-4)[0]
        loss.backward()

    _run(benchmark, fn, "grpo_loss B=4096 fwd+bwd", impl=impl)

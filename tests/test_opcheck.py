"""torch.library.opcheck for every registered op, on every backend, and torch.compile."""
import pytest
import torch

import flowsteer
from flowsteer.ops import advantages as adv_mod, sde as sde_mod
from flowsteer.ops.codes import KIND_CODE
from flowsteer.ops.options import SdeOptions


def _options(opts, flags):
    """A registered op's (options, scalars): the step's options, then the op's own flags."""
    ints, floats = opts.to_op()
    return ints + flags, floats


def _sde_args(device, prev=False, guidance=False, ref=False, kind="flow", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    t = lambda: torch.randn(2, 3, 5, 4, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    v, x = t().requires_grad_(), t().requires_grad_()
    sigma = torch.tensor([0.7, 0.5], device=device)
    sigma_next = torch.tensor([0.6, 0.3], device=device)
    return (v, x, sigma, sigma_next, None, t() if prev else None, t() if guidance else None,
            torch.tensor([0.3, 0.2], device=device) if guidance else None, t().requires_grad_() if ref else None,
            [KIND_CODE[kind], 123, 4, 0, 1 if ref else 0, 1, 0, 1, 1], [0.7, 0.0])


@pytest.mark.parametrize("case", ["sample", "evaluate", "evaluate-kl-guided", "cps-bf16"])
def test_opcheck_sde_step(backend, case):
    name, device = backend
    args = {
        "sample": lambda: _sde_args(device),
        "evaluate": lambda: _sde_args(device, prev=True),
        "evaluate-kl-guided": lambda: _sde_args(device, prev=True, guidance=True, ref=True),
        "cps-bf16": lambda: _sde_args(device, prev=True, kind="cps", dtype=torch.bfloat16),
    }[case]()
    torch.library.opcheck(sde_mod._sde_step_op, args)


def test_opcheck_sde_step_backward(backend):
    name, device = backend
    g = torch.Generator().manual_seed(1)
    t = lambda: torch.randn(2, 3, 5, 4, generator=g).to(device)  # noqa: E731
    args = (t(), t(), t(), torch.tensor([0.7, 0.5], device=device), torch.tensor([0.6, 0.3], device=device), None, None,
            t(), torch.randn(2, generator=g).to(device), torch.randn(2, generator=g).to(device), t(), None,
            *_options(SdeOptions(KIND_CODE["flow"], 0.7, kl_form=1, reduce_mean=True), [1, 1, 1]))
    torch.library.opcheck(sde_mod._sde_step_backward_op, args)


def test_opcheck_group_zscore(backend):
    name, device = backend
    r = torch.rand(30, 2).to(device)
    ids = torch.randint(0, 4, (30,)).to(device)
    args = (r, ids, torch.tensor([1.0, 0.5], device=device), r.std(0), 0, 1e-4, 5.0)
    torch.library.opcheck(adv_mod._group_zscore_op, args)


def test_torch_compile_fullgraph():
    """The public op traces into one graph under torch.compile and matches eager."""
    v, x, prev = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)

    def step(v, x, prev):
        out = flowsteer.ops.sde_step(v, x, 0.7, 0.6, "flow", 0.7, prev_sample=prev, return_mean=False)
        return out.log_prob * 2

    eager = step(v, x, prev)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(v, x, prev)
    assert torch.equal(eager, compiled)


def test_opcheck_win_rate_and_pareto_mask(backend):
    name, device = backend
    prefs = (torch.randint(0, 3, (3, 5, 5)).float() / 2).to(device)
    torch.library.opcheck(adv_mod._win_rate_op, (prefs,))
    r = torch.rand(30, 2).to(device)
    ids = torch.randint(0, 4, (30,)).to(device)
    torch.library.opcheck(adv_mod._pareto_mask_op, (r, ids))


def test_torch_compile_backward_matches_eager():
    """Under torch.compile the registered op and its registered autograd run; eager uses the same
    implementation through an autograd.Function. Both give the same gradients."""
    g = torch.Generator().manual_seed(2)
    v, x, prev, ref = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(4))

    def loss(v, x):
        out = flowsteer.ops.sde_step(v, x, 0.7, 0.6, "flow", 0.7, prev_sample=prev, ref_v=ref)
        return (out.log_prob * torch.tensor([1.0, -2.0])).sum() + out.kl.sum() + out.mean.pow(2).mean()

    def grads(fn):
        vv, xx = v.clone().requires_grad_(), x.clone().requires_grad_()
        fn(vv, xx).backward()
        return vv.grad, xx.grad

    eager = grads(loss)
    compiled = grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)

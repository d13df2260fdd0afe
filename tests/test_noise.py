"""In-kernel Philox noise: statistics, reproducibility, and agreement between backends."""
import pytest
import torch

import flowsteer
import flowsteer.ops.backends
from flowsteer.ops import philox_normal, reference as R, sde_step

from conftest import KERNEL_BACKENDS

N = 10**6


def test_reference_stream_is_philox4x32_10():
    """Known-answer test from the Random123 distribution (kat_vectors: philox4x32_10, key = counter = 0)."""
    # With counter (0, 0, 0, 0) and key (0, 0): 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    out = R.philox_uint32(1, seed=0, offset=0)[0]
    assert [int(v) for v in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_statistics(kernel_backend):
    """Mean, variance and a Kolmogorov-Smirnov test on 10^6 draws of the sampler's noise."""
    stats = pytest.importorskip("scipy.stats")
    name, device = kernel_backend
    shape = (4, 250_000)
    v = torch.zeros(shape, device=device) + 0.25
    x = torch.ones(shape, device=device)
    out = sde_step(v, x, 0.5, 0.4, "dance", 1.0, seed=2024, offset=3)
    z = ((out.prev_sample - out.mean) / out.std[:, None]).double().cpu().flatten()
    assert z.numel() == N
    # 5 sigma bounds: mean has std 1/sqrt(N), the sample variance std sqrt(2/N).
    assert abs(float(z.mean())) < 5 / N**0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / N) ** 0.5
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # Neighbouring draws (same Philox block and across blocks) are uncorrelated.
    assert abs(float(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1])) < 5 / N**0.5


def test_same_seed_same_bits(kernel_backend):
    name, device = kernel_backend
    v, x = torch.randn(2, 3, 17, 9, device=device), torch.randn(2, 3, 17, 9, device=device)
    a = sde_step(v, x, 0.7, 0.6, "flow", 0.7, seed=99, offset=1)
    b = sde_step(v, x, 0.7, 0.6, "flow", 0.7, seed=99, offset=1)
    c = sde_step(v, x, 0.7, 0.6, "flow", 0.7, seed=99, offset=2)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.prev_sample, c.prev_sample)


def test_default_seed_follows_torch_manual_seed():
    v, x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.manual_seed(5)
    a = sde_step(v, x, 0.7, 0.6, "flow", 0.7)
    torch.manual_seed(5)
    b = sde_step(v, x, 0.7, 0.6, "flow", 0.7)
    assert torch.equal(a.prev_sample, b.prev_sample)


def test_kernel_normals_match_exact_box_muller(kernel_backend):
    """The same Philox integers: normals within a few fp32 ulp of exact Box-Muller on them."""
    name, device = kernel_backend
    for seed, offset in ((0, 0), (2**40 + 17, 2**33 + 5)):
        z = philox_normal((300_001,), seed, offset, device=device).cpu().double()
        want = R.philox_normal(300_001, seed, offset)
        err = (z - want).abs() / want.abs().clamp_min(1.0)
        assert float(err.max()) < 8 * torch.finfo(torch.float32).eps, (seed, offset, float(err.max()))


@pytest.mark.skipif(len(KERNEL_BACKENDS) < 2, reason="needs two kernel backends")
def test_backends_agree_on_noise():
    """CPU, CUDA (and Triton, which uses the same stream) draw the same normals to a few ulp."""
    draws = []
    for name, device in KERNEL_BACKENDS:
        flowsteer.set_backend(name)
        draws.append(philox_normal((3, 1001), 7, 11, device=device).cpu())
    for other in draws[1:]:
        err = (other - draws[0]).abs() / draws[0].abs().clamp_min(1.0)
        assert float(err.max()) <= 4 * torch.finfo(torch.float32).eps


def test_cpu_instruction_sets_give_the_same_bits():
    """The generic and the AVX2 builds of the CPU kernels draw and step identically."""
    import os
    import subprocess
    import sys

    C = flowsteer.ops.backends.extension()
    if C is None or C.cpu_isa == "generic":
        pytest.skip("this build or processor has only the generic CPU kernels")
    code = (
        "import sys, torch, flowsteer\n"
        "v = torch.randn(3, 5, 33, 17, generator=torch.Generator().manual_seed(0))\n"
        "out = flowsteer.ops.sde_step(v, v * 0.5, 0.8, 0.7, 'flow', 0.7, seed=2**40 + 3, offset=9)\n"
        "torch.save((flowsteer.ops.backends.extension().cpu_isa, out.prev_sample, out.log_prob), sys.argv[1])\n"
    )
    results = []
    for isa in ("generic", "auto"):
        env = dict(os.environ, FLOWSTEER_CPU_ISA=isa)
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"flowsteer_isa_{isa}_{os.getpid()}.pt")
        subprocess.run([sys.executable, "-c", code, path], env=env, check=True, timeout=300)
        results.append(torch.load(path))
        os.remove(path)
    (isa_a, sample_a, lp_a), (isa_b, sample_b, lp_b) = results
    assert (isa_a, isa_b) == ("generic", "avx2")
    assert torch.equal(sample_a, sample_b) and torch.equal(lp_a, lp_b)

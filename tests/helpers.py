"""One comparison helper for every test against the fp64 reference."""
from __future__ import annotations

import torch

# fp32 epsilon: the floor of every tolerance. The kernels evaluate the step in an algebraically
# rearranged order (mean = cx * x + cv * v), so they may differ from the reference's own fp32
# evaluation by a few ulp of the largest term even where the reference's error happens to be 0.
FP32_EPS = torch.finfo(torch.float32).eps


def reference_error(ref_lowp: torch.Tensor, ref64: torch.Tensor) -> float:
    return float((ref_lowp.double() - ref64.double()).abs().max()) if ref64.numel() else 0.0


def assert_close(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None = None,
                 ulps: float = 16.0, factor: float = 2.0) -> None:
    """|got - ref64| <= factor * |ref_lowp - ref64|_max + ulps * eps_fp32 * max(1, |ref64|_max).

    ref_lowp is the reference computed the way the kernel computes (fp32 math, outputs rounded to
    the kernel's storage dtype): flash-attention's rule, "at most twice the reference's own error".
    Prints the max and mean error and the first index that fails.
    """
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    got64, ref64 = got.detach().double().cpu(), ref64.detach().double().cpu()
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    tol = ulps * FP32_EPS * scale
    if ref_lowp is not None:
        tol += factor * reference_error(ref_lowp.detach().cpu(), ref64)
    err = (got64 - ref64).abs()
    bad = ~(err <= tol)  # NaN (a poisoned, unwritten output) counts as bad
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: max err {float(err.nan_to_num(float('inf')).max()):.3e}, mean err {float(err.nan_to_num(0).mean()):.3e}, "
            f"tol {tol:.3e}; first bad index {first}: got {float(got64[first])}, ref {float(ref64[first])}"
        )

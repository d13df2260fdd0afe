import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. This must be set
# before flowsteer imports its Triton kernels (lazily, at first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flowsteer  # noqa: E402
from flowsteer.ops import backends as _backend  # noqa: E402
from flowsteer.ops.backends import _common  # noqa: E402


def available_backends():
    """(backend, device) pairs this machine can run, the pure-torch reference included."""
    out = [("torch", "cpu")]
    C = _backend.extension()
    if C is not None:
        out.append(("cpu", "cpu"))
    if _backend.triton_module("sde_step") is not None:
        out.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available() and C is not None and C.has_cuda:
        out.append(("cuda", "cuda"))
    return out


BACKENDS = available_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b[0] != "torch"]


@pytest.fixture(autouse=True)
def _poison_and_reset():
    _common.POISON_OUTPUTS = True
    yield
    _common.POISON_OUTPUTS = False
    flowsteer.set_backend("auto")


@pytest.fixture(params=BACKENDS, ids=[b for b, _ in BACKENDS])
def backend(request):
    name, device = request.param
    flowsteer.set_backend(name)
    return name, torch.device(device)


@pytest.fixture(params=KERNEL_BACKENDS, ids=[b for b, _ in KERNEL_BACKENDS])
def kernel_backend(request):
    name, device = request.param
    flowsteer.set_backend(name)
    return name, torch.device(device)

"""Backend selection, backend_info, and importing without the extension or Triton."""
import os
import subprocess
import sys

import pytest
import torch

import flowsteer


def test_backend_info_reports_what_was_found():
    info = flowsteer.backend_info()
    for key in ("backend", "extension", "cpu_kernels", "cuda_kernels", "cuda_archs", "triton", "torch", "cpu_pick"):
        assert key in info
    assert info["cpu_pick"] == ("cpu" if info["extension"] else "torch")


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of auto, cuda, triton, cpu, torch"):
        flowsteer.set_backend("metal")


def test_named_backend_that_cannot_run_says_why():
    flowsteer.set_backend("cuda")
    v = torch.randn(2, 3)
    if torch.cuda.is_available():
        match = "backend 'cuda' runs CUDA tensors"
    else:
        match = "backend 'cuda'"
    with pytest.raises((RuntimeError, ValueError), match=match):
        flowsteer.ops.sde_step(v, v, 0.5, 0.4, seed=1)


def _run_isolated(code: str, env_extra=None) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in {blocked}:
            raise ImportError("blocked for the test: " + name)
sys.meta_path.insert(0, Block())
"""


def test_import_without_extension_or_triton_uses_the_reference():
    code = BLOCK.format(blocked=repr({"flowsteer._C", "triton"})) + """
import torch, flowsteer
info = flowsteer.backend_info()
assert info["extension"] is False and info["triton"] is None and info["cpu_pick"] == "torch", info
v = torch.randn(2, 3, 4)
out = flowsteer.ops.sde_step(v, v, 0.5, 0.4, "flow", 0.7, seed=3)
ref = flowsteer.ops.reference.philox_normal(24, 3).reshape(2, 3, 4)
assert out.log_prob.shape == (2,)
print("ok")
"""
    assert _run_isolated(code).strip() == "ok"


def test_environment_variable_picks_the_backend():
    code = "import flowsteer; print(flowsteer.get_backend(), flowsteer.backend_info()['cpu_pick'])"
    assert _run_isolated(code, {"FLOWSTEER_BACKEND": "torch"}).split() == ["torch", "torch"]


def test_auto_on_cuda_prefers_triton_then_the_cuda_kernels(monkeypatch):
    """The choice for CUDA tensors, made without a GPU: Triton when it imports (measured faster on an
    H100), else the CUDA kernels of _C, else the reference."""
    from flowsteer.ops import backends as _backend

    class WithCuda:
        has_cuda = True

    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "extension", lambda: WithCuda())
    monkeypatch.setattr(_backend, "triton_module", lambda name: object())
    assert _backend.resolve(cuda) == "triton"
    monkeypatch.setattr(_backend, "triton_module", lambda name: None)
    assert _backend.resolve(cuda) == "cuda"
    monkeypatch.setattr(_backend, "extension", lambda: None)
    assert _backend.resolve(cuda) == "torch"


def _fresh_extension(monkeypatch, loader):
    """_backend.extension() as a new process would see it, with flowsteer._C loaded by `loader`."""
    from flowsteer.ops import backends as _backend

    monkeypatch.setattr(_backend, "_cache", {})
    real = _backend.importlib.import_module
    monkeypatch.setattr(_backend.importlib, "import_module",
                        lambda name, *a: loader() if name == "flowsteer._C" else real(name, *a))
    return _backend


def test_a_stale_extension_is_refused_with_the_fix(monkeypatch):
    class Stale:  # an _C left behind by an older flowsteer
        abi_version = 1
        has_cuda = False

    _backend = _fresh_extension(monkeypatch, lambda: Stale())
    assert _backend.extension() is None
    assert "stale" in _backend._cache["_C_error"] and "reinstall" in _backend._cache["_C_error"]
    flowsteer.set_backend("cpu")
    with pytest.raises(RuntimeError, match="stale.*reinstall"):
        _backend.resolve(torch.device("cpu"))


def test_a_loader_error_falls_back_with_one_warning(monkeypatch):
    def broken():
        raise OSError("libgomp.so.1: cannot open shared object file")

    _backend = _fresh_extension(monkeypatch, broken)
    flowsteer.set_backend("auto")
    with pytest.warns(RuntimeWarning, match="could not be used.*libgomp.*on-policy ratio"):
        assert _backend.resolve(torch.device("cpu")) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve(torch.device("cpu")) == "torch"  # once per process
    assert "libgomp" in _backend.backend_info()["fallback"]
    flowsteer.set_backend("torch")  # still usable by name
    v = torch.randn(2, 3)
    assert flowsteer.ops.sde_step(v, v, 0.5, 0.4, "flow", 0.7, seed=1).log_prob.shape == (2,)

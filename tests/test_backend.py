"""Backend resolution (kernels/registry.py): explicit names, auto per op, device and dtype, clear errors."""
import pytest
import torch

from unidd_fast.kernels import registry as backend
from unidd_fast.errors import ConfigError


def test_auto_on_cpu_is_torch():
    assert backend.resolve("site_stats", "auto", "cpu") == "torch"
    assert backend.resolve("regularized_inverse", None, "cpu") == "torch"


def test_auto_on_cuda_follows_the_per_op_order(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(backend, "cuda_extension_available", lambda: True)
    assert backend.resolve("site_stats", "auto", "cuda") == "triton"
    assert backend.resolve("regularized_inverse", "auto", "cuda") == "cuda"
    monkeypatch.setattr(backend, "cuda_extension_available", lambda: False)
    assert backend.resolve("regularized_inverse", "auto", "cuda") == "triton"
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert backend.resolve("site_stats", "auto", "cuda") == "torch"


def test_env_and_errors(monkeypatch):
    monkeypatch.setenv("UNIDD_BACKEND", "torch")
    assert backend.resolve("site_stats", None, "cpu") == "torch"
    with pytest.raises(ConfigError, match="unknown backend"):
        backend.resolve("site_stats", "fast", "cpu")
    monkeypatch.setattr(backend, "cuda_extension_available", lambda: False)
    with pytest.raises(ConfigError, match="UNIDD_BUILD_CUDA"):
        backend.resolve("site_stats", "cuda", torch.device("cpu"))


def test_float64_goes_to_a_backend_that_computes_in_it(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(backend, "cuda_extension_available", lambda: True)
    assert backend.resolve("regularized_inverse", "auto", "cuda", torch.float64) == "triton"
    assert backend.resolve("regularized_inverse", "cuda", "cuda", torch.float64) == "torch"
    assert backend.resolve("regularized_inverse", "cuda", "cuda", torch.bfloat16) == "cuda"
    assert not backend.BACKENDS["cuda"].supports("cuda", torch.float64)
    assert backend.BACKENDS["torch"].supports("cpu", torch.float64)


def test_triton_launch_runs_on_the_tensors_device(monkeypatch):
    """A launch enters torch.cuda.device of its first CUDA tensor (not the current device)."""
    from types import SimpleNamespace

    from unidd_fast.kernels.triton import launch as launch_mod

    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    seen = []
    kernel = {(1,): lambda *args, **meta: seen.append(list(entered))}
    on_gpu1 = SimpleNamespace(device=torch.device("cuda", 1))
    launch_mod.launch(kernel, (1,), 3, on_gpu1, BLOCK=4)
    assert seen == [[torch.device("cuda", 1)]]
    launch_mod.launch(kernel, (1,), torch.zeros(2), BLOCK=4)  # CPU (interpreter): no guard
    assert len(entered) == 1

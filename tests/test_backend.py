"""Backend resolution: explicit names, auto per op and device, clear errors."""
import pytest
import torch

from unidd_fast import backend
from unidd_fast.errors import ConfigError


def test_auto_on_cpu_is_torch():
    assert backend.resolve_backend("auto", "cpu") == "torch"
    assert backend.resolve_backend(None, "cpu", "regularized_inverse") == "torch"


def test_auto_on_cuda_follows_the_per_op_order(monkeypatch):
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    monkeypatch.setattr(backend, "cuda_extension_available", lambda: True)
    assert backend.resolve_backend("auto", "cuda", "site_stats") == "triton"
    assert backend.resolve_backend("auto", "cuda", "regularized_inverse") == "cuda"
    monkeypatch.setattr(backend, "cuda_extension_available", lambda: False)
    assert backend.resolve_backend("auto", "cuda", "regularized_inverse") == "triton"
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert backend.resolve_backend("auto", "cuda", "site_stats") == "torch"


def test_env_and_errors(monkeypatch):
    monkeypatch.setenv("UNIDD_BACKEND", "torch")
    assert backend.resolve_backend(None, "cpu") == "torch"
    with pytest.raises(ConfigError, match="unknown backend"):
        backend.resolve_backend("fast", "cpu")
    monkeypatch.setattr(backend, "cuda_extension_available", lambda: False)
    with pytest.raises(ConfigError, match="UNIDD_BUILD_CUDA"):
        backend.resolve_backend("cuda", torch.device("cpu"))

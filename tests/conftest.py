"""Test-wide settings. There is no GPU on build machines: Triton kernels run in the CPU
interpreter, which must be chosen before triton is first imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: random but reproducible inputs."""
    return torch.Generator().manual_seed(torch.initial_seed() % (2**31) + 12345)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Stages may set torch's thread count (config ``threads``); no test leaks it into the next."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

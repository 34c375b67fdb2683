"""Test-wide settings. There is no GPU on build machines: Triton kernels run in the CPU
interpreter, which must be chosen before triton is first imported."""
import hashlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def gen(request):
    """A fresh generator per test, seeded from the test's own node id: random but
    reproducible inputs that do not depend on which tests ran before (``pytest -k one``
    sees what the full run sees)."""
    digest = hashlib.sha256(request.node.nodeid.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@pytest.fixture(autouse=True)
def _restore_threads():
    """Stages may set torch's thread count (config ``threads``); no test leaks it into the next."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """(squeeze, stats) run directories of ``_tiny_runs.squeeze_and_stats``, made once per
    session and shared by the resume and torchrun tests, which only read them."""
    from _tiny_runs import squeeze_and_stats

    return squeeze_and_stats(tmp_path_factory.mktemp("tiny"))

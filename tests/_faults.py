"""An injected faulty fused-op backend for the doctor and pre-flight tests: its site statistics
are 1 % off, its inverse raises, its statistics backward is the torch one."""
from unidd_fast.kernels import composite, registry


def off_by_one_percent(feat):
    psi, mu, pooled = composite.site_stats(feat)
    return psi * 1.01, mu, pooled


def raising_inverse(A, beta, names=None, check=True):
    raise RuntimeError("injected launch failure")


def install(monkeypatch) -> None:
    """Register backend "faulty" for the duration of the test."""
    backend = registry.Backend("faulty", lambda: True, "", lambda device: True, "",
                               {"site_stats": (__name__, "off_by_one_percent"),
                                "site_stats_grad": (".composite", "site_stats_grad"),
                                "regularized_inverse": (__name__, "raising_inverse")})
    monkeypatch.setitem(registry.BACKENDS, "faulty", backend)

"""Injected faults for the doctor and pre-flight tests: a faulty fused-op backend (its site
statistics are 1 % off, its inverse raises, its statistics backward is the torch one), and
faulty recover-step features (``faulty_step_features``)."""
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


def faulty_step_features(monkeypatch, wrong=(), raising=(), cuda=False) -> None:
    """Make the step-feature checks (``stepcheck.build_engine``) of the features named in
    ``wrong`` return an image update twice the true one, and those in ``raising`` raise
    "injected capture failure" (``stepcheck.FEATURES`` names). ``cuda``: pretend the device
    is a GPU: the CUDA-only features apply and the run uses them
    (``preflight.resolve_options``); capturable Adam, which torch refuses on the CPU, is then
    emulated by the ordinary Adam and graphs by the eager step."""
    import dataclasses

    from unidd_fast.pipeline import preflight, stepcheck
    from unidd_fast.pipeline.step import RecoverEngine

    class DoubledUpdate(RecoverEngine):
        def run(self, init, targets, desc="iterations"):
            images, ce, reg = super().run(init, targets, desc)
            return 2 * images - init.to(images.device), ce, reg

    def build_engine(model, regularizer, rc, augment, generator, lo, hi, options):
        used = {f.name for f in stepcheck.FEATURES if f.used(options)}
        if used & set(raising):
            raise RuntimeError(f"injected capture failure ({', '.join(sorted(used & set(raising)))})")
        if cuda:
            options = dataclasses.replace(options, cuda_graphs=False, capturable=False)
        engine = DoubledUpdate if used & set(wrong) else RecoverEngine
        return engine(model, regularizer, rc, augment, generator, lo, hi, options)

    monkeypatch.setattr(stepcheck, "build_engine", build_engine)
    if cuda:
        monkeypatch.setattr(stepcheck, "applicable", lambda feature, device: True)
        real = preflight.resolve_options

        def resolve_options(rc, device):
            graphs = rc.cuda_graphs != "off"
            return dataclasses.replace(real(rc, device), cuda_graphs=graphs, capturable=graphs)

        monkeypatch.setattr(preflight, "resolve_options", resolve_options)

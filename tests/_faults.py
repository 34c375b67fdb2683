"""Injected faults for the doctor and pre-flight tests: a faulty fused-op backend (its site
statistics are 1 % off, its inverse raises, its statistics backward is the torch one), and
faulty recover-step features (``faulty_step_features``); and ``step_case``, a tiny case for
the step-feature checks."""
import torch

from unidd_fast.kernels import composite, registry


def off_by_one_percent(feat):
    psi, mu, pooled = composite.site_stats(feat)
    return psi * 1.01, mu, pooled


def off_in_bf16(feat):
    """Right for float32 maps, 10 % off for bf16 ones (a fault only a bf16 run meets; bf16's
    tolerance is 3e-2)."""
    psi, mu, pooled = composite.site_stats(feat)
    return (psi * 1.1 if feat.dtype == torch.bfloat16 else psi), mu, pooled


def raising_inverse(A, beta, names=None, check=True):
    raise RuntimeError("injected launch failure")


def install(monkeypatch, broken: bool = True, bf16_only: bool = False) -> None:
    """Register backend "faulty" for the duration of the test; ``broken=False``: under that
    name, the torch backend's correct ops (a rank where the fault does not show);
    ``bf16_only``: only its site statistics of bf16 maps are wrong (10 %)."""
    ops = ({"site_stats": (__name__, "off_by_one_percent"), "site_stats_grad": (".composite", "site_stats_grad"),
            "regularized_inverse": (__name__, "raising_inverse")} if broken else registry.BACKENDS["torch"].ops)
    if bf16_only:
        ops = dict(registry.BACKENDS["torch"].ops, site_stats=(__name__, "off_in_bf16"))
    backend = registry.Backend("faulty", lambda: True, "", lambda device: True, "", ops)
    monkeypatch.setitem(registry.BACKENDS, "faulty", backend)


def faulty_step_features(monkeypatch, wrong=(), raising=(), together=(), cuda=False) -> None:
    """Make the step-feature checks (``stepcheck.build_engine``) of the features named in
    ``wrong`` return an image update twice the true one, and those in ``raising`` raise
    "injected capture failure" (``stepcheck.FEATURES`` names); an engine with all the
    features of ``together`` on (an interaction fault: each alone is right) doubles the
    update as well. ``cuda``: pretend the device
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
        engine = DoubledUpdate if used & set(wrong) or (together and used >= set(together)) else RecoverEngine
        return engine(model, regularizer, rc, augment, generator, lo, hi, options)

    monkeypatch.setattr(stepcheck, "build_engine", build_engine)
    if cuda:
        monkeypatch.setattr(stepcheck, "applicable", lambda feature, device: True)
        real = preflight.resolve_options

        def resolve_options(rc, device):
            graphs = rc.cuda_graphs != "off"
            return dataclasses.replace(real(rc, device), cuda_graphs=graphs, capturable=graphs)

        monkeypatch.setattr(preflight, "resolve_options", resolve_options)


def step_case(gen, rc):
    """A stepcheck case on a one-block ConvNet with real statistics of random images."""
    from unidd_fast import collect_real_stats
    from unidd_fast.pipeline.models import build_model
    from unidd_fast.pipeline.recover import step_case as run_case

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = build_model("convnet", 3, 8, channels=2, width=6, depth=1).eval().requires_grad_(False)
    data = [(torch.randn(8, 2, 8, 8, generator=gen), torch.arange(8) % 3) for _ in range(2)]
    stats = collect_real_stats(model, data, 3, show_progress=False)
    return run_case(model, stats, rc, True, (0.5, 0.4), (0.25, 0.2), (2, 8, 8), 3, "cpu")

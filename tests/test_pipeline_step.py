"""The recover step and RecoverEngine: same result as the plain loop, deterministic given a
generator, graph-safe CFMLoss state (β_t, b, EMU in device tensors) equal to the Python-number
state, no host synchronisation in the step, bf16 autocast within bf16 tolerance, options.

CUDA graphs cannot run here; the function they capture (RecoverEngine._iteration with a
graph-safe regulariser) is the one these tests run eagerly on the CPU."""
import contextlib
import copy
import math

import pytest
import torch

from unidd_fast import CFMLoss, collect_real_stats, ops
from unidd_fast.kernels import _utils as kernel_utils
from unidd_fast.errors import ConfigError, NonFiniteError
from unidd_fast.pipeline.augment import Augment, make_augment
from unidd_fast.pipeline.config import RecoverConfig
from unidd_fast.pipeline.models import build_model
from unidd_fast.pipeline.recover import pixel_bounds
from unidd_fast.pipeline.sre2l_loss import BNMatchLoss
from unidd_fast.pipeline.step import RecoverEngine, StepOptions, recover_step, resolve_options
from unidd_fast.pipeline.train import lr_at, set_lr

AUG = make_augment("recover", 0.5, 0.125)
LO, HI = pixel_bounds((0.5, 0.4), (0.25, 0.2), "cpu")


def _teacher(gen, dtype=torch.float32):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = build_model("convnet", 3, 8, channels=2, width=6, depth=2).to(dtype)
    model.train()
    with torch.no_grad():  # non-trivial running statistics, logits that respond to the images
        for _ in range(3):
            model(torch.randn(16, 2, 8, 8, generator=gen, dtype=dtype) * 1.5 + 0.3)
        model.classifier.weight.mul_(20)
    return model.eval().requires_grad_(False)


def _stats(model, gen, dtype=torch.float32):
    data = [(torch.randn(8, 2, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(2)]
    return collect_real_stats(model, data, 3)


def _plain_loop(model, reg, rc, inits, targets, seed):
    """The obvious implementation: fresh Adam per class-batch, Python-float cosine lr."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b, init in enumerate(inits):
        reg.set_curriculum(b, len(inits))
        images = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([images], lr=rc.lr, betas=tuple(rc.betas))
        for it in range(rc.iterations):
            set_lr(opt, lr_at(rc.lr, it, rc.iterations))
            ce, r = recover_step(images, targets[b], model, reg, opt, AUG, gen, LO, HI)
        reg.next_batch()
        out.append((images.detach(), ce, r))
    return out


def _engine_run(model, reg, rc, inits, targets, seed, **kw):
    engine = RecoverEngine(model, reg, rc, AUG, torch.Generator().manual_seed(seed), LO, HI, **kw)
    out = []
    for b, init in enumerate(inits):
        reg.set_curriculum(b, len(inits))
        out.append(engine.run(init, targets[b]))
        reg.next_batch()
    return out


@pytest.mark.parametrize("graph_safe", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_engine_matches_the_plain_loop_across_class_batches(gen, graph_safe, channels_last):
    model = _teacher(gen)
    stats = _stats(model, gen)
    rc = RecoverConfig(iterations=4, lr=0.05)
    # three class-batches of two shapes: the engine keeps one set of buffers per shape
    inits = [torch.randn(k, 2, 8, 8, generator=gen) for k in (3, 3, 2)]
    targets = [torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), torch.tensor([1, 2])]
    cfm = CFMLoss(model, stats, beta=0.5)
    want = _plain_loop(model, cfm, rc, inits, targets, seed=7)
    cfm.remove()
    cfm = CFMLoss(model, stats, beta=0.5)
    got = _engine_run(model, cfm, rc, inits, targets, seed=7,
                      options=StepOptions(channels_last=channels_last), graph_safe=graph_safe)
    cfm.remove()
    assert cfm.b == 4 and cfm.graph_safe == graph_safe
    for (wi, wce, wreg), (gi, gce, greg) in zip(want, got):
        # the engine's learning rate is a float32 device tensor, the loop's a Python float:
        # Adam steps differ by fp32 rounding (~1e-7 relative) per iteration
        torch.testing.assert_close(gi, wi, rtol=0, atol=2e-5)
        torch.testing.assert_close(gce, wce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(greg, wreg, rtol=1e-5, atol=1e-6)


def test_engine_is_deterministic_given_a_generator(gen):
    model = _teacher(gen)
    rc = RecoverConfig(iterations=3, lr=0.1)
    inits, targets = [torch.randn(3, 2, 8, 8, generator=gen)], [torch.tensor([0, 1, 2])]
    runs = [_engine_run(model, BNMatchLoss(model), rc, inits, targets, seed)[0][0] for seed in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])  # another seed draws other augmentations


def test_graph_safe_cfm_state_equals_python_numbers(gen):
    """β_t and b as 0-d float64 device tensors, EMU means in buffers folded in place: the
    same losses and gradients as Python floats, in float64, over a curriculum of batches,
    and after a state_dict round trip."""
    model = _teacher(gen, torch.float64)
    stats = _stats(model, gen, torch.float64)
    x = [torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    y = torch.tensor([0, 1, 2])
    plain, safe = CFMLoss(model, stats, beta=0.3), CFMLoss(model, stats, beta=0.3)
    safe.make_graph_safe()
    assert safe._beta_dev.dtype == torch.float64 and safe._beta_dev.dim() == 0

    def loss_and_grad(cfm, xb):
        cfm.enabled = True
        model(xb)
        value = cfm(y)
        (grad,) = torch.autograd.grad(value, xb)
        cfm.enabled = False
        return value.detach(), grad

    for b, xb in enumerate(x):
        for cfm in (plain, safe):
            cfm.set_curriculum(b, len(x))
        (lp, gp), (ls, gs) = loss_and_grad(plain, xb), loss_and_grad(safe, xb)
        # same operations on the same float64 values; only the scalar's route differs
        torch.testing.assert_close(ls, lp, rtol=1e-13, atol=0)
        torch.testing.assert_close(gs, gp, rtol=1e-12, atol=1e-15)
        outputs = safe.graph_outputs()  # what a replayed graph refreshes in place
        for cfm in (plain, safe):
            cfm.next_batch()
        assert float(safe.emu._b_dev) == safe.b == plain.b
        assert not safe.batch_statistics() and outputs  # next_batch consumed them; a replay would not set them again
        safe.set_graph_outputs(outputs)
        assert safe.batch_statistics().keys() == outputs.keys()
        safe.set_graph_outputs({})
    state = plain.state_dict()
    assert set(safe.state_dict()) == set(state)
    buffers = {d: tuple(t.data_ptr() for t in pair) for d, pair in safe.emu.means.items()}
    safe.load_state_dict({k: v.clone() for k, v in state.items()})
    assert {d: tuple(t.data_ptr() for t in pair) for d, pair in safe.emu.means.items()} == buffers  # in place
    for cfm in (plain, safe):
        cfm.set_curriculum(1, 4)
    torch.testing.assert_close(loss_and_grad(safe, x[0])[0], loss_and_grad(plain, x[0])[0], rtol=1e-13, atol=0)
    plain.remove()
    safe.remove()


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """Fail on every Python-level device-to-host read (what a CUDA-graph capture forbids),
    pretending the stream is being captured. torch's CPU Adam is exempt: on CUDA the engine
    uses the capturable Adam, which reads nothing."""
    import inspect

    def trap(name, original):
        def wrapper(*args, **kwargs):
            if not any("/torch/optim/" in frame.filename for frame in inspect.stack()[1:6]):
                raise AssertionError(f"host sync in the step: Tensor.{name}")
            return original(*args, **kwargs)
        return wrapper

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, trap(name, getattr(torch.Tensor, name)))
        patch.setattr(torch, "nonzero", trap("nonzero", torch.nonzero))
        patch.setattr(kernel_utils, "capturing", lambda t: True)
        yield


@pytest.mark.parametrize("loss", ["cfm", "sre2l"])
def test_the_captured_iteration_reads_nothing_from_the_device(gen, monkeypatch, loss):
    model = _teacher(gen)
    reg = CFMLoss(model, _stats(model, gen), beta=0.5) if loss == "cfm" else BNMatchLoss(model)
    rc = RecoverConfig(iterations=3, lr=0.05)
    engine = RecoverEngine(model, reg, rc, AUG, torch.Generator().manual_seed(0), LO, HI, graph_safe=True,
                           check_every=3)
    init, targets = torch.randn(3, 2, 8, 8, generator=gen), torch.tensor([0, 2, 1])
    engine.run(init, targets)  # warm-up: buffers exist, as after a capture's warm-up steps
    reg.next_batch()
    slot = engine._slots[tuple(init.shape)]
    slot.reset(init, targets)
    with no_host_sync(monkeypatch):
        for _ in range(2):
            ce, r = engine._iteration(slot)
    assert torch.isfinite(ce) and torch.isfinite(r) and r > 0 and int(slot.it) == 2
    reg.remove()


def test_bf16_autocast_stays_within_bf16_tolerance_and_keeps_statistics_fp32(gen):
    model = _teacher(gen)
    stats = _stats(model, gen)
    feat = torch.randn(4, 6, 5, 3, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ops.site_stats(feat, "torch")
    for a, b in zip(inside, ops.site_stats(feat, "torch")):  # autocast must not reach the Gram
        assert a.dtype == torch.float32 and torch.equal(a, b)
    rc = RecoverConfig(iterations=1, lr=0.05)
    inits, targets = [torch.randn(3, 2, 8, 8, generator=gen)], [torch.tensor([0, 1, 2])]
    values = {}
    for precision in ("fp32", "bf16"):
        cfm = CFMLoss(model, stats, beta=0.5)
        _, ce, r = _engine_run(model, cfm, rc, inits, targets, 3, options=StepOptions(precision=precision))[0]
        values[precision] = (ce, r)
        cfm.remove()
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per operation); through a
    # two-block ConvNet the teacher's outputs move by a few 1e-2 relative at most
    for got, want in zip(values["bf16"], values["fp32"]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=1e-3)
        assert not torch.equal(got, want)  # autocast was on


def test_compiled_teacher_keeps_the_hooks(gen):
    """torch.compile of the teacher (backend "eager": dynamo tracing without code generation,
    fast enough for a test) still feeds every site to the regulariser: same result, also
    after another instance of the same class was compiled without hooks."""
    model = _teacher(gen)
    stats = _stats(model, gen)
    rc = RecoverConfig(iterations=2, lr=0.05)
    hookless = RecoverEngine(copy.deepcopy(model), None, rc, AUG, None, LO, HI, StepOptions(compile=True),
                             compile_backend="eager")
    hookless.run(torch.randn(3, 2, 8, 8, generator=gen), torch.tensor([0, 1, 2]))
    # two class-batches: next_batch() between them must not detach the compiled hooks' state
    inits = [torch.randn(3, 2, 8, 8, generator=gen) for _ in range(2)]
    targets = [torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])]
    results = []
    for compiled in (False, True):
        cfm = CFMLoss(model, stats, beta=0.5)
        results.append(_engine_run(model, cfm, rc, inits, targets, 3, options=StepOptions(compile=compiled),
                                   compile_backend="eager"))
        assert cfm.step == 4
        cfm.remove()
    for want, got in zip(*results):
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_images_are_reported_with_their_iteration(gen):
    model = _teacher(gen)
    rc = RecoverConfig(iterations=3, lr=0.05)
    identity = Augment(scale=(1, 1), ratio=(1, 1), shift=0.0, flip=False)  # every pixel reaches the loss
    engine = RecoverEngine(model, None, rc, identity, None, LO, HI, check_every=3)
    init = torch.randn(3, 2, 8, 8, generator=gen)
    init[1, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"iteration 1/3: the loss"):
        engine.run(init, torch.tensor([0, 1, 2]))


def test_zero_iterations_return_the_initial_images(gen):
    model = _teacher(gen)
    engine = RecoverEngine(model, None, RecoverConfig(iterations=0), AUG, None, LO, HI)
    init = torch.randn(2, 2, 8, 8, generator=gen)
    images, ce, r = engine.run(init, torch.tensor([0, 1]))
    assert torch.equal(images, init) and math.isnan(float(ce)) and math.isnan(float(r))


def test_options_resolve_per_device_and_refuse_graphs_without_cuda():
    rc = RecoverConfig()
    assert resolve_options(rc, "cpu") == StepOptions(precision="fp32", cuda_graphs=False, compile=False)
    rc.precision, rc.compile = "bf16", True
    assert resolve_options(rc, "cpu") == StepOptions(precision="bf16", cuda_graphs=False, compile=True)
    rc.cuda_graphs = "on"
    with pytest.raises(ConfigError, match="--cuda-graphs on needs a CUDA device"):
        resolve_options(rc, "cpu")
    rc.cuda_graphs, rc.precision = "off", "fp16"
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_options(rc, "cpu")
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        RecoverEngine(torch.nn.Conv2d(1, 1, 1), None, RecoverConfig(), AUG, None, LO, HI,
                      options=StepOptions(cuda_graphs=True))

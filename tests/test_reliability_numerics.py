"""NaN/Inf and non-positive-definite matrices stop a run at the step they appear, naming the
stage, the class-batch or epoch, the iteration and (for features) the site."""
import pytest
import torch
from torch import nn

from unidd_fast import CFMLoss, collect_real_stats
from unidd_fast.cli import main
from unidd_fast.errors import NonFiniteError, NotPositiveDefiniteError
from unidd_fast.kernels import _utils as kernel_utils
from unidd_fast.kernels import composite, registry
from unidd_fast.pipeline.augment import Augment
from unidd_fast.pipeline.config import RecoverConfig
from unidd_fast.pipeline.datasets import Batches, TensorImages
from unidd_fast.pipeline.models import build_model, load_teacher, save_teacher
from unidd_fast.pipeline.recover import pixel_bounds, plan_class_batches, recover_class_batch, recover_set
from unidd_fast.pipeline.step import RecoverEngine, raise_if_not_finite
from unidd_fast.pipeline.train import fit
from unidd_fast.regularizer import Regularizer

IDENTITY = Augment(scale=(1, 1), ratio=(1, 1), shift=0.0, flip=False)
LO, HI = pixel_bounds((0.5, 0.5), (0.25, 0.25), "cpu")


def _teacher(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = build_model("convnet", 3, 8, channels=2, width=6, depth=1)
    with torch.no_grad():
        model(torch.randn(16, 2, 8, 8, generator=gen))  # non-trivial BN running statistics
    return model.eval().requires_grad_(False)


class PoisonAt(Regularizer):
    """A regulariser that is 0 except for NaN at its ``at``-th call (1-based); counts calls."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, targets):
        self.calls += 1
        return torch.tensor(float("nan") if self.calls == self.at else 0.0)


def _set(model, reg, rc, gen, init=None):
    plan = plan_class_batches(3, ipc=2, batch_size=2)  # 4 class-batches
    init = init or (lambda cb: torch.randn(len(cb.classes), 2, 8, 8, generator=gen))
    recover_set(model, reg, plan, init, rc, 2, IDENTITY, gen, LO, HI, lambda *a: None)


def test_nan_loss_names_the_class_batch_and_iteration(gen):
    reg = PoisonAt(5 + 3)  # class-batch 2 (5 iterations each), iteration 3
    with pytest.raises(NonFiniteError) as info:
        _set(_teacher(gen), reg, RecoverConfig(iterations=5, lr=0.05), gen)
    message = str(info.value)
    assert message.startswith("recover, class-batch 2/4 (ipc index 0, classes 2..2), iteration 3/5: the loss")
    assert reg.calls == 8  # on the CPU the check runs every step: it stopped at once


def test_gpu_style_check_every_n_steps_still_names_the_first_bad_iteration(gen):
    reg = PoisonAt(2)
    images = torch.randn(3, 2, 8, 8, generator=gen)
    with pytest.raises(NonFiniteError, match=r"iteration 2/10: the loss"):
        recover_class_batch(images, torch.arange(3), _teacher(gen), reg, RecoverConfig(iterations=10, lr=0.05),
                            IDENTITY, gen, LO, HI, check_every=4)
    assert reg.calls == 4  # read back after 4 steps, without a sync per step


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient poisons the images."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class PoisonGradient(nn.Module):
    def forward(self, x):
        return NaNGradient.apply(x)


def test_nan_images_from_the_update_are_caught(gen):
    model = nn.Sequential(PoisonGradient(), _teacher(gen))
    # the loss of iteration 1 is finite; the images after its update are not
    with pytest.raises(NonFiniteError, match=r"iteration 1/3: the synthetic images became NaN/Inf in the update"):
        recover_class_batch(torch.randn(3, 2, 8, 8, generator=gen), torch.arange(3), model, None,
                            RecoverConfig(iterations=3, lr=0.05), IDENTITY, gen, LO, HI)


def _cfm(model, gen, beta=0.1):
    data = [(torch.randn(8, 2, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(2)]
    return CFMLoss(model, collect_real_stats(model, data, 3), beta=beta, beta_min=beta, backend="torch")


def test_nan_pixel_names_site_class_batch_and_iteration(gen):
    model = _teacher(gen)
    cfm = _cfm(model, gen)

    def init(cb):
        x = torch.randn(len(cb.classes), 2, 8, 8, generator=gen)
        if cb.index == 1:
            x[0, 1, 3, 4] = float("nan")
        return x

    with pytest.raises(NonFiniteError) as info:
        _set(model, cfm, RecoverConfig(iterations=2, lr=0.05), gen, init)
    cfm.remove()
    message = str(info.value)
    assert "recover, class-batch 2/4" in message and "iteration 1/2" in message and "features.1" in message


class NotPDAt(PoisonAt):
    """Raises the inverse's error at its ``at``-th call, as CFMLoss does when a Cholesky fails."""

    def __call__(self, targets):
        self.calls += 1
        if self.calls == self.at:
            raise NotPositiveDefiniteError("(Ψ + βI) is not positive definite at ['features.1'] with β = 0.001: "
                                           "raise beta / beta_min or compute in float64")
        return torch.zeros(())


def test_not_positive_definite_is_re_raised_naming_the_class_batch(gen):
    with pytest.raises(NotPositiveDefiniteError) as info:
        _set(_teacher(gen), NotPDAt(3 * 4 + 2), RecoverConfig(iterations=4, lr=0.05), gen)
    message = str(info.value)
    assert message.startswith("recover, class-batch 4/4 (ipc index 1, classes 2..2), iteration 2/4: (Ψ + βI)")
    assert "features.1" in message and "raise beta" in message


def test_training_loss_nan_names_the_epoch(gen):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), PoisonGradient())  # NaN weights after step 1
    data = TensorImages(torch.rand(12, 1, 2, 2, generator=gen), torch.arange(12) % 3, (0.5,), (0.25,), 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_fn(x, y):
        return nn.functional.cross_entropy(model(x), y)

    with pytest.raises(NonFiniteError, match=r"squeeze: the training loss is nan in epoch 1/3"):
        fit(model, Batches(data, 4), 3, optimizer, lambda step, total: 0.1, loss_fn, "squeeze")


def test_stats_stage_names_the_site_of_a_nan_teacher(tmp_path, capsys):
    from _tiny_runs import squeeze_and_stats

    threads = torch.get_num_threads()
    sq, _ = squeeze_and_stats(tmp_path)
    model, spec = load_teacher(sq / "teacher.safetensors")
    with torch.no_grad():
        model.features[0].weight[0, 0, 1, 1] = float("nan")
    save_teacher(tmp_path / "bad.safetensors", model, spec)
    try:
        assert main(["stats", "--from", str(sq), "--teacher", str(tmp_path / "bad.safetensors"), "--out",
                     str(tmp_path / "st_bad"), "--quiet"]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "stats: NaN/Inf in the input of site 'features.1' at batch 0" in err
    assert not (tmp_path / "st_bad" / "stats.safetensors").exists()


class IndefiniteFrom:
    """The torch inverse, but from its ``at``-th call on the first matrix of each call is
    shifted by −(‖A‖ + β + 1)·I: a real not-positive-definite matrix for the real check."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, A, beta, check=True, names=None):
        self.calls += 1
        if self.calls >= self.at:
            A = A.clone()
            A[0] -= (float(A[0].norm()) + float(beta) + 1) * torch.eye(A.shape[-1], dtype=A.dtype)
        return composite.regularized_inverse(A, beta, check=check, names=names)


indefinite_inverse = IndefiniteFrom(2)


@pytest.mark.parametrize("faked_capture", [False, True])
def test_not_positive_definite_under_graph_capture_is_named_not_a_nan_loss(gen, monkeypatch, faked_capture):
    """Under CUDA-graph capture the factorisation cannot raise (no host read): its info goes
    to the regulariser's device-side status, which the engine reads with the finite flags.
    Capture is faked on the CPU (``capturing`` says yes, as in test_pipeline_step); the
    error names the iteration, the site and β_t, not 'NaN loss, lower recover.lr'."""
    monkeypatch.setattr(indefinite_inverse, "calls", 0)
    monkeypatch.setitem(registry.BACKENDS, "indefinite", registry.Backend(
        "indefinite", lambda: True, "", lambda device: True, "",
        {"site_stats": (".composite", "site_stats"), "site_stats_grad": (".composite", "site_stats_grad"),
         "regularized_inverse": (__name__, "indefinite_inverse")}))
    model = _teacher(gen)
    cfm = _cfm(model, gen)
    cfm.backend = "indefinite"
    engine = RecoverEngine(model, cfm, RecoverConfig(iterations=3, lr=0.05), IDENTITY, gen, LO, HI, graph_safe=True,
                           check_every=3)
    if faked_capture:
        monkeypatch.setattr(kernel_utils, "capturing", lambda t: True)
    with pytest.raises(NotPositiveDefiniteError) as info:
        engine.run(torch.randn(3, 2, 8, 8, generator=gen), torch.tensor([0, 1, 2]))
    cfm.remove()
    message = str(info.value)
    assert message.startswith("iteration 2/3: (Ψ + βI)") and "features.1" in message
    assert "β_t = 0.1" in message if faked_capture else "β = 0.1" in message
    assert "raise beta" in message and "recover.lr" not in message


def test_a_failed_factorisation_is_named_before_the_nan_it_caused():
    finite = torch.ones(4, 3, dtype=torch.bool)
    finite[2:, 0] = False  # NaN loss from iteration 3 on ...
    finite[2, 2] = False   # ... because the factorisation failed there
    with pytest.raises(NotPositiveDefiniteError, match=r"^iteration 3/9: site X$"):
        raise_if_not_finite(finite, 9, lambda: "site X")
    finite[2, 2] = True
    with pytest.raises(NonFiniteError, match=r"^iteration 3/9: the loss"):
        raise_if_not_finite(finite, 9, lambda: "site X")

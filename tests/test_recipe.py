"""Recipe presets (--recipe paper|release) and the filters of paper Table 1, each against an
independent re-implementation written here from the equations (the release's hook: per conv
input, ‖(Ψ + βI)⁻¹ − (Ψ_s + βI)⁻¹‖_F + ‖(Ψ + βI)⁻¹μ − (Ψ_s + βI)⁻¹μ_s‖₂, summed, times 0.1)."""
import math

import pytest
import torch
from torch import nn

import unidd_fast as uf
from unidd_fast.cli import build_parser, resolve_config
from unidd_fast.errors import ConfigError
from unidd_fast.pipeline import config
from unidd_fast.pipeline.augment import Augment
from unidd_fast.pipeline.recover import make_regularizer

C = 3


class Tiny(nn.Module):
    """Two conv sites and a `downsample` conv the release does not hook."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.downsample = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, C)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h) + self.downsample(h))
        return self.fc(h.mean((2, 3)))


def capture(model, names):
    feats = {}
    handles = [dict(model.named_modules())[n].register_forward_pre_hook(
        lambda m, a, n=n: feats.__setitem__(n, a[0])) for n in names]
    return feats, handles


def rows(f):
    return f.permute(1, 0, 2, 3).reshape(f.shape[1], -1)


def release_loss(feats, real, beta):
    """The release's r_feature summed over sites, times 0.1 (filter HFM, signal mean, no EMA)."""
    total = 0
    for name, f in feats.items():
        cov = torch.cov(rows(f), correction=0)
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        filter_t = torch.linalg.solve(real[name][0] + beta * eye, eye)
        filter_s = torch.linalg.solve(cov + beta * eye, eye)
        total = total + torch.norm(filter_t - filter_s, "fro") + torch.norm(
            filter_t @ real[name][1] - filter_s @ f.mean((0, 2, 3)), 2)
    return 0.1 * total


def real_data(gen):
    return [(torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64) + 0.3,
             torch.randint(0, C, (6,), generator=gen)) for _ in range(3)]


def test_release_recipe_reproduces_the_release_loss(gen):
    model = Tiny().double().eval()
    cfg = config.defaults("cifar10", "release")
    rc = cfg.recover
    assert (rc.sites, rc.signal, rc.emu, rc.beta_per, rc.filter, rc.jitter, rc.shift) == \
        ("conv", "mean", False, "ipc", "cfm", 4, 0.0)
    data = real_data(gen)
    stats = uf.collect_real_stats(model, data, C, sites=rc.sites, covariance="batch_mean")
    assert stats.sites == ["conv1", "conv2"]
    # the release's statistics, accumulated its way: Σ cov_b·bs/N and Σ mean_b·bs/N
    feats, handles = capture(model, stats.sites)
    real = {n: [0, 0] for n in stats.sites}
    with torch.no_grad():
        for x, _ in data:
            model(x)
            for n, f in feats.items():
                real[n][0] = real[n][0] + torch.cov(rows(f), correction=0) * f.shape[0] / 18
                real[n][1] = real[n][1] + f.mean((0, 2, 3)) * f.shape[0] / 18
    reg = make_regularizer(rc, model, stats)
    ipc = 4
    for ipc_id in range(ipc):  # the release's schedule: β (1 + cos(π ipc_id / ipc)) / 2, no EMA
        reg.set_curriculum(ipc_id, ipc)
        beta = rc.beta * (1 + math.cos(math.pi * ipc_id / ipc)) / 2
        x = torch.randn(C, 3, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        model(x)
        ours = reg(torch.arange(C))
        want = release_loss(dict(feats), real, beta)
        torch.testing.assert_close(ours, want, rtol=1e-9, atol=0)
        g1, = torch.autograd.grad(ours, x, retain_graph=True)
        g2, = torch.autograd.grad(want, x)
        torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-12)
        reg.next_batch()
    for h in handles:
        h.remove()
    reg.remove()


@pytest.mark.parametrize("kind", ["dc", "lfm", "mtt"])
def test_table1_filters(gen, kind):
    """dc: ‖Ψ − Ψ_s‖ + ‖Φ − Φ_s‖; lfm: ‖Ψ − Ψ_s‖ + ‖ΨΦ − Ψ_sΦ_s‖; mtt with P ≠ Q:
    ‖(I − αΨ)^P − (I − αΨ_s)^Q‖ + α ‖Σ_{p<P}(I − αΨ)^p Φ − Σ_{q<Q}(I − αΨ_s)^q Φ_s‖."""
    model = Tiny().double().eval()
    stats = uf.collect_real_stats(model, real_data(gen), C, sites="bn")
    alpha, P, Q = 0.3, 4, 2
    cfm = uf.CFMLoss(model, stats, filter=kind, eta=1.0, emu=False, mtt_alpha=alpha, mtt_steps=P, mtt_steps_syn=Q)
    feats, handles = capture(model, ["bn1"])
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    model(x)
    ours = cfm(y)
    f = feats["bn1"]
    psi_s = torch.cov(rows(f), correction=0)
    phi_s = f.mean((2, 3)).T @ nn.functional.one_hot(y, C).double() / f.shape[0]
    psi, phi = stats["bn1"].psi, stats["bn1"].phi
    eye = torch.eye(4, dtype=torch.float64)
    if kind == "dc":
        want = torch.norm(psi - psi_s) + torch.norm(phi - phi_s)
    elif kind == "lfm":
        want = torch.norm(psi - psi_s) + torch.norm(psi @ phi - psi_s @ phi_s)
    else:
        step, step_s = eye - alpha * psi, eye - alpha * psi_s
        sum_p = sum(torch.linalg.matrix_power(step, p) for p in range(P))
        sum_q = sum(torch.linalg.matrix_power(step_s, q) for q in range(Q))
        want = torch.norm(torch.linalg.matrix_power(step, P) - torch.linalg.matrix_power(step_s, Q)) + \
            alpha * torch.norm(sum_p @ phi - sum_q @ phi_s)
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=0)
    for h in handles:
        h.remove()
    cfm.remove()
    with pytest.raises(ConfigError, match="'lfm'.*'dc'"):
        uf.CFMLoss(model, stats, filter="lowpass")


def test_jitter_is_the_releases_roll(gen):
    x = torch.randn(2, 3, 5, 7, generator=gen)
    aug = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter=4)
    seen = set()
    for seed in range(12):
        out = aug(x, torch.Generator().manual_seed(seed))
        shifts = [(a, b) for a in range(5) for b in range(5) if torch.allclose(out, torch.roll(x, (a, b), (2, 3)),
                                                                              atol=1e-5)]
        assert len(shifts) == 1 and max(shifts[0]) <= 4
        seen.add(shifts[0])
    assert len(seen) > 3


def test_recipe_presets_and_flag(tmp_path):
    ours, paper = config.defaults("cifar10"), config.defaults("cifar10", "paper")
    assert ours.recipe == "ours" and paper.recipe == "paper"
    assert (paper.recover.beta_per, paper.evaluate.optimizer, paper.recover.shift) == ("batch", "adam", 0.0)
    assert config.defaults("cifar100", "paper").evaluate.optimizer == "sgd"  # Table 4: SGD for CIFAR-100
    release = config.defaults("imagenet", "release")
    assert (release.evaluate.cutmix, release.evaluate.crop_min, release.evaluate.epochs) == (1.0, 0.5, 300)
    assert config.from_dict(release.to_dict()).to_dict() == release.to_dict()
    with pytest.raises(ConfigError, match="unknown recipe"):
        config.defaults("cifar10", "authors")
    cfg, _ = resolve_config(build_parser().parse_args(["recover", "--recipe", "release", "--dataset", "cifar10",
                                                       "--set", "recover.jitter=2"]))
    assert (cfg.recipe, cfg.recover.sites, cfg.recover.jitter) == ("release", "conv", 2)
    run = tmp_path / "run"
    run.mkdir()
    ours.write(run / "config.json")
    (run / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="differs from the --from run's recipe ours"):
        resolve_config(build_parser().parse_args(["recover", "--recipe", "release", "--from", str(run)]))
    assert resolve_config(build_parser().parse_args(["recover", "--from", str(run)]))[0].recipe == "ours"

"""CFMLoss on real torchvision models: value, gradients, EMU, curriculum, hooks, errors."""
import pytest
import torch
import torchvision
from torch import nn

import unidd_fast as uf
from unidd_fast.errors import ConfigError, NonFiniteError, StatsMismatchError

C = 4


def small_resnet18():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=C)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m.eval()


def tiny_convnet(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, C)).to(dtype).eval()


def real_stats(model, gen, n_batches=3, hw=8, dtype=torch.float32):
    data = [(torch.randn(8, 3, hw, hw, generator=gen, dtype=dtype), torch.randint(0, C, (8,), generator=gen))
            for _ in range(n_batches)]
    return uf.collect_real_stats(model, data, C)


def test_loss_decreases_on_resnet18_and_hooks_removed(gen):
    model = small_resnet18()
    stats = real_stats(model, gen, hw=16)
    assert len(stats.sites) == 20
    n_hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    cfm = uf.CFMLoss(model, stats, beta=0.1)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == n_hooks + 20
    x = torch.randn(C, 3, 16, 16, generator=gen, requires_grad=True)
    y = torch.arange(C)
    opt = torch.optim.Adam([x], lr=0.05)
    values = []
    for _ in range(6):
        model(x)
        reg = cfm(y)
        values.append(reg.item())
        opt.zero_grad()
        reg.backward()
        opt.step()
    assert values[-1] < 0.97 * values[0], values
    cfm.next_batch()
    cfm.remove()
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == n_hooks


def test_value_and_gradient_match_site_loss_float64(gen):
    model = tiny_convnet(torch.float64)
    stats = real_stats(model, gen, dtype=torch.float64)
    cfm = uf.CFMLoss(model, stats, beta=0.2, eta=0.1, backend="torch")
    x = torch.randn(C, 3, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    feats = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, k=k: feats.__setitem__(k, a[0]))
             for k, m in model.named_modules() if k in stats.sites]
    model(x)
    reg = cfm(y)
    assert reg.dtype == torch.float64
    want = 0
    for name in stats.sites:
        psi, mu, pooled = uf.site_stats(feats[name])
        f, s = uf.cfm_site_loss(stats[name].psi, stats[name].phi, psi, uf.flc(pooled, y, C), 0.2)
        want = want + 0.1 * (f + s)
    torch.testing.assert_close(reg, want)
    g1, = torch.autograd.grad(reg, x, retain_graph=True)
    g2, = torch.autograd.grad(want, x)
    torch.testing.assert_close(g1, g2)
    for h in hooks:
        h.remove()
    cfm.remove()


def test_gradcheck_through_model(gen):
    model = tiny_convnet(torch.float64)
    stats = real_stats(model, gen, dtype=torch.float64)
    cfm = uf.CFMLoss(model, stats, beta=0.5, signal="mean")
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(inp):
        model(inp)
        return cfm(torch.tensor([0, 3]))

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def test_emu_running_mean_is_mean_of_batches(gen):
    model = tiny_convnet()
    stats = real_stats(model, gen)
    cfm = uf.CFMLoss(model, stats)
    batch_psis = []
    for b in range(4):
        x = torch.randn(C, 3, 8, 8, generator=gen)
        model(x)
        cfm(torch.arange(C))
        batch = cfm.batch_statistics()
        batch_psis.append({n: batch[d][0][i].clone() for d, group in cfm.groups.items() for i, n in enumerate(group)})
        cfm.next_batch()
    assert cfm.emu.batches_done == 4
    for d, group in cfm.groups.items():
        for i, name in enumerate(group):
            mean = torch.stack([bp[name] for bp in batch_psis]).mean(0)
            torch.testing.assert_close(cfm.emu.means[d][0][i], mean, rtol=1e-5, atol=1e-6)


def test_emu_changes_the_matched_statistics(gen):
    """With EMU the current batch enters with weight 1/b; without, on its own."""
    model = tiny_convnet(torch.float64)
    stats = real_stats(model, gen, dtype=torch.float64)
    x1, x2 = (torch.randn(C, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    values = {}
    for emu in (True, False):
        cfm = uf.CFMLoss(model, stats, emu=emu)
        model(x1)
        cfm(torch.arange(C))
        cfm.next_batch()
        model(x2)
        values[emu] = cfm(torch.arange(C)).item()
        cfm.remove()
    fresh = uf.CFMLoss(model, stats, emu=False)
    model(x2)
    assert values[False] == pytest.approx(fresh(torch.arange(C)).item())
    assert values[True] != pytest.approx(values[False])
    fresh.remove()


@pytest.mark.parametrize("filter", ["cfm", "krr", "dc", "lfm", "allpass", "mtt"])
@pytest.mark.parametrize("signal", ["class", "mean", "soft"])
def test_every_option_gives_finite_differentiable_loss(filter, signal, gen):
    model = tiny_convnet()
    stats = real_stats(model, gen)
    cfm = uf.CFMLoss(model, stats, filter=filter, signal=signal, sites="bn")
    x = torch.randn(C, 3, 8, 8, generator=gen, requires_grad=True)
    logits = model(x)
    targets = torch.softmax(logits.detach(), 1) if signal == "soft" else torch.arange(C)
    reg = cfm(targets)
    reg.backward()
    assert torch.isfinite(reg) and reg.item() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    cfm.remove()


def test_curriculum_sets_beta(gen):
    model = tiny_convnet()
    stats = real_stats(model, gen)
    cfm = uf.CFMLoss(model, stats, beta=0.4, beta_min=1e-3)
    cfm.set_curriculum(1, 2)
    assert cfm.beta_t == pytest.approx(0.2)
    cfm.set_curriculum(2, 2)
    assert cfm.beta_t == pytest.approx(1e-3)
    fixed = uf.CFMLoss(model, stats, beta=0.4, filter="krr")
    fixed.set_curriculum(1, 2)
    assert fixed.beta_t == pytest.approx(0.4)


def test_conv_sites_and_explicit_names(gen):
    model = small_resnet18()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    stats = real_stats(model, gen, n_batches=1, hw=16)
    assert uf.sites.resolve_sites(model, "conv")[0][0] == "conv1"
    assert [n for n, _ in uf.sites.resolve_sites(model, "conv")] == names
    with pytest.raises(StatsMismatchError, match="site names"):
        uf.CFMLoss(model, stats, sites="conv")
    with pytest.raises(ConfigError, match="no module named"):
        uf.CFMLoss(model, stats, sites=["layer9"])


def test_errors(gen):
    model = tiny_convnet()
    stats = real_stats(model, gen)
    with pytest.raises(ConfigError, match="signal"):
        uf.CFMLoss(model, stats, signal="label")
    with pytest.raises(ConfigError, match="beta"):
        uf.CFMLoss(model, stats, beta=-0.1)
    other = tiny_convnet()
    other[4] = nn.BatchNorm2d(7)
    with pytest.raises(StatsMismatchError, match="channels"):
        uf.CFMLoss(other, stats)
    cfm = uf.CFMLoss(model, stats)
    with pytest.raises(RuntimeError, match="call model"):
        cfm(torch.arange(C))
    x = torch.randn(C, 3, 8, 8, generator=gen)
    x[0, 0, 0, 0] = float("nan")
    model(x)
    with pytest.raises(NonFiniteError, match="'1'"):
        cfm(torch.arange(C))


def test_refused_loss_leaves_no_hooks(gen):
    model = tiny_convnet()
    stats = real_stats(model, gen)
    with pytest.raises(StatsMismatchError):
        uf.CFMLoss(model, stats, sites=["0", "4"])
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())

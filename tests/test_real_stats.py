"""Streaming real statistics: exact over the loader, numerically safe, safely stored."""
import pytest
import torch
from torch import nn

import unidd_fast as uf
from unidd_fast.errors import ConfigError, NonFiniteError, StatsFileError, StatsMismatchError
from unidd_fast.real_stats import MomentAccumulator

C = 4


def tiny_model(in_ch=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, C))


def batches(gen, sizes, offset=0.0, scale=1.0, hw=(5, 4)):
    out = []
    for b in sizes:
        x = offset + scale * torch.randn(b, 3, *hw, generator=gen)
        out.append((x, torch.randint(0, C, (b,), generator=gen)))
    return out


def test_streaming_equals_concatenated(gen):
    model = tiny_model()
    loader = batches(gen, [3, 1, 7, 2])
    stats = uf.collect_real_stats(model, loader, C)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    feats = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, k=k: feats.__setitem__(k, a[0].double()))
             for k, m in [("0", model[0]), ("2", model[2])]]
    with torch.no_grad():
        probs = torch.softmax(model.eval()(images), 1).double()
    for h in hooks:
        h.remove()
    assert stats.sites == ["0", "2"] and stats.num_images == 13 and stats.num_classes == C
    for name, feat in feats.items():
        psi, mu, pooled = uf.site_stats(feat)
        s = stats[name]
        torch.testing.assert_close(s.psi, psi, rtol=1e-5, atol=1e-6)  # fp32 batches, fp64 merge
        torch.testing.assert_close(s.mu, mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.phi, uf.flc(pooled, labels, C), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.phi_soft, uf.flc(pooled, probs), rtol=1e-5, atol=1e-6)
        assert s.count == 13 * feat.shape[2] * feat.shape[3]


def test_large_offset_keeps_fp32_accuracy(gen):
    """|mean| = 100 σ: the covariance must stay accurate to fp32 precision."""
    model = tiny_model()
    loader = batches(gen, [16] * 6, offset=100.0, scale=1.0)
    stats = uf.collect_real_stats(model, loader, C)
    rows = torch.cat([x for x, _ in loader]).double().permute(0, 2, 3, 1).reshape(-1, 3)
    truth = torch.cov(rows.T, correction=0)
    err = (stats["0"].psi - truth).norm() / truth.norm()
    assert err < 1e-5, err
    # E[xxᵀ] − μμᵀ in fp32 is what the streaming merge avoids: it is far off here
    r32 = rows.float()
    naive = (r32.T @ r32 / len(r32) - torch.outer(r32.mean(0), r32.mean(0))).double()
    assert (naive - truth).norm() / truth.norm() > 100 * err


def test_merge_is_exact(gen):
    acc = [MomentAccumulator() for _ in range(3)]
    parts = [torch.randn(n, 4, generator=gen, dtype=torch.float64) + 3 for n in (5, 9, 2)]
    for a, x in zip(acc, parts):
        psi, mu = torch.cov(x.T, correction=0), x.mean(0)
        a.update(psi, mu, x, torch.ones(len(x), 1), torch.ones(len(x), 1), len(x))
    acc[0].merge(acc[1])
    acc[0].merge(acc[2])
    allx = torch.cat(parts)
    final = acc[0].finalize(len(allx))
    torch.testing.assert_close(final.psi, torch.cov(allx.T, correction=0))
    torch.testing.assert_close(final.mu, allx.mean(0))


def test_save_load_roundtrip_and_validation(tmp_path, gen):
    model = tiny_model()
    stats = uf.collect_real_stats(model, batches(gen, [4, 4]), C)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = uf.RealStats.load(path)
    assert loaded.sites == stats.sites and loaded.model_class == "Sequential"
    assert loaded.shapes == stats.shapes and loaded.num_images == 8
    for s in stats.sites:
        torch.testing.assert_close(loaded[s].psi, stats[s].psi, rtol=0, atol=0)
    loaded.validate(model=model, sites=["0", "2"], num_classes=C)
    with pytest.raises(StatsMismatchError, match="classes"):
        loaded.validate(num_classes=C + 1)
    with pytest.raises(StatsMismatchError, match="site names"):
        loaded.validate(sites=["0"])
    with pytest.raises(StatsMismatchError, match="collected on a Sequential"):
        loaded.validate(model=nn.Linear(2, 2))


def test_corrupted_and_truncated_files(tmp_path, gen):
    stats = uf.collect_real_stats(tiny_model(), batches(gen, [4]), C)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    data = bytearray(path.read_bytes())
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StatsFileError, match="truncated"):
        uf.RealStats.load(tmp_path / "trunc.safetensors")
    data[-3] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(StatsFileError, match="checksum"):
        uf.RealStats.load(tmp_path / "flip.safetensors")
    with pytest.raises(StatsFileError, match="does not exist"):
        uf.RealStats.load(tmp_path / "missing.safetensors")


def test_collect_errors(gen):
    model = tiny_model()
    with pytest.raises(ConfigError, match="num_classes"):
        uf.collect_real_stats(model, batches(gen, [4]), 2)
    bad = batches(gen, [4])
    bad[0][0][1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="site '0'"):
        uf.collect_real_stats(model, bad, C)
    with pytest.raises(ConfigError, match="no images"):
        uf.collect_real_stats(model, [], C)


def test_batch_mean_covariance_is_the_releases(gen, tmp_path):
    """covariance="batch_mean": Σ_b (n_b / N) cov_b of each batch's rows (what the authors'
    release accumulates), labelled in the file; μ and Φ stay exact."""
    model = tiny_model()
    loader = batches(gen, [3, 5, 2], offset=2.0)
    exact = uf.collect_real_stats(model, loader, C)
    ours = uf.collect_real_stats(model, loader, C, covariance="batch_mean")
    feats = []
    hook = model[2].register_forward_pre_hook(lambda m, a: feats.append(a[0].double()))
    with torch.no_grad():
        for x, _ in loader:
            model.eval()(x)
    hook.remove()
    total = sum(f.shape[0] for f in feats)
    want = sum(torch.cov(f.permute(1, 0, 2, 3).reshape(f.shape[1], -1), correction=0) * f.shape[0] / total
               for f in feats)
    torch.testing.assert_close(ours["2"].psi, want, rtol=1e-6, atol=1e-7)
    assert (ours["2"].psi - exact["2"].psi).abs().max() > 1e-4  # the between-batch term is gone
    torch.testing.assert_close(ours["2"].mu, exact["2"].mu, rtol=0, atol=0)
    torch.testing.assert_close(ours["2"].phi, exact["2"].phi, rtol=0, atol=0)
    assert exact.provenance == {"covariance": "exact"} and ours.provenance == {"covariance": "batch_mean"}
    ours.save(tmp_path / "s.safetensors")
    assert uf.RealStats.load(tmp_path / "s.safetensors").provenance == {"covariance": "batch_mean"}
    with pytest.raises(ConfigError, match="covariance must be one of"):
        uf.collect_real_stats(model, loader, C, covariance="mean")
    with pytest.raises(ConfigError, match="one process"):
        uf.collect_real_stats(model, loader, C, covariance="batch_mean", distributed=True)

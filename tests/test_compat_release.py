"""Import of the authors' release statistics (statistic/*/ConvFeatureHook/<Model>.pth=<site>/running.npz):
the files are written here the way the release accumulates them, from the teacher's conv inputs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unidd_fast as uf
from unidd_fast.cli import main
from unidd_fast.compat.release import import_release_stats
from unidd_fast.errors import StatsFileError, StatsMismatchError
from unidd_fast.pipeline.models import build_model, model_spec, save_teacher

C = 4


def teacher():
    torch.manual_seed(0)
    return build_model("convnet", C, 16, channels=3, width=6, depth=2).eval()


def loader(gen):
    return [(torch.randn(b, 3, 16, 16, generator=gen) + 0.5, torch.randint(0, C, (b,), generator=gen)) for b in (5, 3, 4)]


def write_release_files(model, data, root, ckpt="ConvNetW6.pth"):
    """The release's pre-hook accumulation, per conv site: running_cov += cov·bs/N,
    running_mean += mean·bs/N, running_class_mean += X'ᵀ onehot / N, running_mix_mean with softmax."""
    n_total = sum(x.shape[0] for x, _ in data)
    sites = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and "downsample" not in n]
    acc = {s: dict(running_cov=0, running_corr=0, running_mean=0, running_class_mean=0, running_mix_mean=0)
           for s in sites}
    feats = {}
    handles = [dict(model.named_modules())[s].register_forward_pre_hook(
        lambda m, a, s=s: feats.__setitem__(s, a[0].double())) for s in sites]
    with torch.no_grad():
        for x, y in data:
            probs = torch.softmax(model(x), -1).double()
            onehot = F.one_hot(y, C).double()
            for s, f in feats.items():
                bs, d, h, w = f.shape
                rows = f.permute(1, 0, 2, 3).reshape(d, -1)
                a = acc[s]
                a["running_cov"] = a["running_cov"] + torch.cov(rows, correction=0) * bs / n_total
                a["running_corr"] = a["running_corr"] + rows @ rows.T / (h * w) / n_total
                a["running_mean"] = a["running_mean"] + f.mean((0, 2, 3)) * bs / n_total
                a["running_class_mean"] = a["running_class_mean"] + f.mean((2, 3)).T @ onehot / n_total
                a["running_mix_mean"] = a["running_mix_mean"] + f.mean((2, 3)).T @ probs / n_total
    for h in handles:
        h.remove()
    for s, a in acc.items():
        folder = root / f"{ckpt}={s}"
        folder.mkdir(parents=True)
        np.savez(folder / "running.npz", **{k: v.float().numpy() for k, v in a.items()})
    return sites


def test_import_equals_batch_mean_statistics(gen, tmp_path):
    model = teacher()
    data = loader(gen)
    sites = write_release_files(model, data, tmp_path)
    other = tmp_path / "Other.pth=conv1"  # another model's site in the same folder
    other.mkdir()
    np.savez(other / "running.npz", running_cov=np.eye(2, dtype=np.float32))
    got = import_release_stats(tmp_path, model, input_shape=(3, 16, 16))
    want = uf.collect_real_stats(model, data, C, sites="conv", covariance="batch_mean")
    assert got.sites == want.sites == sites and got.num_classes == C
    assert got.provenance == {"source": "release_npz", "covariance": "batch_mean", "checkpoint": "ConvNetW6.pth"}
    assert got.shapes == want.shapes and got.model_class == "ConvNet"
    for s in sites:
        for field in ("psi", "mu", "phi", "phi_soft"):
            torch.testing.assert_close(getattr(got[s], field), getattr(want[s], field), rtol=1e-5, atol=1e-6)
    # one file of the folder selects its checkpoint
    one = import_release_stats(tmp_path / f"ConvNetW6.pth={sites[0]}" / "running.npz", model)
    assert one.sites == sites and one.shapes[sites[0]] == (3,)
    # and the imported statistics drive the loss on the conv sites
    cfm = uf.CFMLoss(model, got, sites="conv", signal="mean", emu=False)
    model(torch.randn(2, 3, 16, 16, generator=gen))
    assert torch.isfinite(cfm(torch.tensor([0, 1])))


def test_import_refuses_foreign_and_hostile_files(gen, tmp_path):
    model = teacher()
    sites = write_release_files(model, loader(gen), tmp_path / "a")
    wider = build_model("convnet", C, 16, channels=3, width=8, depth=2)
    with pytest.raises(StatsMismatchError, match="another model or dataset"):
        import_release_stats(tmp_path / "a", wider)
    with pytest.raises(StatsMismatchError, match="exactly the teacher's"):
        import_release_stats(tmp_path / "a", build_model("convnet", C, 16, channels=3, width=6, depth=1))
    with pytest.raises(StatsMismatchError, match="another model or dataset"):
        import_release_stats(tmp_path / "a", model, num_classes=C + 1)
    bad = tmp_path / "a" / f"ConvNetW6.pth={sites[1]}" / "running.npz"
    np.savez(bad, running_cov=np.array([object()]), running_mean=np.zeros(6), running_class_mean=np.zeros((6, C)),
             running_mix_mean=np.zeros((6, C)))
    with pytest.raises(StatsFileError, match="not a readable"):  # object arrays need pickle: refused
        import_release_stats(tmp_path / "a", model)
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StatsFileError, match="not a readable"):
        import_release_stats(tmp_path / "a", model)
    with pytest.raises(StatsFileError, match="does not exist"):
        import_release_stats(tmp_path / "missing", model)


def test_import_stats_command(gen, tmp_path, capsys):
    model = teacher()
    write_release_files(model, loader(gen), tmp_path / "stat")
    teacher_file = tmp_path / "teacher.safetensors"
    save_teacher(teacher_file, model, model_spec("convnet", C, 16, 3, 6, 2))
    out = tmp_path / "stats.safetensors"
    argv = ["import-stats", str(tmp_path / "stat"), "--teacher", str(teacher_file), "--out", str(out)]
    assert main(argv) == 0
    assert "recover.sites=conv" in capsys.readouterr().out
    stats = uf.RealStats.load(out)
    assert stats.provenance["source"] == "release_npz" and stats.shapes["features.4"] == (6, 8, 8)
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0

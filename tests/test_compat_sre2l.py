"""The SRe2L drop-in (unidd_fast.compat.sre2l): per-hook r_feature against CFMLoss, an
SRe2L-shaped recover loop that rebuilds teacher and hooks per ipc id, statistics files,
DataParallel slices, and the BatchNorm-buffer converter."""
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unidd_fast as uf
from unidd_fast.compat import sre2l
from unidd_fast.errors import ConfigError, StatsFileError, StatsMismatchError

C = 3


def teacher(dtype=torch.float64):
    """Same weights on every call (the scripts rebuild the teacher for each ipc id)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, C)).to(dtype)
    with torch.no_grad():  # non-trivial BN buffers, as in a trained teacher
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def make_stats(model, gen, dtype=torch.float64):
    data = [(torch.randn(6, 3, 7, 7, generator=gen, dtype=dtype), torch.randint(0, C, (6,), generator=gen))
            for _ in range(3)]
    return uf.collect_real_stats(model, data, C)


def pre_hook_count(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("signal", ["class", "mean"])
def test_hook_sum_equals_cfmloss_with_emu(gen, signal):
    model = teacher()
    stats = make_stats(model, gen)
    hooks = sre2l.cfm_hooks(model, stats, beta=0.3, eta=0.1, signal=signal, state=sre2l.CFMState(),
                            backend="torch")
    ref_model = teacher()
    ref = uf.CFMLoss(ref_model, stats, beta=0.3, eta=0.1, signal=signal, backend="torch")
    assert len(hooks) == 3 and [h.name for h in hooks] == stats.sites and hooks[1].name == "4"
    for batch in range(3):  # EMU is active from the second class-batch on
        hooks.set_curriculum(batch, 3)
        ref.set_curriculum(batch, 3)
        x = torch.randn(4, 3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        y = torch.tensor([0, 2, 1, 2])
        hooks.set_targets(y)
        model(x)
        terms = [h.r_feature for h in hooks]
        ours = sum(terms)
        ref_model(x)
        want = ref(y)
        # float64 throughout; only the summation order differs
        torch.testing.assert_close(ours, want, rtol=1e-12, atol=0)
        assert all(t.dim() == 0 and t.item() > 0 for t in terms)
        g1, = torch.autograd.grad(ours, x)
        g2, = torch.autograd.grad(want, x)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
        hooks.next_batch()
        ref.next_batch()
    assert hooks.state.batches_done == 3
    hooks.close()
    assert pre_hook_count(model) == 0


def recover(model_factory, stats_source, gen_seed, ipc_total=2, batches_per_ipc=2, iterations=3,
            rebuild=True, fresh_state=False):
    """An SRe2L-shaped recover loop: per ipc id a fresh teacher and fresh hooks, per
    class-batch fresh inputs and Adam, loss = CE + sum of r_feature, EMU after each batch."""
    gen = torch.Generator().manual_seed(gen_seed)
    out = []
    model, hooks = None, None
    for ipc_id in range(ipc_total):
        if rebuild or model is None:
            model = model_factory()
            state = sre2l.CFMState() if fresh_state else None
            hooks = sre2l.cfm_hooks(model, stats_source, beta=0.2, state=state, backend="torch")
        hooks.set_curriculum(ipc_id, ipc_total)
        for kk in range(batches_per_ipc):
            targets = torch.arange(C)
            inputs = torch.randn(C, 3, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.Adam([inputs], lr=0.05, betas=(0.5, 0.9))
            hooks.set_targets(targets)
            for _ in range(iterations):
                off = int(torch.randint(0, 2, (1,), generator=gen))
                jit = torch.roll(inputs, shifts=(off, off), dims=(2, 3))
                opt.zero_grad()
                outputs = model(jit)
                loss_r_feature = sum(h.r_feature for h in hooks)
                loss = F.cross_entropy(outputs, targets) + loss_r_feature
                loss.backward()
                opt.step()
            out.append(inputs.detach().clone())
            hooks.next_batch()
        if rebuild:
            hooks.close()
    return torch.stack(out), hooks


def test_sre2l_loop_keeps_emu_across_rebuilds(gen, tmp_path):
    stats = make_stats(teacher(), gen)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    rebuilt, hooks = recover(teacher, str(path), gen_seed=7)
    assert hooks.state.batches_done == 4
    assert sre2l.emu_state(sre2l._as_stats(str(path))) is hooks.state
    # the same run with one teacher and one set of hooks for the whole run (no rebuilds)
    kept, kept_hooks = recover(teacher, stats, gen_seed=7, rebuild=False)
    assert kept_hooks.cfm.b == 5
    torch.testing.assert_close(rebuilt, kept, rtol=1e-12, atol=1e-12)
    # ... and EMU matters: a fresh state per ipc id gives the same first ipc, other second ipc
    fresh, _ = recover(teacher, stats, gen_seed=7, fresh_state=True)
    torch.testing.assert_close(fresh[:2], kept[:2], rtol=1e-12, atol=1e-12)
    assert (fresh[2:] - kept[2:]).abs().max() > 1e-6


def test_stats_file_is_read_once_per_version_and_errors(gen, tmp_path):
    model = teacher()
    stats = make_stats(model, gen)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    a, b = sre2l._as_stats(path), sre2l._as_stats(str(path))
    assert a is b and a.sites == stats.sites
    with pytest.raises(StatsFileError, match="unidd-fast stats"):
        sre2l.cfm_hooks(model, tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="RealStats or the path"):
        sre2l.cfm_hooks(model, {"not": "stats"})
    hooks = sre2l.cfm_hooks(model, path)
    with pytest.raises(ConfigError, match="set_targets"):
        model(torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64))
        hooks[0].r_feature
    hooks.close()
    hooks = sre2l.cfm_hooks(model, path, signal="mean")
    hooks.set_targets(torch.tensor([0, 1]))
    model(torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64))
    hooks[0].r_feature
    hooks.next_batch()
    with pytest.raises(ConfigError, match="EMU state belongs to a run"):
        sre2l.cfm_hooks(model, path, signal="class")
    assert pre_hook_count(model) == 3  # the refused hooks were removed again
    hooks.set_targets(torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="run the teacher forward"):
        hooks[2].r_feature
    hooks[0].close()
    hooks[1].close()
    assert pre_hook_count(model) == 3  # still one open hook
    hooks[2].close()
    assert pre_hook_count(model) == 0
    with pytest.raises(RuntimeError, match="closed"):
        hooks[0].r_feature


def test_dataparallel_without_gpus_matches_plain_model(gen):
    """On a machine with no GPU DataParallel runs the module itself: sites keep their
    unwrapped names and the value equals CFMLoss on the plain model."""
    inner = teacher()
    stats = make_stats(inner, gen)
    dp = nn.DataParallel(inner)
    hooks = sre2l.cfm_hooks(dp, stats, beta=0.2, state=sre2l.CFMState(), backend="torch")
    assert [h.name for h in hooks] == stats.sites
    ref_model = teacher()
    ref = uf.CFMLoss(ref_model, stats, beta=0.2, backend="torch")
    x = torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 0, 2, 1])
    hooks.set_targets(y)
    dp(x)
    ref_model(x)
    torch.testing.assert_close(sum(h.r_feature for h in hooks), ref(y), rtol=1e-12, atol=0)
    hooks.close()
    assert pre_hook_count(dp) == 0


def test_replica_slices_merge_to_the_whole_batch(gen, monkeypatch):
    """DataParallel runs one replica per GPU, each on one slice of the batch, in its own
    thread. With no GPU here, replicas are simulated: two threads run the teacher on the two
    halves and the slice key is the thread's replica index instead of the device."""
    model = teacher()
    stats = make_stats(model, gen)
    replica = threading.local()
    monkeypatch.setattr(sre2l, "_slice_key", lambda feat: torch.device("cpu", replica.index)
                        if hasattr(replica, "index") else feat.device)
    monkeypatch.setattr(sre2l._Engine, "_batch_order", lambda self, dev: dev.index)
    hooks = sre2l.cfm_hooks(model, stats, beta=0.2, state=sre2l.CFMState(), backend="torch")
    x = torch.randn(5, 3, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2, 0, 1, 1, 0])
    hooks.set_targets(y)

    def run(index, chunk):
        replica.index = index
        model(chunk)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in reversed(list(enumerate(x.split(3))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(parts) == 2 for parts in hooks.cfm._slices.values())
    ours = sum(h.r_feature for h in hooks)
    ref_model = teacher()
    ref = uf.CFMLoss(ref_model, stats, beta=0.2, backend="torch")
    ref_model(x)
    want = ref(y)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=0)
    g1, = torch.autograd.grad(ours, x)
    g2, = torch.autograd.grad(want, x)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)
    hooks.close()


def test_merge_slices_is_exact_and_differentiable(gen):
    feat = torch.randn(7, 4, 3, 5, generator=gen, dtype=torch.float64) * 3 + 10
    slices = [(*uf.site_stats(part), part.shape[0] * 15) for part in feat.split([2, 4, 1])]
    psi, mu, pooled = sre2l.merge_slices(slices)
    want = uf.site_stats(feat)
    for got, ref in zip((psi, mu, pooled), want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)

    def merged_psi(f):
        return sre2l.merge_slices([(*uf.site_stats(p), p.shape[0] * 2) for p in f.split([1, 2])])[0]

    small = torch.randn(3, 2, 1, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(merged_psi, (small,))


def test_bn_buffer_stats_from_model_and_checkpoint(gen, tmp_path):
    model = teacher(torch.float32)
    direct = sre2l.bn_buffer_stats(model)
    assert direct.sites == ["1", "4", "7"] and direct.num_classes == C and direct.model_class == "Sequential"
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(direct[name].mu, m.running_mean.double(), rtol=0, atol=0)
            torch.testing.assert_close(direct[name].psi, torch.diag(m.running_var.double()), rtol=0, atol=0)
    # a DataParallel-saved torchvision-style checkpoint, loaded with weights_only=True
    path = tmp_path / "teacher.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    from_file = sre2l.bn_buffer_stats(teacher(torch.float32), path)
    for name in direct.sites:
        torch.testing.assert_close(from_file[name].psi, direct[name].psi, rtol=0, atol=0)
        torch.testing.assert_close(from_file[name].mu, direct[name].mu, rtol=0, atol=0)
    out = tmp_path / "bn.safetensors"
    from_file.save(out)
    loaded = uf.RealStats.load(out)
    torch.testing.assert_close(loaded["4"].psi, direct["4"].psi)
    # the SRe2L baseline's statistics carry no class correlation: CFM's class signal refuses them
    assert loaded.provenance == {"source": "bn_buffers"}
    with pytest.raises(ConfigError, match="signal='mean'.*not SRe2L's BN loss"):
        sre2l.cfm_hooks(model, loaded, state=sre2l.CFMState())
    assert pre_hook_count(model) == 0
    hooks = sre2l.cfm_hooks(model, loaded, signal="mean", state=sre2l.CFMState())
    hooks.set_targets(torch.tensor([0, 1]))
    model(torch.randn(2, 3, 5, 5, generator=gen))
    assert torch.isfinite(sum(h.r_feature for h in hooks))
    hooks.close()
    bad = {k: v for k, v in model.state_dict().items() if not k.startswith("4.")}
    with pytest.raises(StatsMismatchError, match=r"\['4'\]"):
        sre2l.bn_buffer_stats(model, bad)
    wide = dict(model.state_dict(), **{"1.running_mean": torch.zeros(7), "1.running_var": torch.ones(7)})
    with pytest.raises(StatsMismatchError, match="another model"):
        sre2l.bn_buffer_stats(model, wide)
    with pytest.raises(StatsFileError, match="does not exist"):
        sre2l.bn_buffer_stats(model, tmp_path / "nope.pth")


def test_state_file_continues_a_run_split_by_ipc_range(gen, tmp_path):
    """One job recovers ipc 0 and saves the EMU state; the next loads it and continues with
    the same running means and batch counter as a run that never stopped."""
    stats = make_stats(teacher(), gen)
    _, first = recover(teacher, stats, gen_seed=3, ipc_total=1, fresh_state=True)
    path = tmp_path / "emu.safetensors"
    first.state.save(path)
    loaded = sre2l.CFMState.load(path)
    assert loaded.signature == first.state.signature and loaded.batches_done == 2
    assert all(torch.equal(loaded.tensors[k], v) for k, v in first.state.tensors.items())
    hooks = sre2l.cfm_hooks(teacher(), stats, beta=0.2, state=loaded, backend="torch")
    assert hooks.cfm.b == 3
    for key, value in first.state.tensors.items():
        torch.testing.assert_close(hooks.cfm.state_dict()[key], value, rtol=0, atol=0)
    hooks.close()
    with pytest.raises(ConfigError, match="EMU state belongs to a run"):
        sre2l.cfm_hooks(teacher(), stats, signal="mean", state=sre2l.CFMState.load(path))
    with pytest.raises(ConfigError, match="nothing to save"):
        sre2l.CFMState().save(tmp_path / "empty.safetensors")
    with pytest.raises(StatsFileError, match="does not exist"):
        sre2l.CFMState.load(tmp_path / "missing.safetensors")


def test_run_split_by_ipc_range_equals_one_run(gen, tmp_path):
    """SRe2L's --ipc-start/--ipc-end split: job 1 makes ipc 0-1 and saves the EMU state, job 2
    loads it and makes ipc 2, with the curriculum total of the whole run: the images equal
    those of one uninterrupted run (and differ without the state file)."""
    stats = make_stats(teacher(), gen)

    def run_range(ipc_ids, state, total=3):
        out = []
        for ipc_id in ipc_ids:
            model = teacher()
            hooks = sre2l.cfm_hooks(model, stats, beta=0.2, state=state, curriculum_total=total, backend="torch")
            hooks.set_curriculum(ipc_id)
            g = torch.Generator().manual_seed(100 + ipc_id)
            for _ in range(2):
                inputs = torch.randn(C, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
                opt = torch.optim.Adam([inputs], lr=0.05, betas=(0.5, 0.9))
                hooks.set_targets(torch.arange(C))
                for _ in range(3):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(inputs), torch.arange(C)) + sum(h.r_feature for h in hooks)
                    loss.backward()
                    opt.step()
                out.append(inputs.detach().clone())
                hooks.next_batch()
            hooks.close()
        return out

    whole = run_range(range(3), sre2l.CFMState())
    first_state = sre2l.CFMState()
    first = run_range(range(2), first_state)
    first_state.save(tmp_path / "emu.safetensors")  # end of job 1
    second = run_range(range(2, 3), sre2l.CFMState.load(tmp_path / "emu.safetensors"))  # job 2
    torch.testing.assert_close(torch.stack(first + second), torch.stack(whole), rtol=0, atol=0)
    without = run_range(range(2, 3), sre2l.CFMState())
    assert (torch.stack(without) - torch.stack(whole[4:])).abs().max() > 1e-6


def test_curriculum_total_is_the_whole_run_not_the_ipc_range(gen):
    model = teacher()
    stats = make_stats(model, gen)
    hooks = sre2l.cfm_hooks(model, stats, beta=0.4, state=sre2l.CFMState(), curriculum_total=50)
    for ipc_id in (20, 29):  # a process given --ipc-start 20 --ipc-end 30 of a 50-ipc run
        hooks.set_curriculum(ipc_id)
        assert hooks.cfm.beta_t == pytest.approx(uf.beta_schedule(0.4, ipc_id, 50))
    with pytest.raises(ConfigError, match="not the end of this process's ipc range"):
        hooks.set_curriculum(20, 30)
    hooks.set_curriculum(20, 50)  # the same T, given explicitly, is fine
    with pytest.raises(ConfigError, match="global ipc id"):
        hooks.set_curriculum(51)
    hooks.close()
    hooks = sre2l.cfm_hooks(model, stats, beta=0.4, state=sre2l.CFMState())
    with pytest.raises(ConfigError, match="curriculum_total"):
        hooks.set_curriculum(3)
    hooks.close()
    with pytest.raises(ConfigError, match="positive int"):
        sre2l.cfm_hooks(model, stats, curriculum_total=0)
    assert pre_hook_count(model) == 0


def test_last_holds_the_per_site_terms(gen):
    model = teacher()
    stats = make_stats(model, gen)
    hooks = sre2l.cfm_hooks(model, stats, beta=0.2, eta=0.1, state=sre2l.CFMState(), backend="torch")
    assert hooks.cfm.last == {}
    hooks.set_targets(torch.tensor([0, 1, 2]))
    model(torch.randn(3, 3, 6, 6, generator=gen, dtype=torch.float64))
    terms = {h.name: h.r_feature for h in hooks}
    last = hooks.cfm.last
    assert set(last["sites"]) == set(terms)
    for name, (f, sig) in last["sites"].items():
        torch.testing.assert_close(0.1 * (f + sig), terms[name].detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(last["filter"] + last["signal"], sum(terms.values()).detach() / 0.1,
                               rtol=1e-12, atol=0)
    hooks.close()


def test_stats_through_dataparallel_are_named_as_the_plain_network(gen, tmp_path):
    """SRe2L holds the teacher as nn.DataParallel(model): statistics collected through the
    wrapper and hooks on the wrapper (or on the plain model) see the same sites."""
    inner = teacher()
    data = [(torch.randn(6, 3, 7, 7, generator=gen, dtype=torch.float64), torch.randint(0, C, (6,), generator=gen))
            for _ in range(2)]
    wrapped = uf.collect_real_stats(nn.DataParallel(inner), data, C)
    plain = uf.collect_real_stats(inner, data, C)
    assert wrapped.model_class == "Sequential" and wrapped.sites == plain.sites == ["1", "4", "7"]
    for name in plain.sites:
        torch.testing.assert_close(wrapped[name].psi, plain[name].psi, rtol=0, atol=0)
    for model in (nn.DataParallel(inner), inner):
        hooks = sre2l.cfm_hooks(model, wrapped, state=sre2l.CFMState())
        hooks.set_targets(torch.tensor([0, 1]))
        model(torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64))
        assert torch.isfinite(sum(h.r_feature for h in hooks))
        hooks.close()
    old = uf.RealStats({f"module.{n}": plain[n] for n in plain.sites}, {f"module.{n}": plain.shapes[n] for n in
                       plain.sites}, "DataParallel", plain.num_images, C)
    with pytest.raises(StatsMismatchError, match="collect them again"):
        sre2l.cfm_hooks(nn.DataParallel(inner), old, state=sre2l.CFMState())
    assert pre_hook_count(inner) == 0

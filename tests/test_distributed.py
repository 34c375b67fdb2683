"""torchrun with 2 gloo processes on CPU against one process: real statistics merged across
ranks, disjoint shards, EMU merged after every recover round; plus the single-process parts
of unidd_fast.distributed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import _dist_worker as w
import unidd_fast as uf
from unidd_fast import distributed as ud
from unidd_fast.errors import ConfigError

WORKER = Path(__file__).with_name("_dist_worker.py")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent.parent))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def assert_same_stats(got, want, rtol, atol_scale, soft_rtol):
    assert got.sites == want.sites and got.shapes == want.shapes
    assert (got.num_images, got.num_classes, got.model_class) == (want.num_images, want.num_classes, want.model_class)
    for name in want.sites:
        g, s = got[name], want[name]
        assert g.count == s.count
        for field in ("psi", "mu", "phi"):
            ref = getattr(s, field)
            torch.testing.assert_close(getattr(g, field), ref, rtol=rtol, atol=atol_scale * ref.abs().max())
        torch.testing.assert_close(g.phi_soft, s.phi_soft, rtol=soft_rtol, atol=soft_rtol * s.phi_soft.abs().max())


def test_stats_two_ranks_equal_one_process_float64(two_ranks):
    want = uf.collect_real_stats(w.teacher(torch.float64), w.loader(torch.float64), w.C)
    ranks = [uf.RealStats.load(two_ranks / f"stats_float64_rank{r}.safetensors") for r in (0, 1)]
    assert want.num_images == w.N_IMAGES
    # float64 features: only the batch split and the merge order differ (~1e-15 relative);
    # the soft labels pass through a float32 softmax, whose logits may round differently
    # once the batch composition changes the float64 convolution's summation order.
    assert_same_stats(ranks[0], want, rtol=1e-10, atol_scale=1e-12, soft_rtol=1e-6)
    for name in want.sites:  # every rank folds the same gathered moments in the same order
        assert torch.equal(ranks[0][name].psi, ranks[1][name].psi)
        assert torch.equal(ranks[0][name].phi_soft, ranks[1][name].phi_soft)


def test_stats_two_ranks_equal_one_process_float32(two_ranks):
    want = uf.collect_real_stats(w.teacher(torch.float32), w.loader(torch.float32), w.C)
    got = uf.RealStats.load(two_ranks / "stats_float32_rank1.safetensors")
    # float32 features: each batch's covariance is formed in float32 (relative error a few
    # 1e-7 of the largest entry), and the shards put different images in each batch
    assert_same_stats(got, want, rtol=1e-4, atol_scale=1e-5, soft_rtol=1e-5)


def test_shards_are_disjoint_and_complete(two_ranks):
    shards = [json.loads((two_ranks / f"shard_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(w.N_IMAGES))
    assert (len(shards[0]), len(shards[1])) == (19, 18)


def test_emu_merged_after_each_round(two_ranks):
    items = [json.loads((two_ranks / f"items_rank{r}.json").read_text()) for r in (0, 1)]
    assert items == [[0, 2], [1, None]]
    # one process over the same class-batches: the EMU mean after all of them is the mean of
    # every batch's statistics, whatever the order they were folded in
    stats = uf.RealStats.load(two_ranks / "stats_float64_rank0.safetensors")
    model = w.teacher(torch.float64)
    cfm = uf.CFMLoss(model, stats, beta=0.2, backend="torch")
    for item in range(w.N_CLASS_BATCHES):
        x, y = w.class_batch(item)
        model(x)
        cfm(y)
        cfm.next_batch()
    want = cfm.state_dict()
    assert int(want["b"]) == 4
    for kind in ("emu", "emu_hooks"):
        ranks = [load_file(str(two_ranks / f"{kind}_rank{r}.safetensors")) for r in (0, 1)]
        assert set(ranks[0]) == set(want)
        for key, value in want.items():
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-12, atol=1e-14)  # float64, fold order only
            assert torch.equal(ranks[0][key], ranks[1][key])


def test_single_process_helpers(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    here = ud.init("cpu")
    assert (here.rank, here.world_size, here.is_main, ud.is_distributed()) == (0, 1, True, False)
    assert ud.shard_rounds(5, 1, 3) == [1, 4]
    assert ud.shard_rounds(5, 2, 3) == [2, None]
    assert sorted(i for r in range(3) for i in ud.shard_rounds(7, r, 3) if i is not None) == list(range(7))
    sharded = ud.shard_loader(w.loader(torch.float32), 1, 2)
    assert len(sharded.dataset) == w.N_IMAGES and list(sharded.sampler) == list(range(1, w.N_IMAGES, 2))
    assert ud.shard_loader(sharded) is sharded
    init = DataLoader(w.dataset(torch.float32), batch_size=5, num_workers=1, worker_init_fn=print)
    assert ud.shard_loader(init, 0, 2).worker_init_fn is print  # e.g. the pipeline's die_with_parent
    with pytest.raises(ConfigError, match="DataLoader"):
        ud.shard_loader([(torch.zeros(1), torch.zeros(1))], 0, 2)
    with pytest.raises(ConfigError, match="outside"):
        ud.ShardSampler(4, 2, 2)
    # without a process group, distributed=True is the whole loader on "rank 0 of 1"
    one = uf.collect_real_stats(w.teacher(torch.float64), w.loader(torch.float64), w.C, distributed=True)
    assert one.num_images == w.N_IMAGES

"""bench/check_sre2l_dropin.py's pure parts, and docs/sre2l.md's patch blocks run for real.

The real check needs a checkout of SRe2L (not here); this runs the documented blocks,
inserted by the same code, in a small script of our own with the statement shapes the
patch anchors on (a class-batch loop in get_images, fresh teacher per ipc id in main_syn,
the ipc loop under __main__).
"""
from __future__ import annotations

import importlib.util
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import unidd_fast as uf

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_sre2l_dropin", ROOT / "bench" / "check_sre2l_dropin.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

SKELETON = '''\
import argparse
import collections

import torch
from torch import nn
from utils import *


def get_images(args, model_teacher, ipc_id):
    loss_r_feature_layers = []
    for module in model_teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            loss_r_feature_layers.append(BNFeatureHook(module))
    targets_all = torch.arange(1000)
    for kk in range(0, 1000, args.batch_size):
        targets = targets_all[kk:min(kk + args.batch_size, 1000)].to('cuda')
        gen = torch.Generator().manual_seed(7919 * ipc_id + kk)
        inputs = torch.randn((targets.shape[0], 3, 6, 6), generator=gen, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([inputs], lr=0.05)
        for iteration in range(args.iteration):
            optimizer.zero_grad()
            outputs = model_teacher(inputs)
            loss_r_bn_feature = sum(mod.r_feature for mod in loss_r_feature_layers)
            loss = nn.functional.cross_entropy(outputs, targets) + loss_r_bn_feature
            print("loss_r_bn_feature", loss_r_bn_feature.item())
            loss.backward()
            optimizer.step()
        torch.save(inputs.detach(), f"{args.out}/ipc{ipc_id}_kk{kk}.pt")
        optimizer.state = collections.defaultdict(dict)
    torch.cuda.empty_cache()


def main_syn(ipc_id):
    model_teacher = nn.DataParallel(make_teacher(args.teacher)).cuda()
    model_teacher.eval()
    get_images(args, model_teacher, ipc_id)


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iteration", type=int, default=3)
    parser.add_argument("--teacher", type=str)
    parser.add_argument("--out", type=str)
    parser.add_argument("--ipc-start", type=int, default=0)
    parser.add_argument("--ipc-end", type=int, default=1)
    args = parser.parse_args()
    return args


if __name__ == '__main__':
    args = parse_args()
    for ipc_id in range(args.ipc_start, args.ipc_end):
        main_syn(ipc_id)
'''


def test_docs_have_every_block_and_each_compiles():
    blocks = check.doc_blocks((ROOT / "docs" / "sre2l.md").read_text())
    assert set(blocks) == set(check.ANCHORS)
    for name, code in blocks.items():
        compile(code, name, "exec")


def test_patch_refuses_a_script_of_another_shape():
    blocks = check.doc_blocks((ROOT / "docs" / "sre2l.md").read_text())
    with pytest.raises(check.PatchError, match="'emu_save': 0 lines match"):
        check.apply_patch(SKELETON.replace("        main_syn(ipc_id)\n", "        pass\n"), blocks)
    with pytest.raises(check.PatchError, match="'close': 2 lines match"):
        check.apply_patch(SKELETON + "torch.cuda.empty_cache()\n", blocks)
    with pytest.raises(check.PatchError, match=r"no block\(s\) \['targets'\]"):
        check.apply_patch(SKELETON, {k: v for k, v in blocks.items() if k != "targets"})
    doubled = "<!-- sre2l-patch: import -->\n```python\nx = 1\n```\n" * 2
    with pytest.raises(check.PatchError, match="two blocks named 'import'"):
        check.doc_blocks(doubled)


def test_mechanical_edits_touch_devices_and_the_class_loop_only():
    lines = [  # (line of a script, the line after the edits for 6 classes)
        ("save_every = 100", "save_every = 1"),
        ("targets_all = torch.LongTensor(np.arange(1000))", "targets_all = torch.LongTensor(np.arange(6))"),
        ("for kk in range(0, 1000, batch_size):", "for kk in range(0, 6, batch_size):"),
        ("    t = targets_all[kk:min(kk+batch_size,1000)].to('cuda')", "    t = targets_all[kk:min(kk+batch_size,6)].to('cpu')"),
        ('x = torch.randn(2, device="cuda")', 'x = torch.randn(2, device="cpu")'),
        ("model = nn.DataParallel(model).cuda()", "model = nn.DataParallel(model).cpu()"),
        ("parser.add_argument('--iteration', type=int, default=1000)", None),
        ("torch.cuda.empty_cache()", None),
    ]
    src = "".join(f"{a}\n" for a, _ in lines)
    assert check.mechanical(src, 6) == "".join(f"{a if b is None else b}\n" for a, b in lines)


def test_parse_log_splits_class_batches():
    log = ("ipc =  0\n------------iteration 0----------\nloss_r_bn_feature 3.5\n"
           "------------iteration 1----------\nloss_r_bn_feature 2.25\nVerifier accuracy:  0.0\n"
           "------------iteration 0----------\nloss_r_bn_feature 4\nloss_r_bn_feature 1e-1\n")
    assert check.parse_log(log) == [[3.5, 2.25], [4.0, 0.1]]


def test_end_means_average_a_fifth_at_each_end():
    assert check.end_means([9.0, 7.0, 5.0, 6.0, 4.0, 3.0, 2.0, 1.0, 2.0, 0.0]) == (8.0, 1.0)
    assert check.end_means([3.0, 2.0]) == (3.0, 2.0)


def make_teacher(path=None):
    """The script's ``from utils import *`` gives it this (and no BNFeatureHook: the patch removes its use)."""
    teacher = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                            nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000)).double()
    if path is not None:
        teacher.load_state_dict(torch.load(path, weights_only=True))
    return teacher


def _teacher_and_stats(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    teacher = make_teacher()
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    images = torch.randn(24, 3, 6, 6, generator=gen, dtype=torch.float64)
    labels = torch.arange(24) % 4
    loader = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
    uf.collect_real_stats(teacher, loader, num_classes=1000, sites="bn").save(tmp_path / "stats.safetensors")
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")


def _run(script, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script)] + argv)
    runpy.run_path(str(script), run_name="__main__")
    return capsys.readouterr().out


def test_documented_patch_runs_split_by_ipc_range_like_one_run(tmp_path, monkeypatch, capsys):
    """The blocks of docs/sre2l.md, inserted by the check's code with its mechanical edits
    (CPU, 4 classes), run: the feature loss is CFM's, two processes' worth of ipc ranges
    with --cfm-emu-state make the images of one run, and a range that does not continue
    the state file is refused."""
    _teacher_and_stats(tmp_path)
    blocks = check.doc_blocks((ROOT / "docs" / "sre2l.md").read_text())
    script = tmp_path / "synth.py"
    script.write_text(check.mechanical(check.apply_patch(SKELETON, blocks), 4))
    utils = types.ModuleType("utils")
    utils.make_teacher, utils.__all__ = make_teacher, ["make_teacher"]
    monkeypatch.setitem(sys.modules, "utils", utils)
    common = ["--teacher", str(tmp_path / "teacher.pt"), "--cfm-stats", str(tmp_path / "stats.safetensors"),
              "--cfm-ipc-total", "3"]
    outs = {}
    for run, ranges in {"one": [(0, 3)], "split": [(0, 2), (2, 3)]}.items():
        (tmp_path / run).mkdir()
        state = ["--cfm-emu-state", str(tmp_path / f"{run}.emu")]
        for start, end in ranges:
            log = _run(script, common + state + ["--out", str(tmp_path / run), "--ipc-start", str(start),
                                                 "--ipc-end", str(end)], monkeypatch, capsys)
        outs[run] = log
    values = [float(line.split()[1]) for line in outs["one"].splitlines() if line.startswith("loss_r_bn_feature")]
    assert len(values) == 3 * 2 * 3 and all(v > 0 for v in values)  # ipc ids × class-batches × iterations
    for ipc in range(3):
        for kk in (0, 2):
            one = torch.load(tmp_path / "one" / f"ipc{ipc}_kk{kk}.pt")
            split = torch.load(tmp_path / "split" / f"ipc{ipc}_kk{kk}.pt")
            torch.testing.assert_close(split, one, rtol=1e-12, atol=1e-12)
    with pytest.raises(SystemExit, match="holds 6 class-batches, not those of ipc ids 0..1"):
        _run(script, common + ["--cfm-emu-state", str(tmp_path / "one.emu"), "--out", str(tmp_path / "one"),
                               "--ipc-start", "2", "--ipc-end", "3"], monkeypatch, capsys)


def test_the_check_refuses_a_work_folder_it_did_not_make(tmp_path, capsys):
    checkout = tmp_path / "SRe2L"
    src = checkout / check.SCRIPTS["sre2l"] / check.MAIN["sre2l"]
    src.parent.mkdir(parents=True)
    src.write_text("# stand-in\n")
    work = tmp_path / "work"
    work.mkdir()
    (work / "base").mkdir()
    (work / "base" / "mine.txt").write_text("a user's file")
    with pytest.raises(SystemExit) as exit_info:
        check.main([str(checkout), "--work", str(work)])
    assert exit_info.value.code == 2 and "did not write" in capsys.readouterr().err
    assert (work / "base" / "mine.txt").read_text() == "a user's file"

"""The SRe2L drop-in on the CPU: one recover step of an SRe2L-style script on a torchvision
ResNet-18 with the CIFAR stem (3×3 conv1, no max pool), 100 classes, a class-batch of 50
images of 32×32, with each feature loss that script can hold, in NCHW (how SRe2L runs) and
channels_last. A step is what SRe2L's ``get_images`` does per iteration: zero the image
gradient, teacher forward (the hooks fire), cross-entropy + feature loss, backward, Adam.

Variants (each on its own copy of the teacher, timed round-robin: ``common.interleaved_times``):

- ``bare``: cross-entropy alone (the teacher's own cost);
- ``sre2l``: SRe2L's ``BNFeatureHook`` as its script computes it (batch mean over (n, h, w),
  variance of a channel-major ``permute().contiguous()`` copy, ‖σ²_run − σ²‖₂ + ‖μ_run − μ‖₂
  per BN layer, r_bn = 0.01, first layer ×10);
- ``sre2l_fast``: the same loss as ``pipeline.sre2l_loss.BNMatchLoss`` computes it (a faster
  baseline: centred variance on the row view);
- ``cfm``: the drop-in (``compat.sre2l.cfm_hooks``, β = 0.1, EMU active, torch backend);
- ``cfm_before``: the same with ``kernels/composite.py`` of ``--baseline-rev`` (read from git),
  so that a change to the torch backend is measured against its predecessor in one run;
- ``obvious``: hooks capturing every BN input and the obvious CFM loss with autograd
  (``torch.cov`` on a permuted copy + ``torch.linalg.solve`` of both sides at every site,
  bench_cfm_loss.obvious_loss).

A variant's loss part is its step minus the bare step, as the median over rounds of the
per-round differences. The loss is also timed alone (``iso_*``: forward + backward on the
feature maps of one teacher forward, held as leaves, through ``uf.CFMLoss`` on a SiteBank).
Augmentation is left out: it is the same in every variant.

    python bench/bench_sre2l_dropin.py [--batch 50] [--threads 2] [--repeat 21]
        [--layouts NCHW,channels_last] [--baseline-rev REV] [--profile]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

import unidd_fast as uf
from bench_cfm_loss import obvious_loss
from common import interleaved_times, report, set_threads
from sites import SiteBank, cifar_resnet18, random_real_stats, site_shapes
from unidd_fast.compat import sre2l
from unidd_fast.kernels import composite
from unidd_fast.pipeline.sre2l_loss import BNMatchLoss
from unidd_fast.sites import SiteHooks

ROOT = Path(__file__).resolve().parent.parent
BETA, ETA, R_BN, FIRST_BN = 0.1, 0.1, 0.01, 10.0


def composite_at(rev: str):
    """kernels/composite.py of git revision ``rev`` as a module of the installed package."""
    src = subprocess.run(["git", "show", f"{rev}:kernels/composite.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"{composite.__package__}._bench_{rev}",
                                                                             loader=None))
    module.__package__ = composite.__package__
    exec(compile(src, f"{rev}:kernels/composite.py", "exec"), module.__dict__)
    return module


@contextmanager
def torch_backend_of(module):
    """The registry's torch backend computes site statistics with ``module`` (None: unchanged)."""
    if module is None:
        yield
        return
    saved = composite.site_stats, composite.site_stats_grad
    composite.site_stats, composite.site_stats_grad = module.site_stats, module.site_stats_grad
    try:
        yield
    finally:
        composite.site_stats, composite.site_stats_grad = saved


class SRe2LBNHooks:
    """SRe2L's BN loss as its recover script computes it, per BatchNorm2d input x (n,d,h,w):
    ‖running_var − var(x)‖₂ + ‖running_mean − mean(x)‖₂ with the variance taken over a
    channel-major copy; ``loss()`` = r_bn · (first_bn · r_1 + Σ_{l>1} r_l)."""

    def __init__(self, model):
        self.terms = {}
        self.hooks = SiteHooks(model, "bn", self._capture)
        self.modules = dict(self.hooks.sites)

    def _capture(self, name, x):
        module, d = self.modules[name], x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().reshape(d, -1).var(1, unbiased=False)
        self.terms[name] = torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - mean, 2)

    def loss(self):
        terms = list(self.terms.values())
        return R_BN * (FIRST_BN * terms[0] + sum(terms[1:]))


class Captured:
    """Every BN input of the last forward, in site order (for the obvious loss)."""

    def __init__(self, model):
        self.feats = {}
        self.hooks = SiteHooks(model, "bn", self.feats.__setitem__)
        self.names = [name for name, _ in self.hooks.sites]


def make_step(name, teacher, stats, init, targets, before):
    """(step function, cleanup) of one variant on its own teacher copy and image tensor."""
    model = copy.deepcopy(teacher)
    images = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([images], lr=0.25, betas=(0.5, 0.9))
    backend = None
    if name == "bare":
        feature_loss, close = (lambda: 0.0), (lambda: None)
    elif name == "sre2l":
        hooks = SRe2LBNHooks(model)
        feature_loss, close = hooks.loss, hooks.hooks.remove
    elif name == "sre2l_fast":
        reg = BNMatchLoss(model, R_BN, FIRST_BN)
        feature_loss, close = reg, reg.remove
    elif name in ("cfm", "cfm_before"):
        hooks = sre2l.cfm_hooks(model, stats, beta=BETA, eta=ETA, sites="bn", state=sre2l.CFMState(),
                                curriculum_total=50, backend="torch")
        hooks.set_curriculum(0)
        hooks.set_targets(targets)
        feature_loss, close = (lambda: sum(h.r_feature for h in hooks)), hooks.close
        backend = before if name == "cfm_before" else None
    elif name == "obvious":
        cap = Captured(model)
        feature_loss = lambda: obvious_loss(stats, cap.names, [cap.feats[n] for n in cap.names],  # noqa: E731
                                            targets, stats.num_classes, BETA, ETA)
        close = cap.hooks.remove
    else:
        raise SystemExit(f"unknown variant {name!r}")

    def step():
        with torch_backend_of(backend):
            opt.zero_grad()
            loss = F.cross_entropy(model(images), targets) + feature_loss()
            loss.backward()
            opt.step()
        return loss

    if name in ("cfm", "cfm_before"):
        step()
        hooks.next_batch()  # EMU active from here on (b = 2), as in every class-batch after the first
    return step, close


def make_isolated(teacher, stats, init, targets, before):
    """The loss alone: forward + backward on leaf copies of one forward's BN inputs."""
    cap = Captured(teacher)
    with torch.no_grad():
        teacher(init)
    cap.hooks.remove()
    shapes = {n: tuple(cap.feats[n].shape) for n in cap.names}
    bank = SiteBank(shapes)
    feats = [cap.feats[n].detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
             for n in cap.names]
    bank_stats = uf.RealStats({b: stats[n] for b, n in zip(bank.site_names, cap.names)},
                              {b: shapes[n][1:] for b, n in zip(bank.site_names, cap.names)},
                              "SiteBank", stats.num_images, stats.num_classes)
    cfm = uf.CFMLoss(bank, bank_stats, beta=BETA, eta=ETA, sites=bank.site_names, backend="torch")

    def ours(module=None):
        def run():
            with torch_backend_of(module):
                bank(feats)
                loss = cfm(targets)
                loss.backward()
            return loss
        return run

    def obvious():
        loss = obvious_loss(stats, cap.names, feats, targets, stats.num_classes, BETA, ETA)
        loss.backward()
        return loss

    fns = {"iso_cfm": ours(), "iso_obvious": obvious}
    if before is not None:
        fns["iso_cfm_before"] = ours(before)
    return fns, cfm.remove


def profile(fn, label, rows=12):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"--- profile: {label} (self CPU time, one run)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=50, help="class-batch size")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=21, help="timed rounds (one run of every variant each)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--layouts", default="NCHW,channels_last")
    parser.add_argument("--variants", default="bare,sre2l,sre2l_fast,cfm,cfm_before,obvious")
    parser.add_argument("--baseline-rev", default="",
                        help="git revision whose kernels/composite.py the *_before variants use (empty: none)")
    parser.add_argument("--no-isolated", action="store_true", help="skip timing the loss alone")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per variant and layout")
    parser.add_argument("--name", default="sre2l_dropin", help="JSON file name under bench/out/")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    before = composite_at(args.baseline_rev) if args.baseline_rev else None
    variants = [v for v in args.variants.split(",") if before is not None or not v.endswith("_before")]
    gen = torch.Generator().manual_seed(0)
    teacher = cifar_resnet18(args.classes).requires_grad_(False)
    stats = random_real_stats(site_shapes(teacher, 32), args.classes, type(teacher).__name__, gen)
    init = torch.randn(args.batch, 3, 32, 32, generator=gen)
    targets = torch.arange(args.batch) % args.classes
    rows = []
    for layout in args.layouts.split(","):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        net = copy.deepcopy(teacher).to(memory_format=fmt)
        x0 = init.contiguous(memory_format=fmt)
        fns, closers = {}, []
        for name in variants:
            fns[name], close = make_step(name, net, stats, x0, targets, before)
            closers.append(close)
        if "cfm_before" in fns:  # same statistics, same loss: the two composites agree
            a, b = float(fns["cfm"]().detach()), float(fns["cfm_before"]().detach())
            assert abs(a - b) <= 1e-3 * abs(b), (a, b)
        if not args.no_isolated:
            iso, close = make_isolated(net, stats, x0, targets, before)
            fns.update(iso)
            closers.append(close)
        if args.profile:
            for name, fn in fns.items():
                profile(fn, f"{layout} {name}")
        cpu = {name: [] for name in fns}
        times = interleaved_times({name: _cpu_timed(fn, cpu[name]) for name, fn in fns.items()},
                                  warmup=1, repeat=args.repeat)
        for close in closers:
            close()
        med = {k: statistics.median(t) for k, t in times.items()}
        cpu_med = {k: statistics.median(t[1:]) for k, t in cpu.items()}  # t[0]: the warm-up

        for name, t in times.items():
            row = {"layout": layout, "variant": name, "median_ms": med[name], "min_ms": min(t), "max_ms": max(t),
                   "cpu_ms": cpu_med[name], "repeat": len(t), "batch": args.batch, "threads": torch.get_num_threads()}
            if name in variants:
                for base in ("sre2l", "sre2l_fast"):
                    if base in med:
                        row[f"vs_{base}"] = med[name] / med[base]
                        row[f"cpu_vs_{base}"] = cpu_med[name] / cpu_med[base]
                if "bare" in med and name != "bare":
                    row["loss_part_ms"] = part(times, name)
                    row["cpu_loss_part_ms"] = part({k: v[1:] for k, v in cpu.items()}, name)
            if name.startswith("iso_"):
                row["loss_part_ms"], row["cpu_loss_part_ms"] = med[name], cpu_med[name]
            rows.append(row)
        parts = {r["variant"]: (r.get("loss_part_ms"), r.get("cpu_loss_part_ms")) for r in rows if r["layout"] == layout}
        for key, num, den in (("obvious_over_cfm_step_part", "obvious", "cfm"),
                              ("obvious_over_cfm_before_step_part", "obvious", "cfm_before"),
                              ("obvious_over_cfm_isolated", "iso_obvious", "iso_cfm"),
                              ("obvious_over_cfm_before_isolated", "iso_obvious", "iso_cfm_before")):
            if parts.get(num, (None,))[0] and parts.get(den, (None,))[0]:
                rows.append({"layout": layout, "variant": key, "ratio": parts[num][0] / parts[den][0],
                             "cpu_ratio": parts[num][1] / parts[den][1]})
    report(args.name, rows, ["layout", "variant", "median_ms", "cpu_ms", "vs_sre2l", "vs_sre2l_fast", "cpu_vs_sre2l",
                             "cpu_vs_sre2l_fast", "loss_part_ms", "cpu_loss_part_ms", "ratio", "cpu_ratio"],
           extra={"baseline_rev": args.baseline_rev or None, "baseline_commit": _commit(args.baseline_rev),
                  "commit": _commit("HEAD")})


def part(times: dict, name: str, base: str = "bare") -> float:
    """Median over rounds of the per-round difference ``name`` − ``base`` (ms)."""
    return statistics.median(a - b for a, b in zip(times[name], times[base]))


def _cpu_timed(fn, out: list):
    """``fn`` that appends its process CPU time (every thread, ms) to ``out``: steadier than
    wall time when the cores are oversubscribed."""
    def run():
        start = time.process_time()
        fn()
        out.append((time.process_time() - start) * 1e3)
    return run


def _commit(rev: str):
    if not rev:
        return None
    out = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()

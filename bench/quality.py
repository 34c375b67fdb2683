"""Quality experiments (docs/quality.md): CFM / SRe2L / random real top-1 at IPC 1 and 10.

One process loads the data, a teacher and its statistics once, then for every method
recovers a set per (ipc, seed) and trains a student on it, with the config of the
dataset's defaults plus ``--set`` overrides (those starting ``cfm:`` apply to CFM only).
Each set and each evaluation is cached under ``--cache`` by a hash of what determines it,
so the baselines are recovered and evaluated once per evaluation recipe and reused by every
CFM variant. Prints how far recovery moved CFM's images from the real ones it started
from, and one markdown row (what changed, the six numbers, seeds, command) and
appends the numbers to ``<cache>/quality.jsonl``. ``--tv W`` adds a total-variation prior
to CFM's loss; ``--init confident|hard`` starts CFM (and the random real baseline, which
is its starting images) from real images the teacher is most / least sure of.

    python bench/quality.py --dataset digits --teacher T --stats S --label "β 1" --set cfm:recover.beta=1
    python bench/quality.py --report CACHE     # the table of every experiment so far
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from unidd_fast.pipeline import config as config_mod
from unidd_fast.pipeline.datasets import prepare_data
from unidd_fast.pipeline.distilled import read_set
from unidd_fast.pipeline.evaluate import evaluate_set
from unidd_fast.pipeline.models import load_teacher
from unidd_fast.pipeline import recover
from unidd_fast.pipeline.recover import recover_one
from unidd_fast.pipeline.train import setup_device
from unidd_fast.real_stats import RealStats

METHODS = {"cfm": {}, "sre2l": {"recover.loss": "sre2l", "recover.init": ""},
           "random-real": {"recover.loss": "none", "recover.init": ""}}


class WithTotalVariation:
    """A recover regulariser plus ``weight`` · anisotropic total variation (mean |Δx| over
    neighbouring pixels) of the images the teacher sees; delegates everything else."""

    def __init__(self, inner, model, weight: float):
        self.inner, self.weight, self.images = inner, weight, None
        self.handle = model.register_forward_pre_hook(lambda m, inp: setattr(self, "images", inp[0]))

    def __call__(self, targets):
        x = self.images
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        return self.inner(targets) + self.weight * tv

    def remove(self):
        self.handle.remove()
        self.inner.remove()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def ranked_picks(teacher, data, device, part: str, fraction: float = 0.25):
    """A ``pick_real`` replacement: the same seeded draw of distinct images per class, but
    only among the ``fraction`` of each class the teacher is most ("confident") or least
    ("hard") sure of, by its softmax probability of the true label on the unaugmented image."""
    teacher.eval()
    with torch.no_grad():
        index = torch.arange(len(data.train_labels))
        prob = torch.cat([teacher(data.train_images(chunk).to(device)).softmax(1).cpu()
                          for chunk in index.split(256)])[index, data.train_labels]

    def pick(train_labels, num_classes, ipc, generator):
        picks = []
        for c in range(num_classes):
            members = torch.nonzero(train_labels == c).flatten()
            keep = max(ipc, round(fraction * members.numel()))
            order = prob[members].argsort(descending=part == "confident")
            pool = members[order[:keep]]
            picks.append(pool[torch.randperm(pool.numel(), generator=generator)[:ipc]])
        return torch.stack(picks, 1)

    return pick


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def report(cache: Path) -> str:
    """docs/quality.md's table from ``<cache>/quality.jsonl``: per experiment the six
    numbers (mean ± half-range over seeds), the paired CFM − random real per seed, the drift."""
    lines = []
    for line in (cache / "quality.jsonl").read_text().splitlines():
        r = json.loads(line)
        acc = {(m, i, s): a for m, i, s, a in r["results"]}
        seeds = sorted({s for _, _, s in acc})

        def cell(m, i):
            a = [acc[(m, i, s)] for s in seeds if (m, i, s) in acc]
            return f"{sum(a) / len(a):.1f} ± {(max(a) - min(a)) / 2:.1f}" if a else "-"

        def gap(i):
            g = [acc[("cfm", i, s)] - acc[("random-real", i, s)] for s in seeds
                 if ("cfm", i, s) in acc and ("random-real", i, s) in acc]
            return " / ".join(f"{x:+.1f}" for x in g) or "-"

        drift = r.get("drift") or {}
        moved = f"{sum(drift.values()) / len(drift):.3f}" if drift else "-"
        over = " ".join(r["overrides"]) or "-"
        lines.append("| " + " | ".join([r["dataset"], r["label"]] + [cell(m, i) for i in (1, 10)
                     for m in ("cfm", "sre2l", "random-real")] + [gap(1), gap(10), moved, f"`{over}`"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--report"]:
        print(report(Path(sys.argv[2] if len(sys.argv) > 2 else "bench/out/quality")))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--cache", default="bench/out/quality")
    p.add_argument("--ipc", default="1,10")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--label", default="default")
    p.add_argument("--methods", default="cfm,sre2l,random-real")
    p.add_argument("--tv", type=float, default=0.0, help="CFM only: weight of a total-variation prior")
    p.add_argument("--init", choices=("random", "confident", "hard"), default="random",
                   help="real images to start from: random (the default), or drawn from the quarter of each "
                        "class the teacher is most / least sure of (applies to random-real and cfm alike)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[cfm:]KEY=VALUE")
    args = p.parse_args(argv)
    base = config_mod.defaults(args.dataset)
    cfm_only = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key.startswith("cfm:"):
            cfm_only[key[4:]] = value
        else:
            config_mod.set_value(base, key, value)
    if args.tv:
        plain = recover.make_regularizer

        def with_tv(rc, model, stats):
            inner = plain(rc, model, stats)
            return WithTotalVariation(inner, model, args.tv) if rc.loss == "cfm" else inner

        recover.make_regularizer = with_tv
    torch.set_num_threads(1)
    device = setup_device(base)
    data = prepare_data(base)
    teacher, spec = load_teacher(args.teacher, device)
    teacher.requires_grad_(False)
    stats = RealStats.load(args.stats, device)
    if args.init != "random":
        recover.pick_real = ranked_picks(teacher, data, device, args.init)
    cache = Path(args.cache)
    ipcs = [int(s) for s in args.ipc.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    table: dict = {}
    paths: dict = {}
    started = time.perf_counter()
    for method in args.methods.split(","):
        cfg = copy.deepcopy(base)
        for key, value in {**METHODS[method], **(cfm_only if method == "cfm" else {})}.items():
            config_mod.set_value(cfg, key, value)
        for ipc in ipcs:
            for seed in seeds:
                tv = args.tv if method == "cfm" else 0.0
                init = args.init if method != "sre2l" and args.init != "random" else None
                rkey = _key(args.dataset, str(Path(args.teacher).resolve()), cfg.to_dict()["data"],
                            cfg.to_dict()["recover"], ipc, seed, *([tv] if tv else []), *([init] if init else []))
                root = cache / "sets" / rkey
                record = recover_one(cfg, data, teacher, stats if cfg.recover.loss == "cfm" else None, root, ipc,
                                     seed, device)
                ekey = _key(rkey, cfg.to_dict()["evaluate"])
                result_file = cache / "evals" / f"{ekey}.json"
                if result_file.is_file():
                    acc = json.loads(result_file.read_text())["accuracy"]
                else:
                    acc, _ = evaluate_set(cfg, data, teacher, spec, record["path"], seed, device)
                    result_file.parent.mkdir(parents=True, exist_ok=True)
                    result_file.write_text(json.dumps({"accuracy": acc}))
                table[(method, ipc, seed)] = 100 * acc
                paths[(method, ipc, seed)] = record["path"]
                print(f"{method} ipc={ipc} seed={seed}: {100 * acc:.2f}", file=sys.stderr, flush=True)

    def cell(method, ipc):
        accs = [table[(method, ipc, s)] for s in seeds if (method, ipc, s) in table]
        if not accs:
            return "-"
        return f"{sum(accs) / len(accs):.1f} ± {(max(accs) - min(accs)) / 2:.1f}"

    # how far recovery moved the images: mean |x − x0| in pixel units (0..1) against the
    # random real images of the same ipc and seed, which are exactly CFM's starting images
    drift = {}
    for (method, ipc, seed), path in paths.items():
        start = paths.get(("random-real", ipc, seed))
        if method == "cfm" and start:
            moved = read_set(path)[0].float() - read_set(start)[0].float()
            drift[f"ipc{ipc}_seed{seed}"] = round(float(moved.abs().mean()) / 255, 4)
    if drift:
        print(f"cfm drift mean |x - x0|: {drift}", file=sys.stderr, flush=True)
    command = "bench/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    row = [args.dataset, args.label] + [cell(m, i) for i in ipcs for m in ("cfm", "sre2l", "random-real")]
    print("| " + " | ".join(row + [args.seeds, f"`{command}`"]) + " |")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "quality.jsonl", "a") as handle:
        handle.write(json.dumps({"dataset": args.dataset, "label": args.label, "overrides": args.overrides + ([f"--tv {args.tv}"] if args.tv else [])
                                 + ([f"--init {args.init}"] if args.init != "random" else []),
                                 "results": [[m, i, s, a] for (m, i, s), a in table.items()], "drift": drift,
                                 "seconds": round(time.perf_counter() - started, 1)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

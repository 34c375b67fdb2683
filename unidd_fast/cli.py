"""The ``unidd-fast`` command: dataset distillation by spectral filtering (UniDD / CFM).

  unidd-fast distill                       the embedded default: digits on CPU, CFM vs. baselines
  unidd-fast squeeze|stats|recover|relabel|evaluate  one stage; chain them with --from DIR
  unidd-fast plan [flags]                  what a configuration costs (steps, bytes, memory, time), no work
  unidd-fast show DIR                      pictures of a run
  unidd-fast import-stats PATH             the authors' release statistics -> stats.safetensors
  unidd-fast kernels ...                   ahead-of-time kernel tools
  unidd-fast doctor ...                    check every backend of every fused op here, time them
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from . import distributed
from .errors import UniddError

STAGES = ("distill", "squeeze", "stats", "recover", "relabel", "evaluate")
DISTRIBUTED_STAGES = ("stats", "recover", "evaluate")  # the stages torchrun can shard
HELP = {
    "distill": "squeeze → stats → recover → evaluate with baselines (no arguments: digits on CPU)",
    "squeeze": "train the teacher on the real training set",
    "stats": "exact real statistics at every hook site of the teacher",
    "recover": "synthesise the distilled images (CFM loss, or --loss sre2l / none)",
    "relabel": "store the teacher's top-k soft labels of every evaluation epoch's augmented batches",
    "evaluate": "train students on distilled sets by online KD (or --labels); top-1 on the real test set",
    "show": "PNG grids of distilled images and plots of the filter responses",
    "kernels": "ahead-of-time kernel tools (arguments are passed on)",
    "doctor": "every backend of every fused op against float64 at a teacher's site shapes, timed "
              "(arguments are passed on; see unidd-fast doctor --help)",
    "import-stats": "convert the CFM release's statistic/<dataset>/input/ConvFeatureHook folder (running.npz "
                    "per conv site) into a statistics file for --teacher",
    "plan": "print steps, images, output bytes, peak memory and time (measured here, H100 predicted) of a "
            "configuration, before any work; takes distill's flags, needs no dataset",
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,10, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers like 1,10, got {text!r}")
    return values


def _stage_parser(sub, name: str):
    from .pipeline.config import DATASETS

    p = sub.add_parser(name, help=HELP[name], description=HELP[name])
    p.add_argument("--out", metavar="DIR", help=f"run directory to write (default ./runs/{name})")
    p.add_argument("--from", dest="from_dir", metavar="DIR",
                   help="run directory of the stage before (its config and files are the starting point)")
    p.add_argument("--dataset", choices=DATASETS, help="dataset (default digits, or the --from run's)")
    p.add_argument("--data", metavar="PATH", help="dataset root directory (not needed for digits)")
    p.add_argument("--recipe", choices=("ours", "paper", "release"),
                   help="presets of the recipe table in the README (default ours, or the --from run's)")
    p.add_argument("--ipc", type=_int_list, metavar="LIST", help="images per class, e.g. 1,10")
    p.add_argument("--seeds", type=_int_list, metavar="LIST", help="seeds, e.g. 0,1")
    p.add_argument("--iterations", type=int, metavar="N", help="recover iterations per class-batch")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to run (default: the dataset's)")
    p.add_argument("--arch", help="teacher architecture: resnet18, resnet50, resnet101, convnet")
    p.add_argument("--loss", choices=("cfm", "sre2l", "none"),
                   help="recover loss: cfm (default), sre2l (BN matching), none (random real images)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="recover: teacher forward/backward in fp32 or under bf16 autocast (statistics stay "
                        "fp32); auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"),
                   help="recover: capture the step as a CUDA graph once per class-batch shape and replay it "
                        "(auto: on for CUDA)")
    p.add_argument("--compile", action="store_true", default=None, help="recover: torch.compile the teacher")
    p.add_argument("--strict", action="store_true", default=None,
                   help="stats, recover: a fused-op backend or recover-step feature that fails the pre-flight "
                        "check is an error (default: warn and run without it)")
    p.add_argument("--teacher", metavar="FILE", help="teacher.safetensors written by squeeze")
    p.add_argument("--stats", metavar="FILE", help="stats.safetensors written by stats")
    p.add_argument("--teacher-checkpoint", metavar="FILE",
                   help="squeeze: start from this torch state dict (weights_only load); trains 0 epochs "
                        "unless --set squeeze.epochs=N")
    if name == "recover":
        p.add_argument("--allow-stats-mismatch", action="store_true",
                       help="use --stats although they were collected with another teacher or on other data")
    if name in ("evaluate", "relabel"):
        p.add_argument("--distilled", action="append", metavar="PATH",
                       help="a distilled set: a recover run directory, its distilled.json, or an ImageFolder of "
                            "images (any method's); repeatable")
    if name == "evaluate":
        p.add_argument("--labels", metavar="DIR", help="train from the soft labels of `unidd-fast relabel` "
                                                        "(its --out) instead of running the teacher")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. recover.lr=0.1 or evaluate.epochs=50 (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="--out holds an earlier run: delete what it wrote and start over (default: resume it, "
                        "or refuse if its configuration differs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines on the terminal")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unidd-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGES:
        _stage_parser(sub, name)
    plan = _stage_parser(sub, "plan")
    plan.add_argument("--nproc", type=int, default=1, metavar="N",
                      help="torchrun processes (GPUs) that stats, recover and evaluate are spread over (default 1)")
    show = sub.add_parser("show", help=HELP["show"], description=HELP["show"])
    show.add_argument("run", metavar="DIR", help="a recover or distill run directory")
    show.add_argument("--stats", metavar="FILE", help="statistics for the filter plot (default: the run's)")
    show.add_argument("--quiet", action="store_true")
    sub.add_parser("kernels", help=HELP["kernels"], add_help=False)
    sub.add_parser("doctor", help=HELP["doctor"], add_help=False)
    imp = sub.add_parser("import-stats", help=HELP["import-stats"], description=HELP["import-stats"])
    imp.add_argument("path", metavar="PATH", help="a ConvFeatureHook folder, or one <Model>.pth=<site>/running.npz in it")
    imp.add_argument("--teacher", metavar="FILE", required=True, help="teacher.safetensors written by squeeze")
    imp.add_argument("--out", metavar="FILE", required=True, help="statistics file to write (safetensors)")
    imp.add_argument("--force", action="store_true", help="replace an existing --out file")
    return parser


def resolve_config(args):
    """The run's Config: the --from run's config (or the dataset's defaults), then flags,
    then --set overrides. Returns (config, artifacts of the --from run)."""
    from .errors import ConfigError
    from .pipeline import config
    from .pipeline.rundir import read_results

    artifacts = {}
    if args.from_dir:
        if not Path(args.from_dir).expanduser().is_dir():
            what = "is not a run directory" if Path(args.from_dir).expanduser().exists() else "does not exist"
            raise ConfigError(f"--from {args.from_dir} {what}; point it at the --out directory of an earlier "
                              "unidd-fast stage")
        cfg = config.load(Path(args.from_dir).expanduser() / "config.json")
        artifacts = read_results(args.from_dir).get("artifacts", {})
        if args.dataset and args.dataset != cfg.data.dataset:
            raise ConfigError(f"--dataset {args.dataset} differs from the --from run's dataset {cfg.data.dataset}")
        if args.recipe and args.recipe != cfg.recipe:
            raise ConfigError(f"--recipe {args.recipe} differs from the --from run's recipe {cfg.recipe}; "
                              "start a new chain with --recipe, or change single values with --set")
    else:
        cfg = config.defaults(args.dataset or "digits", args.recipe or "ours")
    flags = {"data.data": args.data, "ipc": args.ipc, "seeds": args.seeds, "recover.iterations": args.iterations,
             "device": args.device, "model.arch": args.arch, "recover.loss": args.loss,
             "recover.precision": args.precision, "recover.cuda_graphs": args.cuda_graphs,
             "recover.compile": args.compile, "recover.strict": args.strict}
    for key, value in flags.items():
        if value is not None:
            config.set_value(cfg, key, value)
    overridden = set()
    for text in args.overrides:
        key, value = config.parse_assignment(text)
        config.set_value(cfg, key, value)
        overridden.add(key)
    if args.teacher_checkpoint and "squeeze.epochs" not in overridden:
        cfg.squeeze.epochs = 0
    config.validate(cfg)
    return cfg, artifacts


def _artifact(args, artifacts: dict, name: str, stage: str):
    from .errors import ConfigError

    value = getattr(args, name) or artifacts.get(name)
    if not value:
        raise ConfigError(f"{stage} needs --{name} FILE, or --from the run directory of `unidd-fast "
                          f"{'squeeze' if name == 'teacher' else 'stats'}`")
    return value


def run_stage(args) -> int:
    from .errors import ConfigError
    from .pipeline import checks
    from .pipeline.rundir import RunDir
    from .progress import set_quiet

    set_quiet(args.quiet)
    cfg, artifacts = resolve_config(args)
    command = args.command
    inputs = {}
    if command in ("stats", "recover", "relabel", "evaluate"):
        inputs["teacher"] = _artifact(args, artifacts, "teacher", command)
    if command == "recover":
        cfm = cfg.recover.loss == "cfm"
        inputs["stats"] = _artifact(args, artifacts, "stats", command) if cfm else args.stats
    if command in ("evaluate", "relabel"):
        inputs["sets"] = args.distilled or artifacts.get("distilled")
        if not inputs["sets"]:
            raise ConfigError(f"{command} needs --distilled PATH or --from a recover run directory")
    if command == "evaluate" and args.labels:
        checks.check_exists("--labels", args.labels, "write the labels with `unidd-fast relabel`")
    _check_inputs(args, inputs)
    out_path = Path(args.out or Path("runs") / command)
    here = _join_torchrun(cfg, command)
    try:
        if here.is_main:
            checks.check_writable(out_path)
        out = RunDir(out_path, quiet=args.quiet, force=args.force)
        try:
            _run(command, cfg, out, inputs, args)
        finally:
            out.unlock()
    finally:  # on every way out: a process group left to the interpreter's exit may abort it
        distributed.shutdown()
    if here.is_main:
        print(f"wrote {out.path}", flush=True)
    return 0


def _check_inputs(args, inputs: dict) -> None:
    """Every input file named exists (before any data is read)."""
    from .pipeline import checks

    if args.teacher_checkpoint:
        checks.check_exists("--teacher-checkpoint", args.teacher_checkpoint, "give a torch.save state dict file")
    if inputs.get("teacher"):
        checks.check_exists("--teacher", inputs["teacher"], "train one with `unidd-fast squeeze`")
    if inputs.get("stats"):
        checks.check_exists("--stats", inputs["stats"], "collect them with `unidd-fast stats`")
    for entry in inputs.get("sets") or []:
        path = entry["path"] if isinstance(entry, dict) else entry
        checks.check_exists("--distilled", path, "give a recover run directory, its distilled.json or an image folder")


def _join_torchrun(cfg, command: str):
    """Under torchrun: join the process group (gloo on CPU, NCCL on GPU) for the stages that
    shard their work; refuse the others. Returns this process's DistInfo."""
    from .errors import ConfigError
    from .pipeline.train import resolve_device

    if not distributed.launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return distributed.info()
    if command not in DISTRIBUTED_STAGES:
        raise ConfigError(f"`unidd-fast {command}` runs in one process; torchrun shards only "
                          f"{', '.join(DISTRIBUTED_STAGES)}: launch it without torchrun")
    return distributed.init(resolve_device(cfg.device))


def _run(command: str, cfg, out, inputs: dict, args) -> None:
    from .pipeline import distill, evaluate, recover, relabel, squeeze, stats

    if command == "distill":
        distill.run(cfg, out, args.teacher_checkpoint)
    elif command == "squeeze":
        squeeze.run(cfg, out, args.teacher_checkpoint)
    elif command == "stats":
        stats.run(cfg, out, inputs["teacher"])
    elif command == "recover":
        recover.run(cfg, out, inputs["teacher"], inputs["stats"], args.allow_stats_mismatch)
    elif command == "relabel":
        relabel.run(cfg, out, inputs["teacher"], inputs["sets"])
    else:
        results = evaluate.run(cfg, out, inputs["teacher"], inputs["sets"], args.labels)
        if out.main:
            print(evaluate.summary_table(results["results"], results["teacher_accuracy"]), flush=True)


def run_show(args) -> int:
    import json

    from .pipeline import show
    from .pipeline.config import load

    root = Path(args.run).expanduser()
    stats_path, beta, beta_min = args.stats, 0.1, 1e-6
    results = root / "results.json"
    if stats_path is None and results.is_file():
        stats_path = json.loads(results.read_text()).get("artifacts", {}).get("stats")
    if (root / "config.json").is_file():
        cfg = load(root / "config.json")
        beta, beta_min = cfg.recover.beta, cfg.recover.beta_min
    for path in show.run(root, stats_path, beta, beta_min):
        print(path)
    return 0


def run_import_stats(args) -> int:
    from .compat.release import import_release_stats
    from .errors import ConfigError
    from .pipeline.models import load_teacher

    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out} exists; choose another file or add --force to replace it")
    model, spec = load_teacher(Path(args.teacher).expanduser())
    stats = import_release_stats(args.path, model, spec["num_classes"],
                                 (spec["channels"], spec["image_size"], spec["image_size"]))
    stats.save(out)
    print(f"{out}: {len(stats)} conv sites of {stats.provenance['checkpoint']} ({stats.model_class}, "
          f"{stats.num_classes} classes, covariance {stats.provenance['covariance']}); use it with "
          "--stats FILE --set recover.sites=conv")
    return 0


def run_plan(args) -> int:
    from .errors import ConfigError
    from .pipeline import plan

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    cfg, _ = resolve_config(args)
    print(plan.run(cfg, args.nproc, teacher_checkpoint=bool(args.teacher_checkpoint)), flush=True)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "kernels":
        from .kernels import compile_report

        return compile_report.main(argv[1:]) or 0
    if argv and argv[0] == "doctor":
        from . import doctor

        return doctor.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "import-stats":
            return run_import_stats(args)
        if args.command == "plan":
            return run_plan(args)
        return run_show(args) if args.command == "show" else run_stage(args)
    except UniddError as exc:
        print(f"unidd-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"unidd-fast {args.command}: error: no space left on device writing {exc.filename}: free some space "
              "(or choose another --out) and rerun the same command to continue", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"unidd-fast {args.command}: error: out of memory: lower data.image_size or the batch sizes "
              "(--set squeeze.batch_size=..., recover.batch_size=..., evaluate.batch_size=...)", file=sys.stderr)
        return 2

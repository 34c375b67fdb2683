"""Run docs/sre2l.md's patch against a real SRe2L checkout, tiny, on the CPU, without network.

    python bench/check_sre2l_dropin.py PATH/TO/SRe2L [--script sre2l|cda_in1k] [--work DIR]
        [--classes 4] [--batch-size 2] [--iterations 20] [--ipc 2] [--images-per-class 6]

PATH is a checkout of https://github.com/VILA-Lab/SRe2L (the directory holding ``SRe2L/``
and ``CDA/``). Not part of the test suite: it needs their repository. In ``--work``
(default: a new temporary directory) it

1. writes a fake ImageNet: an ImageFolder of ``--classes`` classes of 256×256 JPEGs, each
   class its own colour and stripe frequency plus noise;
2. makes the teacher that the script's ``pretrained=True`` loads: a torchvision resnet18 with
   random weights (seed 0) whose BatchNorm running statistics are recomputed on the fake
   data, saved where torchvision looks for the IMAGENET1K_V1 file
   (``$TORCH_HOME/hub/checkpoints/``), and likewise a random mobilenet_v2 as the verifier;
3. collects the real statistics as docs/sre2l.md section 1 does (``collect_real_stats``,
   ``sites="bn"``, 1000 classes, of which the fake data fill ``--classes``);
4. copies the recover script twice: ``base`` (unpatched) and ``cfm`` (the blocks of
   docs/sre2l.md marked ``<!-- sre2l-patch: NAME -->``, inserted where ``ANCHORS`` says), and
   applies the same mechanical edits (``MECHANICAL``) to both: CPU instead of CUDA, the class
   loop over ``--classes`` classes instead of 1000, the losses printed at every iteration;
   for CDA also a stand-in ``wandb`` module on the path (wandb is not installed here);
5. runs ``base`` over ipc ids 0..ipc−1 in one process, and ``cfm`` split in two processes by
   ipc range with ``--cfm-emu-state`` (patch e.), then the second part once more, which must
   be refused (its state file now ends after the last ipc id); prints the first and last
   printed ``loss_r_bn_feature`` of every class-batch and the images written, and writes
   ``check_sre2l.json`` in ``--work``.

It exits 1 if a run fails, a printed loss is not finite, an image is missing, the wrong range
is not refused, or a feature loss does not decrease over a class-batch (the mean of its last
fifth of iterations against that of its first fifth: every iteration sees another random
crop): every class-batch of ``base``, the first of ``cfm``. Later CFM class-batches match
the EMU blend, in which the finished batches' statistics are fixed and the current batch
weighs 1/b, and with fewer than 11 images per class-batch the 7×7 ``layer4`` sites see fewer
rows (n·49) than channels (512), which puts a floor under the filter term: over a few tens
of iterations they need not decrease (docs/sre2l.md section 4 has the numbers).

CDA's in1k script prints losses only with ``--verifier``, which stops it after its first
class-batch (see docs/sre2l.md), so for ``cda_in1k`` each run is one process that makes one
class-batch, and ``cfm`` is not split.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "sre2l.md"

SCRIPTS = {"sre2l": "SRe2L/recover", "cda_in1k": "CDA"}
MAIN = {"sre2l": "data_synthesis.py", "cda_in1k": "recover_cda_in1k.py"}

# where each documented block goes: (regex of the one line it refers to, how)
# "after"/"before": insert at that line's indentation; "replace": the block from that line
# through the first later line matching the second regex is replaced.
ANCHORS = {
    "import": (r"from utils import", "after"),
    "arguments": (r"args = parser\.parse_args\(\)", "before"),
    "hooks": (r"loss_r_feature_layers = \[\]", "replace", r".*BNFeatureHook\(module\)"),
    "targets": (r"targets = targets_all\[", "after"),
    "next_batch": (r"optimizer\.state = collections\.defaultdict\(dict\)", "after"),
    "close": (r"torch\.cuda\.empty_cache\(\)", "before"),
    "emu_load": (r"for ipc_id in range\(args\.ipc_start, args\.ipc_end\):", "before"),
    "emu_save": (r"main_syn\(", "after"),
}

# mechanical edits for a CPU run of a few classes: (what, regex, replacement, only on lines matching)
MECHANICAL = (
    ("device strings 'cuda' -> 'cpu'", r"""(['"])cuda\1""", r"\1cpu\1", None),
    (".cuda() -> .cpu()", r"\.cuda\(\)", ".cpu()", None),
    ("the class loop: 1000 -> CLASSES classes", r"\b1000\b", "{classes}", r"arange\(|range\(0, 1000|kk"),
    ("losses printed at every iteration", r"save_every = 100\b", "save_every = 1", None),
)


class PatchError(Exception):
    """The script or the docs do not have the shape the patch expects."""


def doc_blocks(text: str) -> dict[str, str]:
    """NAME -> code of every ```python block preceded by a line ``<!-- sre2l-patch: NAME -->``."""
    blocks = {}
    for match in re.finditer(r"^<!-- sre2l-patch: (\w+) -->\n```python\n(.*?)^```", text, re.M | re.S):
        if match.group(1) in blocks:
            raise PatchError(f"docs: two blocks named {match.group(1)!r}")
        blocks[match.group(1)] = match.group(2)
    return blocks


def _one_line(lines: list[str], pattern: str, name: str, start: int = 0) -> int:
    hits = [i for i in range(start, len(lines)) if re.match(r"\s*" + pattern, lines[i])]
    if len(hits) != 1:
        raise PatchError(f"block {name!r}: {len(hits)} lines match {pattern!r} in the script, expected 1: "
                         "the script is not of the shape docs/sre2l.md describes")
    return hits[0]


def _indent(block: str, prefix: str) -> list[str]:
    return [(prefix + line if line.strip() else line) for line in block.splitlines(keepends=True)]


def apply_patch(source: str, blocks: dict[str, str]) -> str:
    """The script ``source`` with every documented block inserted at its anchor."""
    missing = sorted(set(ANCHORS) - set(blocks))
    if missing:
        raise PatchError(f"docs/sre2l.md has no block(s) {missing}")
    lines = source.splitlines(keepends=True)
    for name, (pattern, how, *end) in ANCHORS.items():
        i = _one_line(lines, pattern, name)
        prefix = re.match(r"\s*", lines[i]).group(0)
        new = _indent(blocks[name], prefix)
        if how == "after":
            lines[i + 1:i + 1] = new
        elif how == "before":
            lines[i:i] = new
        else:
            j = _one_line(lines, end[0], name, i)
            lines[i:j + 1] = new
    return "".join(lines)


def mechanical(source: str, classes: int) -> str:
    """The CPU/size edits of ``MECHANICAL`` (the same for the patched and the unpatched script)."""
    out = []
    for line in source.splitlines(keepends=True):
        for _, pattern, repl, only in MECHANICAL:
            if only is None or re.search(only, line):
                line = re.sub(pattern, repl.format(classes=classes), line)
        out.append(line)
    return "".join(out)


WANDB_STUB = '''"""Stand-in for wandb in the CPU check (bench/check_sre2l_dropin.py): logs nothing."""
from types import SimpleNamespace
api = SimpleNamespace(api_key="offline")
def login(**kw): pass
def init(**kw): pass
def log(metrics): pass
def finish(): pass
'''


def fake_imagenet(root: Path, classes: int, per_class: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.uniform(0.2, 0.8, size=3)
        for k in range(per_class):
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (c + 2) * (xx + yy * rng.uniform(-1, 1)))
            img = colour * stripes[..., None] + rng.normal(0, 0.1, size=(256, 256, 3))
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"img{k}.jpg")


def make_models(data: Path, torch_home: Path, seed: int = 0) -> Path:
    """Random resnet18 (BN statistics recomputed on ``data``) and mobilenet_v2, saved under the
    file names torchvision's ``pretrained=True`` looks for; returns the teacher's path."""
    import torch
    import torchvision
    from torchvision import models

    ckpt = torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    teacher = models.resnet18()
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the whole pass
    teacher.train()
    with torch.no_grad():
        for images, _ in _loader(data, batch_size=8):
            teacher(images)
    teacher_path = ckpt / Path(models.ResNet18_Weights.IMAGENET1K_V1.url).name
    torch.save(teacher.state_dict(), teacher_path)
    verifier = torchvision.models.mobilenet_v2()
    torch.save(verifier.state_dict(), ckpt / Path(models.MobileNet_V2_Weights.IMAGENET1K_V1.url).name)
    return teacher_path


def _loader(data: Path, batch_size: int):
    import torch
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(str(data), tf), batch_size=batch_size)


def collect_stats(data: Path, teacher_path: Path, out: Path) -> None:
    """docs/sre2l.md section 1, on the CPU."""
    import torch
    import torchvision

    import unidd_fast as uf

    teacher = torchvision.models.resnet18()
    teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
    stats = uf.collect_real_stats(teacher.eval(), _loader(data, batch_size=8), num_classes=1000, sites="bn")
    stats.save(out)


def parse_log(text: str) -> list[list[float]]:
    """The printed ``loss_r_bn_feature`` values, one list per class-batch (a class-batch
    starts at the print of iteration 0)."""
    runs: list[list[float]] = []
    for line in text.splitlines():
        if re.match(r"-+iteration 0-+$", line.strip()):
            runs.append([])
        m = re.match(r"loss_r_bn_feature (\S+)$", line.strip())
        if m and runs:
            runs[-1].append(float(m.group(1)))
    return runs


def end_means(values: list[float]) -> tuple[float, float]:
    """Means of the first and the last fifth (at least one value) of a class-batch's printed
    losses: each iteration sees another random crop, so single values are noisy."""
    k = max(1, len(values) // 5)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def run(cmd: list[str], cwd: Path, env: dict, log: Path, expect_ok: bool = True) -> str:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    log.write_text(proc.stdout + proc.stderr)
    if (proc.returncode == 0) != expect_ok:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SystemExit(f"exit code {proc.returncode} (expected {'0' if expect_ok else 'non-zero'}), "
                         f"log {log}:\n{tail}")
    return proc.stdout + proc.stderr

MARKER = ".check_sre2l_dropin"  # in --work: a folder this check made


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="checkout of VILA-Lab/SRe2L")
    parser.add_argument("--script", choices=sorted(SCRIPTS), default="sre2l")
    parser.add_argument("--work", type=Path, default=None, help="working directory (default: a new temp dir)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--ipc", type=int, default=2, help="ipc ids 0..ipc-1 (cfm: split after the first)")
    parser.add_argument("--images-per-class", type=int, default=6)
    args = parser.parse_args(argv)
    src = args.checkout / SCRIPTS[args.script] / MAIN[args.script]
    if not src.is_file():
        parser.error(f"{src} does not exist: pass a checkout of VILA-Lab/SRe2L")
    if args.classes % args.batch_size or args.ipc < 2:
        parser.error("--classes must be a multiple of --batch-size (their l2 prior reshapes by batch size) "
                     "and --ipc at least 2 (the cfm run is split after ipc id 0)")
    work = args.work or Path(tempfile.mkdtemp(prefix="sre2l_check_"))
    marker = work / MARKER  # what this check writes it may replace on a rerun; nothing else
    if work.is_dir() and any(work.iterdir()) and not marker.exists():
        parser.error(f"--work {work} holds files this check did not write; give a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()

    blocks = doc_blocks(DOCS.read_text())
    data, torch_home, stats = work / "fake_imagenet", work / "torch_home", work / "stats.safetensors"
    if not data.exists():
        fake_imagenet(data, args.classes, args.images_per_class)
    teacher_path = make_models(data, torch_home)
    collect_stats(data, teacher_path, stats)

    stub = work / "stubs"
    stub.mkdir(exist_ok=True)
    (stub / "wandb.py").write_text(WANDB_STUB)
    env = dict(os.environ, TORCH_HOME=str(torch_home), PYTHONPATH=os.pathsep.join([str(stub), str(ROOT)]))
    source = src.read_text()
    variants = {"base": source, "cfm": apply_patch(source, blocks)}
    common = ["--batch-size", str(args.batch_size), "--iteration", str(args.iterations), "--lr", "0.25",
              "--store-best-images", "--verifier", "--syn-data-path", str(work / "syn")]
    if args.script == "sre2l":
        common += ["--l2-scale", "0", "--tv-l2", "0"]
    result = {"script": f"{SCRIPTS[args.script]}/{MAIN[args.script]}", "edits": [m[0] for m in MECHANICAL],
              "args": vars(args) | {"checkout": str(args.checkout), "work": str(work)}, "runs": {}}
    # CDA stops after its first class-batch under --verifier (the only way it prints losses),
    # before emu_save: split the cfm run by ipc range (patch e.) only for SRe2L's script
    split, state = args.script == "sre2l", work / "emu.safetensors"
    state.unlink(missing_ok=True)
    ok = True
    for name, text in variants.items():
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(src.parent, folder)
        (folder / MAIN[args.script]).write_text(mechanical(text, args.classes))
        cmd = [sys.executable, MAIN[args.script], "--exp-name", name] + common
        if name == "base":
            parts = [["--r-bn", "0.01", "--ipc-start", "0", "--ipc-end", str(args.ipc)]]
        else:
            cfm = ["--r-bn", "1", "--first-bn-multiplier", "1", "--cfm-stats", str(stats), "--cfm-ipc-total", str(args.ipc)]
            if split:
                cfm += ["--cfm-emu-state", str(state)]
                parts = [cfm + ["--ipc-start", "0", "--ipc-end", "1"], cfm + ["--ipc-start", "1", "--ipc-end", str(args.ipc)]]
            else:
                parts = [cfm + ["--ipc-start", "0", "--ipc-end", str(args.ipc)]]
        batches = []
        for k, extra in enumerate(parts):
            batches += parse_log(run(cmd + extra, folder, env, work / f"{name}_{k}.log"))
        if name == "cfm" and split:  # the second part again: its state now ends after ipc id ipc-1
            refused = run(cmd + parts[1], folder, env, work / "cfm_refused.log", expect_ok=False)
            result["refused_wrong_range"] = refused.strip().splitlines()[-1]
            ok &= "run the earlier ranges first" in result["refused_wrong_range"]
        images = sorted(str(p.relative_to(work)) for p in (work / "syn" / name).glob("new*/*.jpg"))
        ends = [end_means(b) for b in batches]
        decreasing = [last < first for first, last in ends]
        finite = all(math.isfinite(v) for b in batches for v in b)
        # base: every class-batch; cfm: the first (see the docstring)
        ok &= bool(batches) and finite and all(decreasing if name == "base" else decreasing[:1]) and bool(images)
        result["runs"][name] = {"commands": [" ".join(cmd + extra) for extra in parts], "class_batches": batches,
                                "end_means": ends, "decreasing": decreasing, "finite": finite, "images": images}
        print(f"{name}: {len(batches)} class-batches, loss_r_bn_feature first -> last iteration "
              "(mean of the first -> last fifth): "
              + ", ".join(f"{b[0]:.4g} -> {b[-1]:.4g} ({e[0]:.4g} -> {e[1]:.4g})" for b, e in zip(batches, ends))
              + f"; {len(images)} images")
    if args.script == "sre2l":
        want = args.classes * args.ipc
        for name, r in result["runs"].items():
            if len(r["images"]) != want:
                print(f"{name}: {len(r['images'])} images, expected {want}")
                ok = False
    (work / "check_sre2l.json").write_text(json.dumps(result, indent=1))
    print(f"{'OK' if ok else 'FAILED'}; details in {work / 'check_sre2l.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

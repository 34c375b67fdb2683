"""Compile report of the CUDA sources in ``csrc/``, without a GPU.

``compile_report()`` nvcc-compiles every ``csrc/*.cu`` on its own (they are torch-free, so
this takes seconds) to a cubin per target and reads, per kernel, registers, local memory
(spills) and shared memory with ``cuobjdump --dump-resource-usage``, and whether
tensor-core instructions (HMMA / HGMMA / IMMA ...) appear in its SASS.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .._utils import CSRC

# Kernels meant to run on tensor cores: none yet — every csrc/ kernel accumulates with fp32
# FMAs (docs/cuda.md), so a tensor-core instruction in one of them would be a surprise.
TENSOR_CORE_KERNELS: frozenset[str] = frozenset()
TENSOR_CORE_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QMMA", "QGMMA", "BMMA", "DMMA", "UTCMMA")


def _cuda_home_bins() -> list[Path]:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return [Path(h) / "bin" for h in homes if h]


def find_tool(name: str) -> str | None:
    """``name`` from $CUDA_HOME/bin, PATH, /usr/local/cuda/bin, or (cuobjdump, nvdisasm) the
    copy that ships inside the triton wheel."""
    for d in _cuda_home_bins():
        if (d / name).is_file():
            return str(d / name)
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled kernel symbol -> short name such as ``gram_kernel<float>``."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = {}
    for mangled, full in zip(names, out):
        full = re.sub(r"^void ", "", full)
        full = re.sub(r"\w+::|\(anonymous namespace\)::", "", full)
        depth, end = 0, len(full)
        for i, ch in enumerate(full):  # cut the parameter list at the first top-level '('
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                end = i
                break
        short[mangled] = full[:end]
    return short


def _resource_usage(cuobjdump: str, cubin: Path) -> dict[str, dict]:
    text = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    usage, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            usage[name] = {"registers": int(fields.get("REG", 0)), "spill_bytes": int(fields.get("LOCAL", 0)),
                           "shared_bytes": int(fields.get("SHARED", 0))}
            name = None
    return usage


def _tensor_core_kernels(cuobjdump: str, cubin: Path) -> set[str]:
    text = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    found, name = set(), None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
        elif name and any(re.search(rf"\b{op}\b", line) for op in TENSOR_CORE_OPS):
            found.add(name)
    return found


def _failure(kernel: str, target: str, error: str) -> dict:
    return {"kernel": kernel, "backend": "cuda", "target": target, "ok": False, "registers": None,
            "spill_bytes": None, "shared_bytes": None, "tensor_cores": None, "error": error}


def compile_report(arches=("sm_90a", "sm_80"), csrc: Path | str | None = None) -> list[dict]:
    """Compile every ``csrc/*.cu`` for each target in ``arches``; one record per kernel and target:
    {"kernel", "backend": "cuda", "target", "ok", "registers", "spill_bytes", "shared_bytes",
    "tensor_cores", "tensor_cores_expected", "source"} (+ "error" when the file did not compile). Without nvcc every
    record says so (ok False) instead of raising, so a combined report stays complete."""
    csrc = Path(csrc) if csrc is not None else CSRC
    sources = sorted(csrc.glob("*.cu"))
    if not sources:
        return [_failure(str(csrc), arch, f"no .cu files in {csrc}: run from a source checkout of unidd_fast")
                for arch in arches]
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    missing = [t for t, p in (("nvcc", nvcc), ("cuobjdump", cuobjdump)) if p is None]
    if missing:
        why = (f"{' and '.join(missing)} not found (looked in $CUDA_HOME/bin, PATH, /usr/local/cuda/bin and the "
               "triton wheel): install the CUDA toolkit and set CUDA_HOME")
        return [_failure(src.name, arch, why) for src in sources for arch in arches]
    records = []
    with tempfile.TemporaryDirectory(prefix="unidd_cubin_") as tmp:
        for src in sources:
            for arch in arches:
                cubin = Path(tmp) / f"{src.stem}.{arch}.cubin"
                proc = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-I", str(csrc),
                                       "-o", str(cubin), str(src)], capture_output=True, text=True)
                if proc.returncode != 0:
                    records.append(_failure(src.name, arch, (proc.stderr or proc.stdout)[-2000:]))
                    continue
                usage = _resource_usage(cuobjdump, cubin)
                tensor_cores = _tensor_core_kernels(cuobjdump, cubin)
                short = _demangle(sorted(usage))
                for mangled in sorted(usage, key=short.get):
                    records.append({"kernel": short[mangled], "backend": "cuda", "target": arch, "ok": True,
                                    **usage[mangled], "tensor_cores": mangled in tensor_cores,
                                    "tensor_cores_expected": short[mangled].split("<")[0] in TENSOR_CORE_KERNELS,
                                    "source": src.name})
    return records

"""Checks of the CUDA sources in ``csrc/`` that need no GPU.

* ``compile_report()``: nvcc-compiles every ``csrc/*.cu`` on its own (they are torch-free,
  so this takes seconds) to a cubin per target and reads, per kernel, registers, local
  memory (spills) and shared memory with ``cuobjdump --dump-resource-usage``, and whether
  tensor-core instructions (HMMA / HGMMA / IMMA ...) appear in its SASS.
* ``build_emulator()`` / ``EmulatedKernels``: the same sources compiled by g++ against
  ``csrc/emu.h``, a CPU emulation of the CUDA thread model (blocks in sequence, threads as
  fibres switching at ``__syncthreads``), loaded with ctypes behind the interface of the
  extension ``unidd_fast._cuda``. The kernels' arithmetic, indexing and barriers run for
  real on CPU tensors; races, the GPU memory model and speed are not checked.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
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


# ---- CPU emulation ------------------------------------------------------------------

def build_emulator(out_dir: Path | str, csrc: Path | str | None = None) -> Path:
    """g++-compile ``csrc/*.cu`` against ``csrc/emu.h`` into a shared library in ``out_dir``
    (reused while the sources are unchanged). Raises RuntimeError when g++ is missing or fails."""
    csrc = Path(csrc) if csrc is not None else CSRC
    sources = sorted(csrc.glob("*.cu"))
    headers = sorted(csrc.glob("*.h")) + sorted(csrc.glob("*.cuh"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources + headers)).hexdigest()[:16]
    lib = Path(out_dir) / f"libunidd_emu_{digest}.so"
    if lib.exists():
        return lib
    gxx = shutil.which("g++")
    if gxx is None:
        raise RuntimeError("g++ not found: the CPU emulation of the CUDA kernels needs a C++17 compiler")
    cmd = [gxx, "-x", "c++", "-std=c++17", "-O2", "-DUNIDD_EMULATE", "-fPIC", "-shared", "-I", str(csrc),
           "-o", str(lib), *map(str, sources)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed:\n{proc.stderr[-4000:]}")
    return lib


class _FeatureMap(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("dtype", ctypes.c_int), ("n", ctypes.c_int), ("d", ctypes.c_int),
                ("hw", ctypes.c_int), ("stride_n", ctypes.c_int64), ("stride_c", ctypes.c_int64),
                ("stride_p", ctypes.c_int64)]


class _InvGroup(ctypes.Structure):
    _fields_ = [("a", ctypes.c_void_p), ("out", ctypes.c_void_p), ("work_offset", ctypes.c_int64),
                ("k", ctypes.c_int), ("d", ctypes.c_int), ("info_offset", ctypes.c_int)]


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class EmulatedKernels:
    """The interface of ``unidd_fast._cuda`` on CPU tensors, backed by the emulated kernels."""

    device_type = "cpu"

    def __init__(self, lib_path: Path | str):
        self.lib = ctypes.CDLL(str(lib_path))
        vp, i = ctypes.c_void_p, ctypes.c_int
        self.lib.unidd_stats_chunks.argtypes = [i, i, i, i]
        self.lib.unidd_stats_forward.argtypes = [_FeatureMap, i, vp, vp, vp, vp, vp, vp]
        self.lib.unidd_stats_backward.argtypes = [_FeatureMap, vp, vp, vp, vp, vp, vp]
        self.lib.unidd_inverse.argtypes = [ctypes.POINTER(_InvGroup), i, vp, vp, vp, vp]
        self.INVERSE_TILE = self.lib.unidd_inverse_tile()
        self.INVERSE_MAX_GROUPS = self.lib.unidd_inverse_max_groups()

    @staticmethod
    def _check(err: int, what: str) -> None:
        if err != 0:
            raise RuntimeError(f"emulated {what} failed with CUDA error code {err}")

    @staticmethod
    def _map(x, n, d, hw, sn, sc, sp) -> _FeatureMap:
        return _FeatureMap(x.data_ptr(), _DTYPE_CODES[x.dtype], n, d, hw, sn, sc, sp)

    def stats_chunks(self, n, d, hw, num_sms) -> int:
        return self.lib.unidd_stats_chunks(n, d, hw, num_sms)

    def stats_forward(self, x, n, d, hw, sn, sc, sp, num_sms, partial, psum, psi, mu, pooled) -> None:
        self._check(self.lib.unidd_stats_forward(self._map(x, n, d, hw, sn, sc, sp), num_sms, _ptr(partial),
                                                 _ptr(psum), _ptr(psi), _ptr(mu), _ptr(pooled), None),
                    "stats_forward")

    def stats_backward(self, x, n, d, hw, sn, sc, sp, mu, gpsi, gmu, gpooled, dx) -> None:
        self._check(self.lib.unidd_stats_backward(self._map(x, n, d, hw, sn, sc, sp), _ptr(mu), _ptr(gpsi),
                                                  _ptr(gmu), _ptr(gpooled), _ptr(dx), None), "stats_backward")

    def inverse(self, a, out, work_offsets, info_offsets, beta, work, info) -> None:
        groups = (_InvGroup * len(a))(*(_InvGroup(ai.data_ptr(), oi.data_ptr(), wo, ai.shape[0], ai.shape[-1], io)
                                        for ai, oi, wo, io in zip(a, out, work_offsets, info_offsets)))
        self._check(self.lib.unidd_inverse(groups, len(a), _ptr(beta), _ptr(work), _ptr(info), None), "inverse")

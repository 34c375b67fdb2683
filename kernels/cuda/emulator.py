"""CPU emulation of the CUDA kernels, for the tests: the sources of ``csrc/`` compiled by g++
against ``csrc/emu.h`` (blocks in sequence, threads as fibres switching at
``__syncthreads``), loaded with ctypes behind the interface of the extension
``unidd_fast._cuda``. The kernels' arithmetic, indexing and barriers run for real on CPU
tensors; races, the GPU memory model and speed are not checked.
"""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import torch

from .._utils import CSRC

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
    lib.parent.mkdir(parents=True, exist_ok=True)
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
        self.lib.unidd_stats_chunks.argtypes = [i, i, i]
        self.lib.unidd_stats_workspace.argtypes = [i, i, i]
        self.lib.unidd_stats_workspace.restype = ctypes.c_int64
        self.lib.unidd_stats_forward.argtypes = [_FeatureMap, vp, vp, vp, vp, vp, vp]
        self.lib.unidd_emu_set_block_order.argtypes = [ctypes.c_uint64]
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

    def set_block_order(self, seed: int) -> None:
        """Run the blocks of later launches in grid order (0) or in an order shuffled by ``seed``
        (a GPU schedules blocks in no fixed order: a result that changes with the seed would
        change from run to run there)."""
        self.lib.unidd_emu_set_block_order(seed)

    def stats_chunks(self, n, d, hw) -> int:
        return self.lib.unidd_stats_chunks(n, d, hw)

    def stats_workspace(self, n, d, hw) -> int:
        return self.lib.unidd_stats_workspace(n, d, hw)

    def stats_forward(self, x, n, d, hw, sn, sc, sp, partial, psum, psi, mu, pooled) -> None:
        self._check(self.lib.unidd_stats_forward(self._map(x, n, d, hw, sn, sc, sp), _ptr(partial),
                                                 _ptr(psum), _ptr(psi), _ptr(mu), _ptr(pooled), None),
                    "stats_forward")

    def stats_backward(self, x, n, d, hw, sn, sc, sp, mu, gpsi, gmu, gpooled, dx) -> None:
        self._check(self.lib.unidd_stats_backward(self._map(x, n, d, hw, sn, sc, sp), _ptr(mu), _ptr(gpsi),
                                                  _ptr(gmu), _ptr(gpooled), _ptr(dx), None), "stats_backward")

    def inverse(self, a, out, work_offsets, info_offsets, beta, work, info) -> None:
        groups = (_InvGroup * len(a))(*(_InvGroup(ai.data_ptr(), oi.data_ptr(), wo, ai.shape[0], ai.shape[-1], io)
                                        for ai, oi, wo, io in zip(a, out, work_offsets, info_offsets)))
        self._check(self.lib.unidd_inverse(groups, len(a), _ptr(beta), _ptr(work), _ptr(info), None), "inverse")


class LaunchRecorder(EmulatedKernels):
    """The interface of ``unidd_fast._cuda`` on ``meta`` tensors: each call runs the launchers'
    host code of ``csrc/`` (the CPU build) with kernel launches recorded instead of run, so
    the grids a GPU gets (the launch plans depend on the shapes only) can be read at any size
    without memory or data. ``launches()`` returns and clears the record: [(kernel,
    (grid x, y, z), (block x, y, z))]. Recording is on only during a call, so an
    ``EmulatedKernels`` sharing the library still runs its kernels."""

    device_type = "meta"

    def __init__(self, lib_path: Path | str):
        super().__init__(lib_path)
        self.lib.unidd_emu_record.argtypes = [ctypes.c_int]
        self.lib.unidd_emu_record_at.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint)]
        self.lib.unidd_emu_record_at.restype = ctypes.c_char_p
        self._log: list[tuple[str, tuple, tuple]] = []
        self._dummy = ctypes.c_double()  # stands for every buffer: the launchers only check it is there

    def _buffers(self, buffers):
        return [None if b is None else ctypes.addressof(self._dummy) for b in buffers]

    def _recorded(self, call, what: str) -> None:
        self.lib.unidd_emu_record(1)
        try:
            self._check(call(), what)
            dims = (ctypes.c_uint * 6)()
            for i in range(self.lib.unidd_emu_num_records()):
                name = self.lib.unidd_emu_record_at(i, dims).decode()
                self._log.append((name, tuple(dims[:3]), tuple(dims[3:])))
        finally:
            self.lib.unidd_emu_record(0)

    def _map(self, x, n, d, hw, sn, sc, sp) -> _FeatureMap:
        return _FeatureMap(ctypes.addressof(self._dummy), _DTYPE_CODES[x.dtype], n, d, hw, sn, sc, sp)

    def stats_forward(self, x, n, d, hw, sn, sc, sp, *buffers) -> None:
        fmap = self._map(x, n, d, hw, sn, sc, sp)
        self._recorded(lambda: self.lib.unidd_stats_forward(fmap, *self._buffers(buffers), None), "stats_forward")

    def stats_backward(self, x, n, d, hw, sn, sc, sp, *buffers) -> None:
        fmap = self._map(x, n, d, hw, sn, sc, sp)
        self._recorded(lambda: self.lib.unidd_stats_backward(fmap, *self._buffers(buffers), None), "stats_backward")

    def inverse(self, a, out, work_offsets, info_offsets, beta, work, info) -> None:
        buf = ctypes.addressof(self._dummy)
        groups = (_InvGroup * len(a))(*(_InvGroup(buf, buf, wo, ai.shape[0], ai.shape[-1], io)
                                        for ai, wo, io in zip(a, work_offsets, info_offsets)))
        self._recorded(lambda: self.lib.unidd_inverse(groups, len(a), *self._buffers((beta, work, info)), None), "inverse")

    def launches(self) -> list[tuple[str, tuple, tuple]]:
        out, self._log = self._log, []
        return out

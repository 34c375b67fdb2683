"""Host side of the ``cuda`` backend: checks, layouts, workspaces and autograd Functions
around the kernels of ``csrc/`` (compiled extension ``unidd_fast._cuda``).

The extension is a thin binding: it takes every buffer from here and only enqueues
kernels, so all the logic that can be wrong on the host (layouts, batching plans,
workspace offsets, error messages) lives in this module and is tested on CPU. Any object
with the extension's interface can stand in for it (``kernels=``): the tests use
``unidd_fast.kernels.cuda.emulator.EmulatedKernels`` (the same kernels compiled for a CPU emulation
of the CUDA thread model) and a plain-torch double.

The kernels compute in float32; fp16 / bf16 feature maps are read as they are. float64 input
is refused here: the registry (``kernels/registry.py``) hands it to the torch backend, since
the kernels would silently lose precision.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Sequence

import torch

from unidd_fast.errors import ConfigError

from .._utils import acc_dtype, check_cholesky_info, inverse_backward

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_MATRICES_PER_LAUNCH = 65535  # blockIdx.y of the inverse kernels indexes the matrix


def extension():
    """The compiled kernels, ``unidd_fast._cuda``, or a ConfigError saying how to build them."""
    try:
        return importlib.import_module("unidd_fast._cuda")
    except ImportError as err:
        raise ConfigError("the CUDA backend needs the compiled extension unidd_fast._cuda: build it with "
                          "UNIDD_BUILD_CUDA=1 pip install -e . --no-build-isolation (docs/cuda.md), "
                          f"or use backend='triton' / 'torch' ({err})") from err


def _kernels_for(tensor: torch.Tensor, kernels):
    kernels = kernels if kernels is not None else extension()
    if tensor.device.type != kernels.device_type:
        raise ConfigError(f"the CUDA kernels run on {kernels.device_type} tensors, got a tensor on {tensor.device}; "
                          "move it with .cuda() or use backend='torch'")
    return kernels


# ---- site statistics ----------------------------------------------------------------

@dataclass(frozen=True)
class FeatureLayout:
    """How the kernels walk a feature map: row r = i·hw + p of the (n·hw, d) view is at
    element i·stride_n + c·stride_c + p·stride_p."""

    n: int
    d: int
    hw: int
    stride_n: int
    stride_c: int
    stride_p: int


def feature_layout(feat: torch.Tensor) -> tuple[torch.Tensor, FeatureLayout]:
    """``feat`` (or a contiguous copy, when it is neither NCHW- nor channels_last-dense)
    and the strides the kernels read it with. Dense layouts keep h and w mergeable into
    one spatial index p = y·w + x (stride_h = w·stride_w whenever h, w > 1), which the
    backward relies on when it writes dx with ``torch.empty_like``."""
    if not (feat.is_contiguous() or feat.is_contiguous(memory_format=torch.channels_last)):
        feat = feat.contiguous()
    n, d, h, w = feat.shape
    sn, sc, sh, sw = feat.stride()
    return feat, FeatureLayout(n, d, h * w, sn, sc, sw if w > 1 else sh)


def check_features(feat: torch.Tensor) -> None:
    if feat.dim() != 4:
        raise ValueError(f"site_stats expects a (n, d, h, w) feature map, got shape {tuple(feat.shape)}")
    if feat.dtype not in FEATURE_DTYPES:
        raise ConfigError(f"site_stats (cuda) takes fp32/fp16/bf16 features (fp64 runs the torch backend), "
                          f"got {feat.dtype}; cast them first or use backend='torch'")
    if feat.numel() == 0:
        raise ValueError(f"site_stats got an empty feature map of shape {tuple(feat.shape)}")
    n, _, h, w = feat.shape
    if n * h * w >= 2**31:
        raise ValueError(f"site_stats (cuda) indexes rows with 32-bit integers; n·h·w = {n * h * w} is too many: "
                         "split the batch")


def stats_forward(x: torch.Tensor, layout: FeatureLayout, kernels):
    """Launch the forward on ``x`` read through ``layout``: psi (d,d), mu (d,), pooled (n,d) fp32."""
    n, d = layout.n, layout.d
    f32 = dict(dtype=torch.float32, device=x.device)
    partial = torch.empty(kernels.stats_workspace(n, d, layout.hw), **f32)  # per-chunk sums (csrc/unidd_cuda.h)
    psum = torch.empty(n, d, **f32)
    psi, mu, pooled = torch.empty(d, d, **f32), torch.empty(d, **f32), torch.empty(n, d, **f32)
    kernels.stats_forward(x, layout.n, layout.d, layout.hw, layout.stride_n, layout.stride_c, layout.stride_p,
                          partial, psum, psi, mu, pooled)
    return psi, mu, pooled


def stats_backward(x, layout: FeatureLayout, mu, g_psi, g_mu, g_pooled, kernels):
    """dx, same dtype and strides as ``x``, of the forward's outputs' gradients (None = zero)."""
    f32 = dict(dtype=torch.float32, device=x.device)
    g_psi = torch.zeros(layout.d, layout.d, **f32) if g_psi is None else g_psi.to(**f32).contiguous()
    g_mu = None if g_mu is None else g_mu.to(**f32).contiguous()
    g_pooled = None if g_pooled is None else g_pooled.to(**f32).contiguous()
    dx = torch.empty_like(x)
    kernels.stats_backward(x, layout.n, layout.d, layout.hw, layout.stride_n, layout.stride_c, layout.stride_p,
                           mu, g_psi, g_mu, g_pooled, dx)
    return dx


class SiteStatsCUDA(torch.autograd.Function):
    """(psi, mu, pooled) of a feature map on the CUDA kernels, differentiable to it."""

    @staticmethod
    def forward(ctx, x, layout, kernels):
        psi, mu, pooled = stats_forward(x, layout, kernels)
        ctx.save_for_backward(x, mu)
        ctx.layout, ctx.kernels = layout, kernels
        return psi, mu, pooled

    @staticmethod
    def backward(ctx, g_psi, g_mu, g_pooled):
        x, mu = ctx.saved_tensors
        return stats_backward(x, ctx.layout, mu, g_psi, g_mu, g_pooled, ctx.kernels), None, None


def site_stats_cuda(feat: torch.Tensor, kernels=None):
    """psi (d,d), mu (d,), pooled (n,d) in float32 of feat (n,d,h,w) — NCHW or channels_last,
    fp32 / fp16 / bf16 — on the CUDA kernels; docs/math.md#site-statistics."""
    check_features(feat)
    kernels = _kernels_for(feat, kernels)
    x, layout = feature_layout(feat)
    return SiteStatsCUDA.apply(x, layout, kernels)


def site_stats_grad(feat, mu, g_psi, g_mu, g_pooled, kernels=None) -> torch.Tensor:
    """dX of ``site_stats_cuda(feat)`` given its outputs' gradients (None = zero), outside
    autograd (the custom op of ``kernels/library.py`` calls it from its registered backward)."""
    kernels = _kernels_for(feat, kernels)
    x, layout = feature_layout(feat)
    return stats_backward(x, layout, mu, g_psi, g_mu, g_pooled, kernels)


# ---- batched regularized inverse --------------------------------------------------

@dataclass(frozen=True)
class InverseGroup:
    """Matrices [start, start + k) of input ``entry`` (all of size d), as one group of a launch.
    Their work matrices start at float ``work_offset``; their status at ``info_offset``
    (the index of the group's first matrix among all inputs, in input order)."""

    entry: int
    start: int
    k: int
    d: int
    work_offset: int
    info_offset: int


@dataclass(frozen=True)
class InversePlan:
    launches: tuple[tuple[InverseGroup, ...], ...]
    work_floats: int
    num_matrices: int


def padded_size(d: int, tile: int) -> int:
    """d rounded up to the factorisation tile: the kernel pads with an identity block."""
    return -(-d // tile) * tile


def plan_inverse(sizes: Sequence[tuple[int, int]], tile: int, max_groups: int,
                 max_matrices: int = MAX_MATRICES_PER_LAUNCH) -> InversePlan:
    """Batch inputs of ``sizes`` [(k_i, d_i)] into as few launches as the kernel allows.

    A launch takes up to ``max_groups`` groups and ``max_matrices`` matrices of any sizes
    and costs 2·⌈max D / tile⌉ + 2 kernels whatever it holds, so inputs go in by padded
    size, largest first (similar sizes share launches); an input too large for the room
    left is split across launches. Every matrix gets 2·D² floats of work space.
    """
    first = [0]
    for k, _ in sizes:
        first.append(first[-1] + k)
    order = sorted(range(len(sizes)), key=lambda e: -padded_size(sizes[e][1], tile))
    launches: list[tuple[InverseGroup, ...]] = []
    current: list[InverseGroup] = []
    room = max_matrices
    work = 0
    for e in order:
        k, d = sizes[e]
        D = padded_size(d, tile)
        start = 0
        while start < k:
            if len(current) == max_groups or room == 0:
                launches.append(tuple(current))
                current, room = [], max_matrices
            take = min(k - start, room)
            current.append(InverseGroup(e, start, take, d, work, first[e] + start))
            work += 2 * take * D * D
            room -= take
            start += take
    if current:
        launches.append(tuple(current))
    return InversePlan(tuple(launches), work, first[-1])


def inverse_forward(mats: Sequence[torch.Tensor], beta: torch.Tensor, kernels):
    """(A + βI)^-1 of contiguous float32 stacks ``mats`` [(k_i, d_i, d_i)], β a 0-d float32
    tensor on their device. Returns the inverses and info (Σk_i,) int32 in input order."""
    device = mats[0].device
    plan = plan_inverse([(m.shape[0], m.shape[-1]) for m in mats], kernels.INVERSE_TILE, kernels.INVERSE_MAX_GROUPS)
    work = torch.empty(plan.work_floats, dtype=torch.float32, device=device)
    info = torch.empty(plan.num_matrices, dtype=torch.int32, device=device)
    outs = [torch.empty_like(m) for m in mats]
    for groups in plan.launches:
        kernels.inverse([mats[g.entry][g.start:g.start + g.k] for g in groups],
                        [outs[g.entry][g.start:g.start + g.k] for g in groups],
                        [g.work_offset for g in groups], [g.info_offset for g in groups], beta, work, info)
    return outs, info


class RegularizedInverseCUDA(torch.autograd.Function):
    """Inverses of several stacks in one batched run; gradients as in the reference,
    dA = −Y sym(G) Y."""

    @staticmethod
    def forward(ctx, beta, check, names, kernels, *mats):
        beta_t = beta.to(device=mats[0].device, dtype=torch.float32).reshape(()) if torch.is_tensor(beta) else \
            torch.full((), float(beta), dtype=torch.float32, device=mats[0].device)
        outs, info = inverse_forward(mats, beta_t, kernels)
        if check:
            check_cholesky_info(info, beta, names)
        ctx.save_for_backward(*outs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, None) + tuple(
            None if g is None else inverse_backward(inv, g)
            for inv, g in zip(ctx.saved_tensors, grads))


def _as_stack(A: torch.Tensor) -> torch.Tensor:
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"regularized_inverse expects square matrices (..., d, d), got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise ConfigError(f"regularized_inverse takes floating-point matrices, got {A.dtype}")
    if A.shape[-1] == 0:
        raise ValueError("regularized_inverse got 0x0 matrices")
    return A.to(acc_dtype(A.dtype)).reshape(-1, A.shape[-1], A.shape[-1]).contiguous()


def regularized_inverse_cuda(A, beta, names=None, check: bool = True, kernels=None):
    """(A + βI)^-1 by Cholesky in float32 on the CUDA kernels, differentiable in A.

    A: a tensor (..., d, d), or a list of such tensors of different d, computed together
    in one set of launches (a list gives a list back). β: a float or a 0-d tensor (read on
    the device: a CUDA graph can capture the call and replay it for any β). ``names``
    label the matrices, in input order, in the NotPositiveDefiniteError raised when a
    factorisation fails (eager mode only: under graph capture the check would need a host
    synchronisation; the failed matrix's inverse is all NaN and ``info`` goes to the buffers of
    ``_utils.collect_cholesky_failures``, if installed). float64 input is
    refused (the registry gives it to the torch backend).
    """
    many = isinstance(A, (list, tuple))
    tensors = list(A) if many else [A]
    if not tensors:
        return []
    stacks = [_as_stack(t) for t in tensors]
    total = sum(s.shape[0] for s in stacks)
    if names is not None and len(names) != total:
        raise ValueError(f"{len(names)} names for {total} matrices")
    if any(s.device != stacks[0].device for s in stacks):
        raise ValueError(f"regularized_inverse got matrices on several devices: {sorted({str(s.device) for s in stacks})}")
    if any(s.dtype == torch.float64 for s in stacks):
        raise ConfigError("regularized_inverse (cuda) computes in float32: float64 matrices run the torch "
                          "backend (backend='torch' or 'auto')")
    kernels = _kernels_for(stacks[0], kernels)
    keep = [i for i, s in enumerate(stacks) if s.shape[0] > 0]
    outs = list(stacks)  # empty stacks come back as they are
    if keep:
        done = RegularizedInverseCUDA.apply(beta, check, names, kernels, *(stacks[i] for i in keep))
        for i, out in zip(keep, done):
            outs[i] = out
    outs = [out.reshape(t.shape) for out, t in zip(outs, tensors)]
    return outs if many else outs[0]

"""Batched regularised inverse (A + βI)^-1 of a stack (k, d, d) by blocked Cholesky.

Semantics: ``unidd_fast.reference.regularized_inverse`` (A symmetric, its lower triangle is
read). No host synchronisation: β is a Python float or a 0-d tensor read on the device,
and a failed factorisation is reported in ``info`` (k,) int32 (0, or 1 + the first
column whose pivot was not finite and > 0: NaN and +Inf fail too), which eager callers
check with ``_utils.check_cholesky_info``. Square roots and divisions are the IEEE
correctly rounded ones (``tl.sqrt_rn``/``tl.div_rn``; plain ``/`` and ``tl.sqrt`` compile
to approximate instructions on the GPU). Why Cholesky and not Newton–Schulz: bench/roofline.py.

Three launches, on workspaces padded to DP = nb·B (the padding is an identity block):
  1. ``_chol_kernel``, grid (k,): left-looking blocked Cholesky in place in ``w`` (copy
     of A + βI): per block column j, the update Σ_{m<j} L_im L_jmᵀ is a pure ``tl.dot``
     reduction (software-pipelined, no stores in between), the B×B diagonal tile is
     factored and inverted in registers, and L_ij = (A_ij − update) L_jj^-T; the inverted
     diagonal tiles go to the diagonal of ``y``.
  2. ``_tril_inverse_kernel``, grid (k, nb): block column j of Y = L^-1 by block forward
     substitution, Y_ij = −L_ii^-1 Σ_{j≤m<i} L_im Y_mj.
  3. ``_gram_kernel``, grid (k, nb, nb): (A + βI)^-1 = Yᵀ Y, lower blocks, mirrored.
Backward: dA = −Y sym(G) Y with Y the inverse — two batched GEMMs, inherited from the
torch (``_utils.inverse_backward``; cuBLAS is the right tool for those).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unidd_fast.errors import ConfigError

from .._utils import acc_dtype, check_cholesky_info, interpreting, inverse_backward

from .launch import launch

BLOCK = 32  # tile of the blocked factorisation; tl.dot needs >= 16
NUM_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32: 3xTF32 (fp32-accurate on tensor cores; a plain TF32 inverse would lose
    κ·5e-4); fp64: exact fp64 dot."""
    return "ieee" if dtype == torch.float64 else "tf32x3"


def config(dtype: torch.dtype, beta_on_device: bool, block: int = BLOCK) -> dict:
    """Constexprs of ``_chol_kernel`` the launcher picks; the AOT report compiles each."""
    return {"B": block, "BETA_PTR": beta_on_device, "ACC": _TL_DTYPES[dtype],
            "DOT_PRECISION": dot_precision(dtype)}


@triton.jit
def _div(x, y):
    """x / y correctly rounded: fp32 ``/`` compiles to an approximate division on the GPU;
    fp64 division is IEEE already (and ``div_rn`` takes fp32 only)."""
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    return x / y


@triton.jit
def _sqrt(x):
    """IEEE square root (see ``_div``)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    return tl.sqrt(x)


@triton.jit
def _chol_tile(a, B: tl.constexpr):
    """Unblocked Cholesky of a B×B register tile (lower triangle read). Returns L and the
    first local column whose pivot is not finite and > 0 (B when none): an Inf pivot
    would give a zero column and a non-finite inverse further on, with another column named."""
    r = tl.arange(0, B)
    cols = r[None, :]
    low = tl.zeros((B, B), dtype=a.dtype)
    bad = tl.full((), B, tl.int32)
    for k in range(0, B):
        col = tl.sum(tl.where(cols == k, a, 0), axis=1)
        pivot = tl.sum(tl.where(r == k, col, 0), axis=0)
        bad = tl.minimum(bad, tl.where((pivot > 0) & (pivot < float("inf")), B, k))
        lk = tl.where(r >= k, _div(col, tl.broadcast_to(_sqrt(pivot), col.shape)), 0)
        low = tl.where(cols == k, lk[:, None], low)
        a = a - lk[:, None] * lk[None, :]
    return low, bad


@triton.jit
def _tril_inverse_tile(low, B: tl.constexpr):
    """Inverse of a lower-triangular B×B register tile, row by row: X_k = (e_k − L_k,<k X) / L_kk."""
    r = tl.arange(0, B)
    rows = r[:, None]
    inv = tl.zeros((B, B), dtype=low.dtype)
    for k in range(0, B):
        lrow = tl.sum(tl.where(rows == k, low, 0), axis=0)
        lkk = tl.sum(tl.where(r == k, lrow, 0), axis=0)
        acc = tl.sum(tl.where(r < k, lrow, 0)[:, None] * inv, axis=0)
        num = tl.where(r == k, 1.0, 0.0).to(low.dtype) - acc
        xk = _div(num, tl.broadcast_to(lkk, num.shape))
        inv = tl.where(rows == k, xk[None, :], inv)
    return inv


@triton.jit
def _chol_kernel(a_ptr, beta_ptr, beta_hi, beta_lo, w_ptr, y_ptr, info_ptr,
                 d, nb, stride_ak, stride_ar, stride_ac,
                 B: tl.constexpr, BETA_PTR: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m = tl.program_id(0)
    DP = nb * B
    a = a_ptr + m.to(tl.int64) * stride_ak
    w = w_ptr + m.to(tl.int64) * DP * DP
    y = y_ptr + m.to(tl.int64) * DP * DP
    if BETA_PTR:
        beta = tl.load(beta_ptr).to(ACC)
    else:
        beta = tl.cast(beta_hi, ACC) + tl.cast(beta_lo, ACC)  # float arguments are fp32: two halves keep fp64's β
    r = tl.arange(0, B)
    tile = r[:, None] * DP + r[None, :]
    # w <- lower blocks of A + βI, identity on the padding
    for bi in range(0, nb):
        for bj in range(0, bi + 1):
            rows = bi * B + r
            cols = bj * B + r
            mask = (rows < d)[:, None] & (cols < d)[None, :]
            blk = tl.load(a + rows[:, None] * stride_ar + cols[None, :] * stride_ac, mask=mask, other=0).to(ACC)
            diag = tl.where(rows < d, beta, 1.0).to(ACC)
            blk += tl.where(rows[:, None] == cols[None, :], diag[:, None], 0)
            tl.store(w + (bi * B) * DP + bj * B + tile, blk)
    tl.debug_barrier()
    info = tl.full((), 0, tl.int32)
    for j in range(0, nb):  # left-looking: column j from A and the finished columns < j
        jj = (j * B) * DP + j * B
        upd = tl.zeros((B, B), dtype=ACC)
        for mm in range(0, j):
            l_jm = tl.load(w + (j * B) * DP + mm * B + tile)
            upd = tl.dot(l_jm, tl.trans(l_jm), upd, input_precision=DOT_PRECISION)
        low, bad = _chol_tile(tl.load(w + jj + tile) - upd, B)
        info = tl.where((info == 0) & (bad < B), j * B + bad + 1, info)
        low_inv = _tril_inverse_tile(low, B)
        tl.store(w + jj + tile, low)
        tl.store(y + jj + tile, low_inv)
        for i in range(j + 1, nb):  # panel: L_ij = (A_ij − Σ_{m<j} L_im L_jmᵀ) L_jj^-T
            ij = (i * B) * DP + j * B
            upd = tl.zeros((B, B), dtype=ACC)
            for mm in range(0, j):
                upd = tl.dot(tl.load(w + (i * B) * DP + mm * B + tile), tl.trans(tl.load(w + (j * B) * DP + mm * B + tile)),
                             upd, input_precision=DOT_PRECISION)
            tl.store(w + ij + tile, tl.dot(tl.load(w + ij + tile) - upd, tl.trans(low_inv), input_precision=DOT_PRECISION))
        tl.debug_barrier()
    tl.store(info_ptr + m, info)


@triton.jit
def _tril_inverse_kernel(w_ptr, y_ptr, nb, B: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m = tl.program_id(0)
    j = tl.program_id(1)
    DP = nb * B
    w = w_ptr + m.to(tl.int64) * DP * DP
    y = y_ptr + m.to(tl.int64) * DP * DP
    r = tl.arange(0, B)
    tile = r[:, None] * DP + r[None, :]
    for i in range(j + 1, nb):
        acc = tl.zeros((B, B), dtype=y_ptr.dtype.element_ty)
        for mm in range(j, i):
            acc = tl.dot(tl.load(w + (i * B) * DP + mm * B + tile), tl.load(y + (mm * B) * DP + j * B + tile),
                         acc, input_precision=DOT_PRECISION)
        y_ij = -tl.dot(tl.load(y + (i * B) * DP + i * B + tile), acc, input_precision=DOT_PRECISION)
        tl.store(y + (i * B) * DP + j * B + tile, y_ij)
        tl.debug_barrier()


@triton.jit
def _gram_kernel(y_ptr, out_ptr, d, nb, B: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m = tl.program_id(0)
    bi = tl.program_id(1)
    bj = tl.program_id(2)
    if bj > bi:
        return
    DP = nb * B
    y = y_ptr + m.to(tl.int64) * DP * DP
    out = out_ptr + m.to(tl.int64) * d * d
    r = tl.arange(0, B)
    tile = r[:, None] * DP + r[None, :]
    acc = tl.zeros((B, B), dtype=y_ptr.dtype.element_ty)
    for mm in range(bi, nb):  # (Yᵀ Y)_ij = Σ_{m ≥ i} Y_miᵀ Y_mj  (Y is lower triangular)
        acc = tl.dot(tl.trans(tl.load(y + (mm * B) * DP + bi * B + tile)), tl.load(y + (mm * B) * DP + bj * B + tile),
                     acc, input_precision=DOT_PRECISION)
    rows = bi * B + r
    cols = bj * B + r
    mask = (rows < d)[:, None] & (cols < d)[None, :]
    tl.store(out + rows[:, None] * d + cols[None, :], acc, mask=mask)
    if bi != bj:
        tl.store(out + cols[None, :] * d + rows[:, None], acc, mask=mask)


def check_input(A: torch.Tensor) -> None:
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"regularized_inverse expects square matrices (..., d, d), got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise ConfigError(f"regularized_inverse takes floating-point matrices, got {A.dtype}")
    if A.device.type != "cuda" and not interpreting():
        raise ConfigError("the triton regularized_inverse runs on CUDA tensors, or on CPU with TRITON_INTERPRET=1")


def _beta_args(beta, like: torch.Tensor):
    """(beta_ptr, beta_hi, beta_lo, on_device): a 0-d tensor on A's device is read by the
    kernel (no host sync); anything else is passed by value as an fp32 pair hi + lo."""
    if torch.is_tensor(beta):
        if beta.numel() != 1:
            raise ValueError(f"beta must be a scalar, got a tensor of shape {tuple(beta.shape)}")
        if beta.device == like.device:
            return beta.reshape(()), 0.0, 0.0, True
        beta = float(beta)
    hi = float(torch.tensor(float(beta), dtype=torch.float32))
    return like, hi, float(beta) - hi, False


def cholesky_inverse(A: torch.Tensor, beta, block: int = BLOCK):
    """Launch the three kernels on a contiguous stack A (k, d, d) of fp32 or fp64.
    Returns ((k, d, d) inverse, (k,) int32 info)."""
    k, d, _ = A.shape
    nb = triton.cdiv(d, block)
    DP = nb * block
    w = torch.empty((k, DP, DP), dtype=A.dtype, device=A.device)
    y = torch.empty_like(w)
    out = torch.empty((k, d, d), dtype=A.dtype, device=A.device)
    info = torch.empty((k,), dtype=torch.int32, device=A.device)
    beta_ptr, beta_hi, beta_lo, on_device = _beta_args(beta, A)
    cfg = config(A.dtype, on_device, block)
    # barriers sit between the block steps, never inside the innermost (pipelined) dot loops
    launch(_chol_kernel, (k,), A, beta_ptr, beta_hi, beta_lo, w, y, info, d, nb, *A.stride(),
           num_warps=NUM_WARPS, **cfg)
    launch(_tril_inverse_kernel, (k, nb), w, y, nb, B=block, DOT_PRECISION=cfg["DOT_PRECISION"],
           num_warps=NUM_WARPS)
    launch(_gram_kernel, (k, nb, nb), y, out, d, nb, B=block, DOT_PRECISION=cfg["DOT_PRECISION"], num_warps=NUM_WARPS)
    return out, info


class RegularizedInverseFunction(torch.autograd.Function):
    """Triton forward; backward dA = −Y sym(G) Y (``_utils.inverse_backward``)."""

    @staticmethod
    def forward(ctx, A, beta, check, names, block=BLOCK):
        inv, info = cholesky_inverse(A, beta, block)
        if check:
            check_cholesky_info(info, beta, names)
        ctx.save_for_backward(inv)
        return inv

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return inverse_backward(inv, grad), None, None, None, None


def regularized_inverse(A: torch.Tensor, beta, names=None, check: bool = True, block: int = BLOCK) -> torch.Tensor:
    """(A + βI)^-1 for symmetric A (..., d, d) on the Triton kernels, in ``acc_dtype(A.dtype)``.

    Raises NotPositiveDefiniteError (naming ``names[i]`` when given) if a factorisation
    fails, unless ``check=False`` or a CUDA graph is being captured.
    """
    check_input(A)
    shape = A.shape
    stack = A.to(acc_dtype(A.dtype)).reshape(-1, shape[-1], shape[-1]).contiguous()
    return RegularizedInverseFunction.apply(stack, beta, check, names, block).reshape(shape)

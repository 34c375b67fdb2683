"""Channel statistics of one feature map in one pass: Ψ (d,d), μ (d,), pooled (n,d).

Semantics: ``unidd_fast.reference.site_stats``. The feature map (n, d, h, w) is read in
place, NCHW or channels_last (any layout whose h and w merge into one spatial stride), in
fp32/fp16/bf16 (accumulated in fp32) or fp64 (accumulated in fp64). Nothing of size
(n·h·w, d) is materialised.

Forward, two or three launches, no atomics:
  1. ``_site_stats_fwd_kernel``, grid (chunks, nb, nb) over sample chunks and d-blocks
     I ≤ J: the shifted Gram Σ (x − K)_I (x − K)_Jᵀ of its chunk on tensor cores (bf16 maps:
     four bf16 passes over a hi/lo split, exact; fp32/fp16: 3xTF32; ``dot_precision``), the
     shifted per-sample sums (→ pooled) and the chunk's shifted column sums, into row
     ``chunk`` of the workspace (chunks, d² + d). The shift K is the first row of the map
     (a data point, so |μ − K| is of the order of σ and Σ(x−K)(x−K)ᵀ/N − (μ−K)(μ−K)ᵀ does
     not cancel catastrophically even when |μ| ≫ σ).
  2. ``_site_stats_reduce_kernel``, grid (groups, element blocks), when there are ≥ 2
     groups of G = ⌈√chunks⌉ consecutive chunks: each group's sum, in chunk order, into
     the group's first row.
  3. ``_site_stats_finalize_kernel``, grid (nb, nb): sums the group rows in order,
     Ψ = S/N − m mᵀ with m = μ − K, μ = K + m.
Every sum has one order, fixed by the shape (``num_chunks`` does not look at the GPU), so
the outputs are the same bits from run to run on one GPU model and software build
(docs/cuda.md#reproducibility).
Backward, one launch (``_site_stats_bwd_kernel``, grid (n, hw-blocks, nb)):
  dX = (X − μ) S + dμ/N + dpooled[sample]/(h·w) with S = (G + Gᵀ)/N formed once on the
  host side (one d×d op), in the layout and dtype of X; the product in bf16x3 (three bf16
  tensor-core passes, ``grad_precision``).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from unidd_fast.errors import ConfigError

from .._utils import acc_dtype, interpreting

from .launch import launch

BLOCK_R = 32  # rows (pixels of one sample) per tile: the K dimension of the Gram tl.dot
NUM_WARPS = 4

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def block_d(d: int) -> int:
    """Channel tile: 32 for d ≤ 32, else 64 (ResNet widths 64..512 are multiples of it)."""
    return 32 if d <= 32 else 64


def dot_precision(dtype: torch.dtype) -> str:
    """Precision of the forward's Gram Σ e eᵀ, e = x − K in fp32. fp64: exact fp64 ("ieee").
    bf16: "bf16x4" — hi = bf16(e), lo = bf16(e − hi), round-to-nearest-even, and all four
    products hi·hi + hi·lo + lo·hi + lo·lo in fp32: four bf16 passes (989 TFLOP/s each on an
    H100), 1.5× less tensor-core time than 3xTF32, and exact up to the fp32 sums: e is the
    sum of two bf16 numbers (exact in fp32 while their exponents are within 16), and the
    rounding error of such a sum, e − hi, is itself a bf16 number (as in TwoSum), so it is lo.
    fp32 and fp16: 3xTF32 ("tf32x3", three TF32 passes at 495). For fp16 e needs 11 bits plus
    the exponent gap of x and K, beyond a bf16 hi + lo's 16 once the gap passes 5, and the
    rest (K's low bits, alike in every row of a channel) would be dropped: up to 4e-6 of the
    channel's Σ e² when K is small next to its values, against 1e-7 with 3xTF32. Ruled out:
    a bias of one sign on the diagonal of Ψ, summed over n·h·w rows, which the regularised
    inverse amplifies by κ — one TF32 pass (the fp32 → TF32 conversion of the MMA inputs
    drops low bits of e), one bf16 pass, or bf16x3 (lo·lo ≥ 0 dropped: up to −9e-6 of the
    diagonal); 3xTF32 has up to −2e-7 (the MMA truncates its small part). Measured against
    float64 by ``bench/bench_gram_precision.py`` (bench/RESULTS.md)."""
    if dtype == torch.float64:
        return "ieee"
    return "bf16x4" if dtype == torch.bfloat16 else "tf32x3"


def grad_precision(dtype: torch.dtype) -> str:
    """Input precision of the backward's (X − μ)·S product: "ieee" (exact) for fp64, else
    "bf16x3": each fp32 operand split into bf16 hi + lo parts and hi·hi + hi·lo + lo·hi
    accumulated in fp32 — three bf16 tensor-core passes (989 TFLOP/s on an H100), half the
    time of 3xTF32 (three passes at 495), with operands good to 2^-16 relative.
    A single TF32 or bf16 pass is not enough: the loss's S = (G + Gᵀ)/N comes through the
    inverse's backward, and doctor's CFM-loss gradient then lost 3e-3 (TF32) / 2.7e-2 (bf16)
    against float64, at the edge of its tolerance (tests/test_kernels_site_stats.py)."""
    return "ieee" if dtype == torch.float64 else "bf16x3"


def _as_run(precision: str) -> str:
    """``precision`` as the kernels run it here: in the interpreter, which ignores
    ``input_precision`` and multiplies bf16 operands as raw bits, the bf16 splits ("bf16x3",
    "bf16x4") run as their "_split" emulation — the same bf16 parts, rounded as the GPU rounds
    them, multiplied in fp32 where their products are exact (``_mma_bf16``): the numbers of
    the bf16 MMAs up to the order of the fp32 sums, so the tests see the real rounding."""
    return precision + "_split" if precision in ("bf16x3", "bf16x4") and interpreting() else precision


def config(dtype: torch.dtype, d: int) -> dict:
    """Constexprs the launchers pick for a (dtype, d) input; the AOT report compiles each."""
    return {"BLOCK_R": BLOCK_R, "BLOCK_D": block_d(d), "ACC": _TL_DTYPES[acc_dtype(dtype)],
            "DOT_PRECISION": _as_run(dot_precision(dtype))}


def backward_config(dtype: torch.dtype, d: int) -> dict:
    """Constexprs of the backward kernel."""
    return {"BLOCK_R": BLOCK_R, "BLOCK_D": block_d(d), "ACC": _TL_DTYPES[acc_dtype(dtype)],
            "GRAD_PRECISION": _as_run(grad_precision(dtype))}


@triton.jit
def _site_stats_fwd_kernel(x_ptr, part_ptr, pooled_ptr,
                           n, d, HW, stride_n, stride_c, stride_p, samples_per_chunk,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    chunk = tl.program_id(0)
    bi = tl.program_id(1)
    bj = tl.program_id(2)
    if bi > bj:  # the Gram is symmetric: block (J, I) is written as the transpose of (I, J)
        return
    ci = bi * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = bj * BLOCK_D + tl.arange(0, BLOCK_D)
    mi = ci < d
    mj = cj < d
    shift_i = tl.load(x_ptr + ci * stride_c, mask=mi, other=0).to(ACC)
    shift_j = tl.load(x_ptr + cj * stride_c, mask=mj, other=0).to(ACC)
    r = tl.arange(0, BLOCK_R)
    gram = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    colsum = tl.zeros((BLOCK_D,), dtype=ACC)
    s_begin = chunk * samples_per_chunk
    for i in range(0, tl.minimum(samples_per_chunk, n - s_begin)):
        s = s_begin + i
        base = x_ptr + s.to(tl.int64) * stride_n
        psum = tl.zeros((BLOCK_D,), dtype=ACC)
        for p0 in range(0, HW, BLOCK_R):
            rows = p0 + r
            mr = rows < HW
            mask_i = mr[:, None] & mi[None, :]
            mask_j = mr[:, None] & mj[None, :]
            xi = tl.load(base + rows[:, None] * stride_p + ci[None, :] * stride_c, mask=mask_i, other=0)
            xj = tl.load(base + rows[:, None] * stride_p + cj[None, :] * stride_c, mask=mask_j, other=0)
            xi = tl.where(mask_i, xi.to(ACC) - shift_i[None, :], 0)
            xj = tl.where(mask_j, xj.to(ACC) - shift_j[None, :], 0)
            if DOT_PRECISION == "bf16x4" or DOT_PRECISION == "bf16x4_split":
                gram += _dot_bf16_split(tl.trans(xi), xj, True, DOT_PRECISION == "bf16x4_split")
            else:
                gram = tl.dot(tl.trans(xi), xj, gram, input_precision=DOT_PRECISION)
            psum += tl.sum(xi, axis=0)
        if bi == bj:
            tl.store(pooled_ptr + s * d + ci, shift_i + psum / HW, mask=mi)
        colsum += psum
    part = part_ptr + chunk.to(tl.int64) * (d * d + d)  # this chunk's Gram, then its column sums
    mask = mi[:, None] & mj[None, :]
    tl.store(part + ci[:, None] * d + cj[None, :], gram, mask=mask)
    if bi == bj:
        tl.store(part + d * d + ci, colsum, mask=mi)
    else:
        tl.store(part + cj[None, :] * d + ci[:, None], gram, mask=mask)


@triton.jit
def _site_stats_reduce_kernel(part_ptr, chunks, group, width, BLOCK_E: tl.constexpr):
    """Rows [g·group, (g+1)·group) of part (chunks, width), added in row order, into row g·group."""
    first = tl.program_id(0) * group
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = e < width
    row = part_ptr + first.to(tl.int64) * width + e
    acc = tl.load(row, mask=mask, other=0)
    for c in range(first + 1, tl.minimum(first + group, chunks)):
        acc += tl.load(part_ptr + tl.cast(c, tl.int64) * width + e, mask=mask, other=0)
    tl.store(row, acc, mask=mask)


@triton.jit
def _site_stats_finalize_kernel(x_ptr, part_ptr, psi_ptr, mu_ptr,
                                chunks, step, d, N, stride_c,
                                BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    ci = bi * BLOCK_D + tl.arange(0, BLOCK_D)
    cj = bj * BLOCK_D + tl.arange(0, BLOCK_D)
    mi = ci < d
    mj = cj < d
    mask = mi[:, None] & mj[None, :]
    gram = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    m_i = tl.zeros((BLOCK_D,), dtype=ACC)
    m_j = tl.zeros((BLOCK_D,), dtype=ACC)
    for c in range(0, chunks, step):  # the rows the reduce kernel left the group sums in
        part = part_ptr + tl.cast(c, tl.int64) * (d * d + d)
        gram += tl.load(part + ci[:, None] * d + cj[None, :], mask=mask, other=0)
        m_i += tl.load(part + d * d + ci, mask=mi, other=0)
        m_j += tl.load(part + d * d + cj, mask=mj, other=0)
    m_i = m_i / N
    m_j = m_j / N
    psi = gram / N - m_i[:, None] * m_j[None, :]
    tl.store(psi_ptr + ci[:, None] * d + cj[None, :], psi, mask=mask)
    if bi == bj:
        shift = tl.load(x_ptr + ci * stride_c, mask=mi, other=0).to(ACC)
        tl.store(mu_ptr + ci, shift + m_i, mask=mi)


@triton.jit
def _round_bf16(x, EMULATE: tl.constexpr):
    """fp32 x rounded to the nearest bf16 value, ties to even, as a bf16 tensor: what the GPU's
    conversion does. The interpreter's ``.to(tl.bfloat16)`` truncates instead, so EMULATE
    rounds the fp32 bits first (carries go into the exponent), and the cast is then exact."""
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        x = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _split_bf16(x, EMULATE: tl.constexpr):
    """fp32 x as bf16 hi + lo, hi = bf16(x), lo = bf16(x − hi), both round-to-nearest-even."""
    hi = _round_bf16(x, EMULATE)
    return hi, _round_bf16(x - hi.to(tl.float32), EMULATE)


@triton.jit
def _mma_bf16(a, b, acc, EMULATE: tl.constexpr):
    """acc + a·b of bf16 a, b: a bf16 tensor-core product with fp32 accumulation on a GPU. The
    interpreter's bf16 ``tl.dot`` multiplies the raw bits, so EMULATE multiplies the same values
    in fp32, where their products are exact."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dot_bf16_split(a, b, LO_LO: tl.constexpr, EMULATE: tl.constexpr):
    """a·b of fp32 a, b from their bf16 hi/lo parts (``_split_bf16``), smallest products
    first: lo·lo (when LO_LO) + lo·hi + hi·lo + hi·hi (without lo·lo: Triton's "bf16x3").
    Summed from zero, as Triton's 3xTF32 and bf16x3 do: the caller adds this tile's product
    to its running sum in an fp32 add that rounds to nearest, not in the tensor cores'
    accumulator, whose rounding is the hardware's (not specified as round-to-nearest)."""
    a_hi, a_lo = _split_bf16(a, EMULATE)
    b_hi, b_lo = _split_bf16(b, EMULATE)
    acc = tl.zeros((a.shape[0], b.shape[1]), dtype=tl.float32)
    if LO_LO:
        acc = _mma_bf16(a_lo, b_lo, acc, EMULATE)
    acc = _mma_bf16(a_lo, b_hi, acc, EMULATE)
    acc = _mma_bf16(a_hi, b_lo, acc, EMULATE)
    return _mma_bf16(a_hi, b_hi, acc, EMULATE)


@triton.jit
def _site_stats_bwd_kernel(x_ptr, mu_ptr, g_ptr, dmu_ptr, dpooled_ptr, dx_ptr,
                           d, HW, N, stride_n, stride_c, stride_p, dx_stride_n, dx_stride_c, dx_stride_p,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                           GRAD_PRECISION: tl.constexpr):
    s = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cj = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mr = rows < HW
    mj = cj < d
    base = s.to(tl.int64) * stride_n
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=ACC)
    for c0 in range(0, d, BLOCK_D):
        ci = c0 + tl.arange(0, BLOCK_D)
        mi = ci < d
        mask_x = mr[:, None] & mi[None, :]
        x = tl.load(x_ptr + base + rows[:, None] * stride_p + ci[None, :] * stride_c, mask=mask_x, other=0)
        mu = tl.load(mu_ptr + ci, mask=mi, other=0)
        xc = tl.where(mask_x, x.to(ACC) - mu[None, :], 0)
        g_sym = tl.load(g_ptr + ci[:, None] * d + cj[None, :], mask=mi[:, None] & mj[None, :], other=0)
        if GRAD_PRECISION == "bf16x3_split":
            acc += _dot_bf16_split(xc, g_sym, False, True)
        else:
            acc = tl.dot(xc, g_sym, acc, input_precision=GRAD_PRECISION)
    dmu = tl.load(dmu_ptr + cj, mask=mj, other=0)
    dpooled = tl.load(dpooled_ptr + s * d + cj, mask=mj, other=0)
    dx = acc + dmu[None, :] / N + dpooled[None, :] / HW
    out = dx_ptr + s.to(tl.int64) * dx_stride_n + rows[:, None] * dx_stride_p + cj[None, :] * dx_stride_c
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=mr[:, None] & mj[None, :])


# The chunk plan targets a GPU of this many SMs whatever the GPU (an H100 SXM's count): a
# plan that followed the SM count would change the order of the sums, and so the last bits
# of the statistics, from one GPU model to another.
PLAN_SMS = 132
REDUCE_BLOCK = 1024  # elements of the workspace rows per program of the reduce kernel


def num_chunks(n: int, d: int, rows: int, elem_size: int) -> int:
    """Sample chunks of the forward grid: about two waves of programs over the tile pairs
    on a PLAN_SMS GPU, but no more partial Grams (chunks·d² fp32, written and read back)
    than the map's own bytes, and at most one chunk per sample. A function of the shape only."""
    nb = triton.cdiv(d, block_d(d))
    pairs = nb * (nb + 1) // 2
    return max(1, min(n, triton.cdiv(2 * PLAN_SMS, pairs), rows * elem_size // (8 * d)))


def reduce_group(chunks: int) -> int:
    """Chunks per group of the two-level chunk sum, ⌈√chunks⌉: no program adds more than
    about √chunks partials (chunks ≤ 2 make one group: the finalize sums them alone)."""
    return math.isqrt(chunks - 1) + 1 if chunks > 1 else 1


def _spatial_strides(feat: torch.Tensor) -> torch.Tensor:
    """``feat`` itself when h and w merge into one stride (NCHW, channels_last), else a copy."""
    _, _, h, w = feat.shape
    if h == 1 or feat.stride(2) == w * feat.stride(3):
        return feat
    return feat.contiguous()


def check_input(feat: torch.Tensor) -> None:
    if feat.dim() != 4:
        raise ValueError(f"site_stats expects a (n, d, h, w) feature map, got shape {tuple(feat.shape)}")
    if feat.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ConfigError(f"site_stats (triton) takes fp32/fp16/bf16/fp64 features, got {feat.dtype}; cast them first")
    if feat.numel() == 0:
        raise ValueError(f"site_stats got an empty feature map of shape {tuple(feat.shape)}")
    if feat.device.type != "cuda" and not interpreting():
        raise ConfigError("the triton site_stats kernel runs on CUDA tensors, or on CPU with TRITON_INTERPRET=1")


def site_stats_forward(feat: torch.Tensor, chunks: int | None = None):
    """Launch the forward: feat (n,d,h,w) -> psi (d,d), mu (d,), pooled (n,d) in acc dtype."""
    n, d, h, w = feat.shape
    HW = h * w
    cfg = config(feat.dtype, d)
    nb = triton.cdiv(d, cfg["BLOCK_D"])
    if chunks is None:  # one in the interpreter, where every program instance costs time
        chunks = num_chunks(n, d, n * HW, feat.element_size()) if feat.device.type == "cuda" else 1
    per_chunk = triton.cdiv(n, chunks)
    chunks = triton.cdiv(n, per_chunk)
    dt = acc_dtype(feat.dtype)
    part = torch.empty((chunks, d * d + d), dtype=dt, device=feat.device)  # per chunk: Gram, column sums
    pooled = torch.empty((n, d), dtype=dt, device=feat.device)
    psi = torch.empty((d, d), dtype=dt, device=feat.device)
    mu = torch.empty((d,), dtype=dt, device=feat.device)
    sn, sc, _, sp = feat.stride()
    launch(_site_stats_fwd_kernel, (chunks, nb, nb), feat, part, pooled, n, d, HW, sn, sc, sp, per_chunk,
           num_warps=NUM_WARPS, **cfg)
    group, step = reduce_group(chunks), 1
    if group < chunks:
        launch(_site_stats_reduce_kernel, (triton.cdiv(chunks, group), triton.cdiv(d * d + d, REDUCE_BLOCK)),
               part, chunks, group, d * d + d, BLOCK_E=REDUCE_BLOCK, num_warps=NUM_WARPS)
        step = group
    launch(_site_stats_finalize_kernel, (nb, nb), feat, part, psi, mu, chunks, step, d, n * HW, sc,
           BLOCK_D=cfg["BLOCK_D"], ACC=cfg["ACC"], num_warps=NUM_WARPS)
    return psi, mu, pooled


def site_stats_backward(feat, mu, dpsi, dmu, dpooled):
    """dX of feat (n,d,h,w) given the output gradients; same layout and dtype as feat."""
    n, d, h, w = feat.shape
    HW = h * w
    cfg = backward_config(feat.dtype, d)
    dt = mu.dtype
    dmu, dpooled = (t.to(dt).contiguous() for t in (dmu, dpooled))
    # S = (G + Gᵀ)/N formed once here, not re-read as G and Gᵀ by every (sample, row-tile) program
    dpsi = ((dpsi.to(dt) + dpsi.to(dt).T) / (n * HW)).contiguous()
    dx = torch.empty_like(feat)
    sn, sc, _, sp = feat.stride()
    dsn, dsc, _, dsp = dx.stride()  # empty_like keeps a dense layout, else gives NCHW
    grid = (n, triton.cdiv(HW, cfg["BLOCK_R"]), triton.cdiv(d, cfg["BLOCK_D"]))
    launch(_site_stats_bwd_kernel, grid, feat, mu, dpsi, dmu, dpooled, dx, d, HW, n * HW, sn, sc, sp,
           dsn, dsc, dsp, num_warps=NUM_WARPS, **cfg)
    return dx


class SiteStatsFunction(torch.autograd.Function):
    """(psi, mu, pooled) of a feature map, differentiable to the feature map."""

    @staticmethod
    def forward(ctx, feat, chunks):
        psi, mu, pooled = site_stats_forward(feat, chunks)
        ctx.save_for_backward(feat, mu)
        return psi, mu, pooled

    @staticmethod
    def backward(ctx, dpsi, dmu, dpooled):
        feat, mu = ctx.saved_tensors
        return site_stats_backward(feat, mu, dpsi, dmu, dpooled), None


def site_stats(feat: torch.Tensor, chunks: int | None = None):
    """Triton site statistics of feat (n,d,h,w): psi (d,d), mu (d,), pooled (n,d) in
    ``acc_dtype(feat.dtype)``; ``chunks`` overrides the number of sample chunks (tests)."""
    check_input(feat)
    return SiteStatsFunction.apply(_spatial_strides(feat), chunks)


def site_stats_grad(feat, mu, g_psi, g_mu, g_pooled) -> torch.Tensor:
    """dX of ``site_stats(feat)`` given its outputs' gradients (None = zero), outside autograd
    (the custom op of ``kernels/library.py`` calls it from its registered backward)."""
    feat = _spatial_strides(feat)
    n, d = feat.shape[:2]
    zeros = functools.partial(torch.zeros, dtype=mu.dtype, device=mu.device)
    return site_stats_backward(feat, mu, zeros(d, d) if g_psi is None else g_psi, zeros(d) if g_mu is None else g_mu,
                               zeros(n, d) if g_pooled is None else g_pooled)

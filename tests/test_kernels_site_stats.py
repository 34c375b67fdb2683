"""Triton site-statistics kernels (interpreter) against the float64 reference, forward and
backward, fp32/fp16/bf16/fp64 inputs, NCHW and channels_last, awkward shapes."""
import pytest
import torch
import triton
import triton.language as tl

from unidd_fast import reference
from unidd_fast.kernels._utils import acc_dtype
from unidd_fast.errors import ConfigError
from unidd_fast.kernels.triton.site_stats import _split_bf16, config, site_stats

# (n, d, h, w): d not a power of two, h·w not a multiple of the 32-row tile; d = 70 spans
# two 64-channel blocks (off-diagonal Gram blocks, mirrored writes)
SHAPES = [(3, 24, 5, 7), (2, 40, 3, 11), (2, 70, 3, 5)]
LOW = (torch.float16, torch.bfloat16)


def features(shape, gen, dtype=torch.float64, channels_last=False, offset=0.5):
    x = offset + torch.randn(shape, generator=gen, dtype=torch.float64) * torch.rand(shape[1], 1, 1, generator=gen, dtype=torch.float64)
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_matches_float64_reference(shape, dtype, channels_last, gen):
    feat = features(shape, gen, dtype, channels_last)
    got = site_stats(feat, chunks=2)
    want = reference.site_stats(feat.double())  # the same (rounded) values, in float64
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        # fp32 accumulation of a few hundred rows: ~1e-7 per term, a few 1e-7 in norm
        assert rel(g, w) < 1e-5


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, n, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + r, mask=r < n, other=1.0)
    hi, lo = _split_bf16(x, True)
    tl.store(hi_ptr + r, hi.to(tl.float32), mask=r < n)
    tl.store(lo_ptr + r, lo.to(tl.float32), mask=r < n)


def test_interpreted_bf16_split_rounds_to_nearest_even_as_the_gpu(gen):
    """The interpreter's fp32 -> bf16 cast truncates; the emulated split must round as the
    GPU's conversion (and torch's) does: ties to even, carries into the exponent, both signs."""
    one = 1.0 + torch.tensor([2**-8, 3 * 2**-8, 2**-8 + 2**-20, -(2**-9), 1 - 2**-24, 2**-12])
    x = torch.cat([one, -one, torch.randn(200, generator=gen) * torch.exp(8 * torch.randn(200, generator=gen))])
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, x.numel(), BLOCK=256)
    want_hi = x.bfloat16().float()
    assert torch.equal(hi, want_hi)
    assert torch.equal(lo, (x - want_hi).bfloat16().float())


def test_bf16_split_of_a_bf16_difference_is_exact(gen):
    """Why bf16x4 is exact on bf16 maps: e = x − K of bf16 x and K (exponents within 16, so
    e is exact in fp32) is hi + lo exactly — the rounding error of a sum of two bf16 numbers
    is a bf16 number. An fp16 difference is not (11-bit significands: the fp16 maps' reason
    to keep 3xTF32)."""
    def values(dtype):  # ±[1, 2)·2^k, k in [-8, 7]: exponents at most 15 apart
        sign = torch.randint(0, 2, (4096,), generator=gen).double() * 2 - 1
        scale = torch.exp2(torch.randint(-8, 8, (4096,), generator=gen).double())
        return (sign * scale * (1 + torch.rand(4096, generator=gen, dtype=torch.float64))).to(dtype).float()

    def diffs(dtype):
        return values(dtype) - values(dtype)

    for dtype, exact in ((torch.bfloat16, True), (torch.float16, False)):
        e = diffs(dtype)
        hi, lo = torch.empty_like(e), torch.empty_like(e)
        _split_kernel[(1,)](e, hi, lo, e.numel(), BLOCK=4096)
        assert torch.equal(hi.double() + lo.double(), e.double()) == exact


def test_bf16_maps_use_four_bf16_passes():
    for dtype, want in ((torch.bfloat16, "bf16x4_split"), (torch.float16, "tf32x3"),
                        (torch.float32, "tf32x3"), (torch.float64, "ieee")):
        assert config(dtype, 64)["DOT_PRECISION"] == want


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("offset", [0.5, 100.0])
def test_16bit_map_gram_matches_float64(dtype, channels_last, offset, gen):
    """Fresh awkward shapes (d spanning two channel blocks). bf16 maps (bf16x4): hi + lo holds
    e = x − K exactly, only the fp32 sums round (≤ 7e-7 measured, as with exact fp32 products);
    fp16 maps keep 3xTF32. A tenth of the 1e-5 bound of test_forward_matches_float64_reference."""
    n, d, h, w = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((2, 5), (65, 100), (3, 8), (3, 8)))
    feat = features((n, d, h, w), gen, dtype, channels_last, offset)
    got = site_stats(feat, chunks=2)
    want = reference.site_stats(feat.double())
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-6


def test_bf16x4_gram_has_no_diagonal_bias(gen):
    """The diagonal's errors, relative to the shifted sums S_ii/N = Ψ_ii + (μ_i − K_i)² that
    the Gram accumulates, have mean zero within their spread over the channels: |t| = 0.2 here,
    where dropping lo·lo (bf16x3, every lo² ≥ 0 missing) gives t = −16 (and a max of 6e-6)."""
    feat = features((4, 96, 9, 11), gen, torch.bfloat16)
    psi = site_stats(feat)[0].double().diagonal()
    want_psi, want_mu, _ = reference.site_stats(feat.double())
    sums = want_psi.diagonal() + (want_mu - feat[0, :, 0, 0].double()) ** 2
    err = (psi - want_psi.diagonal()) / sums
    assert err.mean().abs() <= 4 * err.std() / err.numel() ** 0.5
    assert err.abs().max() < 1e-6


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_float64_exact_for_any_chunking(chunks, gen):
    feat = features((3, 70, 2, 5), gen)
    got = site_stats(feat, chunks=chunks)
    for g, w in zip(got, reference.site_stats(feat)):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_bf16_features_psi_within_1e_2_of_float64(gen):
    """The spec's bound: Ψ_s from bf16 feature maps vs float64 Ψ of the unrounded maps. The
    bf16 rounding of the inputs (2^-9 relative) dominates; the kernel adds ~1e-7."""
    feat = features((4, 40, 6, 6), gen)
    psi, mu, _ = site_stats(feat.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    want_psi, want_mu, _ = reference.site_stats(feat)
    assert rel(psi, want_psi) < 1e-2
    assert rel(mu, want_mu) < 1e-2


def test_large_mean_keeps_fp32_accuracy(gen):
    """|μ| = 100σ: E[xxᵀ] − μμᵀ in fp32 would lose ~4 digits; the shifted Gram keeps fp32
    accuracy up to the rounding of the inputs themselves (eps32·|μ|/σ ≈ 1e-5)."""
    feat = features((3, 24, 4, 5), gen, offset=100.0)
    psi, mu, _ = site_stats(feat.float())
    want_psi, want_mu, _ = reference.site_stats(feat.float().double())
    assert rel(psi, want_psi) < 1e-5
    assert rel(mu, want_mu) < 1e-7


def test_non_mergeable_strides_fall_back_to_a_copy(gen):
    feat = features((2, 24, 5, 7), gen).transpose(2, 3)  # (n, d, 7, 5) with h-stride 1
    for g, w in zip(site_stats(feat), reference.site_stats(feat)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64(gen):
    feat = features((2, 3, 2, 3), gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: site_stats(x, chunks=2), (feat,))


def _grads(fn, feat, weights):
    feat = feat.detach().requires_grad_()
    out = fn(feat)
    (grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), feat)
    return grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_matches_reference_autograd(shape, dtype, channels_last, gen):
    feat = features(shape, gen, dtype, channels_last)
    n, d = shape[:2]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((d, d), (d,), (n, d))]
    want = _grads(reference.site_stats, feat.double(), weights)
    got = _grads(site_stats, feat, [w.to(acc_dtype(dtype)) for w in weights])
    assert got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    # float64: exact; fp32: bf16x3 product (operands to 2^-16); bf16: the stored gradient is rounded to 2^-9
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 8e-3}[dtype]
    assert rel(got, want) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backward_bf16x3_product_is_centred_first(dtype, gen):
    """|μ| = 100σ, a 130-wide map (three 64-channel blocks of the product's K loop): the
    bf16x3 operands are the centred values, so the error stays at their 2^-16 split (fp32
    maps: 2.4e-5 measured) or below the rounding of the stored 16-bit gradient, and does
    not grow with |μ|/σ; measured against float64."""
    feat = features((3, 130, 3, 5), gen, dtype, offset=100.0)
    n, d = feat.shape[:2]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((d, d), (d,), (n, d))]
    want = _grads(reference.site_stats, feat.double(), weights)
    got = _grads(site_stats, feat, [w.float() for w in weights])
    assert rel(got, want) < {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]


def test_backward_with_unused_outputs(gen):
    """Only Ψ used (pooled and μ get no gradient): autograd passes zeros for them."""
    feat = features((2, 24, 3, 5), gen).requires_grad_()
    (got,) = torch.autograd.grad(site_stats(feat)[0].sum(), feat)
    (want,) = torch.autograd.grad(reference.site_stats(feat)[0].sum(), feat)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_bad_input_raises(gen):
    with pytest.raises(ValueError, match="n, d, h, w"):
        site_stats(torch.randn(3, 4, 5, generator=gen))
    with pytest.raises(ConfigError, match="fp32/fp16/bf16/fp64"):
        site_stats(torch.ones(2, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        site_stats(torch.randn(0, 3, 4, 4, generator=gen))


@pytest.mark.parametrize("chunks", [2, 3, 7, 11])
def test_two_level_chunk_sum_matches_float64(chunks, gen):
    """The chunk partials are summed in groups of ⌈√chunks⌉ (reduce kernel), then the group
    sums (finalize): float64 stays exact for every grouping, a partial last group included."""
    feat = features((11, 70, 2, 3), gen)
    for g, w in zip(site_stats(feat, chunks=chunks), reference.site_stats(feat)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    got = site_stats(feat.float(), chunks=chunks)
    for g, w in zip(got, reference.site_stats(feat.float().double())):
        assert rel(g, w) < 1e-6


def test_no_program_sums_more_than_about_sqrt_chunks_partials():
    """The finalize used to add every chunk's partial in one program per tile (264 of them
    for d = 64 on an H100): now the reduce kernel's programs and the finalize each add at
    most ⌈√chunks⌉, and the plan does not depend on the GPU."""
    from unidd_fast.kernels.triton.launch import recording
    from unidd_fast.kernels.triton.site_stats import num_chunks, site_stats_forward

    n, d = 500, 64
    assert num_chunks(n, d, n * 56 * 56, 4) == 264  # two samples per chunk: 250 chunks
    with recording() as launches:
        site_stats_forward(torch.empty(n, d, 56, 56), 264)
    by_name = {kernel.fn.__name__: (grid, args) for kernel, grid, args, _ in launches}
    grid, (_, chunks, group, _) = by_name["_site_stats_reduce_kernel"]
    assert chunks == 250 and group == 16 and grid[0] == 16  # 16 groups of <= 16 chunks
    _, args = by_name["_site_stats_finalize_kernel"]
    assert args[4:6] == (chunks, group)  # reads every 16th row: the 16 group sums

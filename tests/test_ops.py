"""Every formula of docs/math.md against a float64 reference written the obvious way."""
import math

import pytest
import torch

import unidd_fast as uf
from unidd_fast.errors import ConfigError, NotPositiveDefiniteError
from unidd_fast.kernels._utils import needs_float64

SHAPES = [(3, 5, 4, 3), (2, 24, 7, 5), (5, 13, 1, 1), (1, 40, 3, 2)]


def obvious_stats(feat):
    """torch.cov on a permuted copy, as public code does (float64)."""
    n, d, h, w = feat.shape
    rows = feat.double().permute(0, 2, 3, 1).reshape(-1, d)
    return torch.cov(rows.T, correction=0), rows.mean(0), feat.double().mean((2, 3))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_site_stats_matches_obvious(shape, channels_last, gen):
    feat = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    psi, mu, pooled = uf.site_stats(feat, backend="torch")
    ref = obvious_stats(feat)
    assert psi.dtype == torch.float64
    for got, want in zip((psi, mu, pooled), ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_site_stats_dtypes(gen):
    feat = torch.randn(2, 6, 3, 3, generator=gen)
    assert uf.site_stats(feat)[0].dtype == torch.float32
    # bf16 input accumulates in fp32: against the same bf16 values in float64 only fp32
    # accumulation error (~1e-7 relative per add over 18 rows) remains
    bf = feat.bfloat16()
    psi_bf = uf.site_stats(bf)[0]
    assert psi_bf.dtype == torch.float32
    torch.testing.assert_close(psi_bf.double(), obvious_stats(bf.double())[0], rtol=1e-5, atol=1e-5)


def test_site_stats_gradcheck(gen):
    feat = torch.randn(2, 5, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: uf.site_stats(x, backend="torch"), (feat,))


@pytest.mark.parametrize("c", [1, 3, 7])
def test_flc_int_and_soft(c, gen):
    pooled = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, c, (9,), generator=gen)
    Y = torch.nn.functional.one_hot(labels, c).double()
    torch.testing.assert_close(uf.flc(pooled, labels, c), pooled.T @ Y / 9)
    probs = torch.softmax(torch.randn(9, c, generator=gen, dtype=torch.float64), 1)
    torch.testing.assert_close(uf.flc(pooled, probs), pooled.T @ probs / 9)
    assert uf.flc(pooled.float(), labels, c).dtype == torch.float32


def random_spd(k, d, gen, dtype=torch.float64):
    A = torch.randn(k, d, 2 * d, generator=gen, dtype=dtype)
    return A @ A.transpose(-1, -2) / (2 * d)


@pytest.mark.parametrize("d", [1, 5, 17])
def test_regularized_inverse(d, gen):
    A = random_spd(3, d, gen)
    for beta in (1e-3, 0.1, 2.0):
        want = torch.linalg.inv(A + beta * torch.eye(d, dtype=A.dtype))
        torch.testing.assert_close(uf.regularized_inverse(A, beta, backend="torch"), want, rtol=1e-9, atol=1e-9)
    A.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: uf.regularized_inverse(0.5 * (a + a.mT), 0.3, backend="torch"), (A,))


def test_regularized_inverse_fp32_accuracy(gen):
    A = random_spd(4, 24, gen)
    want = torch.linalg.inv(A + 1e-3 * torch.eye(24, dtype=A.dtype))
    got = uf.regularized_inverse(A.float(), 1e-3).double()
    # fp32 Cholesky: relative error ~ cond · eps32; cond(A + 1e-3 I) here is ~ 3e3
    assert (got - want).norm() / want.norm() < 1e-3


def rank_deficient_psi(k, d, rows, lam_max, gen):
    """Covariances of ``rows`` < d points (Ψ of a deep site of a small class-batch), λmax = lam_max."""
    X = torch.randn(k, rows, d, generator=gen, dtype=torch.float64)
    X = X - X.mean(1, keepdim=True)
    psi = X.mT @ X / rows
    return psi * (lam_max / torch.linalg.eigvalsh(psi)[:, -1:, None])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("beta", [1e-4, 1e-5])
def test_small_beta_fp32_is_computed_exactly(beta, backend, gen):
    """fp32 input with κ = (λmax + β)/β beyond fp32 (λmax = 100, n·h·w < d) goes through float64:
    the fp32 result is the float64 inverse rounded, not percents off with info = 0."""
    psi = rank_deficient_psi(2, 40, 12, 100.0, gen).float().double()  # the exact value of the fp32 input
    want = torch.linalg.inv(psi + beta * torch.eye(40, dtype=psi.dtype))
    naive = torch.cholesky_inverse(torch.linalg.cholesky(psi.float() + beta * torch.eye(40))).double()
    assert (naive - want).norm() / want.norm() > 1e-3  # the failure the promotion prevents
    assert needs_float64(psi.float(), beta) and not needs_float64(psi.float(), 0.1)
    got = uf.regularized_inverse(psi.float(), beta, backend=backend)
    assert got.dtype == torch.float32
    assert (got.double() - want).norm() / want.norm() < 1e-6
    A = psi.float().requires_grad_(True)
    uf.regularized_inverse(A, beta, backend="torch").sum().backward()
    assert A.grad.dtype == torch.float32 and torch.isfinite(A.grad).all()


def test_regularized_inverse_not_spd_raises(gen):
    A = random_spd(2, 4, gen)
    A[1] = -torch.eye(4, dtype=A.dtype)
    with pytest.raises(NotPositiveDefiniteError, match=r"\['b'\]"):
        uf.regularized_inverse(A, 0.1, names=["a", "b"])
    A[1, 0, 0] = float("nan")
    with pytest.raises(NotPositiveDefiniteError):
        uf.regularized_inverse(A, 0.1)


def obvious_cfm(psi_r, sig_r, psi_s, sig_s, beta):
    eye = torch.eye(psi_r.shape[-1], dtype=torch.float64)
    ir, is_ = torch.linalg.inv(psi_r + beta * eye), torch.linalg.inv(psi_s + beta * eye)
    return torch.linalg.norm(ir - is_), torch.linalg.norm(ir @ sig_r - is_ @ sig_s)


@pytest.mark.parametrize("d,c", [(6, 1), (11, 4)])
def test_cfm_site_loss(d, c, gen):
    psi_r, psi_s = random_spd(1, d, gen)[0], random_spd(1, d, gen)[0]
    sig_r, sig_s = torch.randn(d, c, generator=gen, dtype=torch.float64), torch.randn(d, c, generator=gen, dtype=torch.float64)
    f, s = uf.cfm_site_loss(psi_r, sig_r, psi_s, sig_s, 0.2)
    fw, sw = obvious_cfm(psi_r, sig_r, psi_s, sig_s, 0.2)
    torch.testing.assert_close(f, fw)
    torch.testing.assert_close(s, sw)
    assert f.dtype == torch.float64
    psi_s.requires_grad_(True)
    sig_s.requires_grad_(True)

    def fn(p, g):
        p = 0.5 * (p + p.T)
        a, b = uf.cfm_site_loss(psi_r, sig_r, p, g, 0.2)
        return a + b

    assert torch.autograd.gradcheck(fn, (psi_s, sig_s))
    f32 = uf.cfm_site_loss(psi_r.float(), sig_r.float(), psi_s.detach().float(), sig_s.detach().float(), 0.2)[0]
    assert f32.dtype == torch.float32


def test_beta_schedule():
    assert uf.beta_schedule(0.1, 0, 10) == pytest.approx(0.1)
    assert uf.beta_schedule(0.1, 5, 10) == pytest.approx(0.05)
    assert uf.beta_schedule(0.1, 10, 10) == pytest.approx(1e-6)  # floored
    assert uf.beta_schedule(0.1, 3, 10) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.3)) / 2)
    assert uf.beta_schedule(0.1, 3, 10, kind="linear") == pytest.approx(0.07)
    assert uf.beta_schedule(0.1, 3, 10, kind="constant") == pytest.approx(0.1)
    t = uf.beta_schedule(torch.tensor(0.1, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64), 10)
    assert torch.is_tensor(t) and float(t) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.3)) / 2)
    with pytest.raises(ConfigError):
        uf.beta_schedule(0.1, 1, 10, kind="step")
    with pytest.raises(ConfigError):
        uf.beta_schedule(0.1, 1, 10, beta_min=0)


@pytest.mark.parametrize("offset", [0.3, 3.0, 100.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_composite_matches_reference_fp32(offset, channels_last, gen):
    """The torch backend's one-GEMM path (and its centred fallback beyond μ²/σ² = 64) keeps
    fp32 accuracy: relative error ≲ eps32 · (1 + μ²/σ²) · small growth, at most ~4e-6 here."""
    from unidd_fast import reference
    from unidd_fast.kernels import composite

    feat = offset + torch.randn(6, 9, 7, 5, generator=gen, dtype=torch.float64)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    want = reference.site_stats(feat)
    got = composite.site_stats(feat.float())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert (g.double() - w).norm() <= 1e-5 * w.norm()
    torch.testing.assert_close(composite.site_stats(feat)[0], want[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_composite_gradcheck(channels_last, gen):
    from unidd_fast.kernels import composite

    feat = torch.randn(3, 4, 3, 2, generator=gen, dtype=torch.float64) + 0.7
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    feat.requires_grad_(True)
    assert torch.autograd.gradcheck(composite.site_stats, (feat,))
    # each output alone (the others get no gradient)
    for i in range(3):
        assert torch.autograd.gradcheck(lambda x: composite.site_stats(x)[i], (feat,))
    big = (feat.detach() * 0.01 + 50).requires_grad_(True)  # takes the centred branch
    assert torch.autograd.gradcheck(lambda x: composite.site_stats(x)[0], (big,))


# d ≤ 2·h·w: NCHW batched Gram; d > 2·h·w: NCHW channel-major copy; h = w = 1 and d = 1: both layouts at once
LAYOUT_SHAPES = [(3, 5, 4, 3), (2, 8, 2, 2), (2, 9, 2, 2), (1, 40, 3, 2), (4, 9, 1, 3), (5, 13, 1, 1), (3, 1, 4, 5)]


def _in_layout(feat, layout):
    if layout == "channels_last":
        return feat.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # neither layout: every other column of a wider map
        return torch.cat([feat, feat], 3)[..., ::2]
    return feat


@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "strided"])
@pytest.mark.parametrize("offset", [0.5, 40.0])  # 40: μ²/σ² > 64, the centred formula
def test_composite_forward_backward_match_reference_in_every_layout(shape, layout, offset, gen):
    """The torch backend reads NCHW and channels_last maps in place; its gradient comes back
    in the input's memory format, from the composite itself (no re-layout in the op)."""
    from unidd_fast import reference
    from unidd_fast.kernels import composite

    feat = _in_layout(torch.randn(shape, generator=gen, dtype=torch.float64) + offset, layout)
    assert feat.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last") or \
        shape[1] == 1 or shape[2:] == (1, 1)
    want = reference.site_stats(feat)
    got = composite.site_stats(feat)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    n, d = shape[:2]
    cot = (torch.randn(d, d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64),
           torch.randn(n, d, generator=gen, dtype=torch.float64))
    leaf = feat.detach().requires_grad_(True)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for keep in ((0, 1, 2), (0,), (1, 2)):  # unused outputs get None
        grad = composite.site_stats_grad(feat, got[1], *[c if i in keep else None for i, c in enumerate(cot)])
        outputs = reference.site_stats(leaf)
        expect = torch.autograd.grad([outputs[i] for i in keep], leaf, [cot[i] for i in keep])[0]
        torch.testing.assert_close(grad, expect, rtol=1e-10, atol=1e-10)
        assert grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("shape", [(2, 3, 3, 2), (2, 7, 1, 3)])  # batched Gram / channel-major copy for NCHW
@pytest.mark.parametrize("channels_last", [False, True])
def test_site_stats_op_gradient_follows_the_input_layout(shape, channels_last, gen):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feat = (torch.randn(shape, generator=gen, dtype=torch.float64) + 0.3).contiguous(memory_format=fmt)
    feat.requires_grad_(True)
    psi, mu, pooled = uf.site_stats(feat, backend="torch")
    (psi.square().sum() + mu.sum() + pooled.sin().sum()).backward()
    assert feat.grad.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(lambda x: uf.site_stats(x, backend="torch"), (feat,))

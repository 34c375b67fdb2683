"""Property-based tests: extreme but valid inputs stay finite and correct, or raise the
documented error (NotPositiveDefiniteError / NonFiniteError)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unidd_fast as uf
from unidd_fast.errors import NotPositiveDefiniteError

shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3))
offsets = st.sampled_from([0.0, 1.0, -50.0, 1e3, 1e4])
scales = st.sampled_from([1e-6, 1e-3, 1.0, 30.0])
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)  # reproducible in CI


def features(shape, offset, scale, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


@SETTINGS
@given(shape=shapes, offset=offsets, scale=scales, seed=st.integers(0, 2**16))
def test_site_stats_extreme_inputs(shape, offset, scale, seed):
    feat = features(shape, offset, scale, seed)
    psi, mu, pooled = uf.site_stats(feat)
    rows = feat.permute(0, 2, 3, 1).reshape(-1, shape[1])
    assert torch.isfinite(psi).all() and torch.isfinite(mu).all()
    # the centred covariance is PSD up to rounding relative to the variance scale
    assert torch.linalg.eigvalsh(psi).min() >= -1e-9 * scale**2
    torch.testing.assert_close(psi, torch.cov(rows.T, correction=0).reshape(psi.shape), rtol=1e-7, atol=1e-12 * scale**2 + 1e-300)
    if rows.shape[0] == 1:  # n·h·w = 1: a single row has zero covariance
        assert psi.abs().max() == 0
    # float32 input must stay finite (its accuracy is covered in test_real_stats)
    psi32 = uf.site_stats(feat.float())[0].double()
    assert torch.isfinite(psi32).all()


@SETTINGS
@given(d=st.integers(1, 12), rows=st.integers(1, 20), beta=st.sampled_from([1e-3, 1e-2, 0.1, 1.0, 10.0]),
       scale=scales, seed=st.integers(0, 2**16))
def test_regularized_inverse_rank_deficient(d, rows, beta, scale, seed):
    """Rank-deficient Ψ (rows < d) is fine for β > 0; fp32 stays within cond·eps32 of float64."""
    g = torch.Generator().manual_seed(seed)
    X = scale * torch.randn(rows, d, generator=g, dtype=torch.float64)
    psi = X.T @ X / rows
    inv = uf.regularized_inverse(psi, beta)
    want = torch.linalg.inv(psi + beta * torch.eye(d, dtype=torch.float64))
    torch.testing.assert_close(inv, want, rtol=1e-8, atol=1e-8 / beta)
    cond = float(torch.linalg.cond(psi + beta * torch.eye(d, dtype=torch.float64)))
    try:
        inv32 = uf.regularized_inverse(psi.float(), beta).double()
    except NotPositiveDefiniteError:
        assert cond > 1e5  # only ill-conditioned fp32 problems may refuse, and with the documented error
        return
    assert torch.isfinite(inv32).all()
    assert (inv32 - want).norm() <= 50 * cond * 6e-8 * want.norm()


@SETTINGS
@given(shape=shapes, offset=offsets, scale=scales, seed=st.integers(0, 2**16),
       beta=st.sampled_from([1e-3, 0.1, 1.0]))
def test_cfm_site_loss_finite(shape, offset, scale, seed, beta):
    real = features((4,) + shape[1:], offset, 1.0, seed + 1)
    syn = features(shape, offset, scale, seed)
    psi_r, mu_r, pooled_r = uf.site_stats(real)
    psi_s, mu_s, pooled_s = uf.site_stats(syn)
    c = 3
    labels = torch.arange(shape[0]) % c
    f, s = uf.cfm_site_loss(psi_r, uf.flc(pooled_r, torch.arange(4) % c, c), psi_s, uf.flc(pooled_s, labels, c), beta)
    assert torch.isfinite(f) and torch.isfinite(s) and f >= 0 and s >= 0

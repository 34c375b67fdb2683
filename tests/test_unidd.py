"""UniDD identities of the paper, checked numerically in float64."""
import pytest
import torch

import unidd_fast as uf
from unidd_fast import filters

N, M, D, C = 30, 8, 6, 3


@pytest.fixture
def data(gen):
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    Xs = torch.randn(M, D, generator=gen, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(torch.randint(0, C, (N,), generator=gen), C).double()
    Ys = torch.nn.functional.one_hot(torch.arange(M) % C, C).double()
    return X, Y, Xs, Ys


def test_krr_identity(data):
    """Xsᵀ(XsXsᵀ + βI)⁻¹ = (XsᵀXs + βI)⁻¹Xsᵀ (appendix Eq. 7)."""
    _, _, Xs, _ = data
    beta = 0.37
    left = Xs.T @ torch.linalg.inv(Xs @ Xs.T + beta * torch.eye(M, dtype=Xs.dtype))
    right = filters.krr(beta).matrix(Xs.T @ Xs) @ Xs.T
    torch.testing.assert_close(left, right, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K", [1, 4, 9])
def test_mtt_closed_form_equals_gradient_descent(data, gen, K):
    """Eq. 9: K full-batch GD steps on ½‖XW − Y‖² from W0 equal the filtered closed form."""
    X, Y, _, _ = data
    alpha = 0.5 / torch.linalg.eigvalsh(X.T @ X).max().item()
    W0 = torch.randn(D, C, generator=gen, dtype=torch.float64)
    W = W0.clone()
    for _ in range(K):
        W = W - alpha * X.T @ (X @ W - Y)
    A = X.T @ X
    closed = filters.mtt(alpha, K).matrix(A) @ W0 + alpha * filters.mtt_sum(alpha, K).matrix(A) @ (X.T @ Y)
    torch.testing.assert_close(W, closed, rtol=1e-10, atol=1e-10)


def test_matrix_forms_match_eigendecomposition(data):
    """Closed-form f(A) of every filter equals U f(Λ) Uᵀ."""
    X = data[0]
    A = X.T @ X / N
    for f in (filters.krr(0.2), filters.low_pass(), filters.all_pass(), filters.mtt(0.3, 5), filters.mtt_sum(0.3, 5)):
        lam, U = torch.linalg.eigh(A)
        torch.testing.assert_close(f.matrix(A), f.from_eigh(U, lam), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(filters.SpectralFilter.matrix(f, A), f.from_eigh(U, lam), rtol=1e-9, atol=1e-9)


def test_dm_objective(data):
    """DM (Eq. 3): ‖XᵀY − XsᵀYs‖² is UniDD with the all-pass filter and g = XᵀY."""
    X, Y, Xs, Ys = data
    want = ((X.T @ Y - Xs.T @ Ys) ** 2).sum()
    torch.testing.assert_close(uf.unidd_loss(X, Y, Xs, Ys, filters.all_pass(), signal=True), want)


def test_dc_objective(data):
    """DC (Table 1): ‖XᵀX − XsᵀXs‖² + ‖XᵀY − XsᵀYs‖² is low-pass (g = I) plus all-pass (g = XᵀY)."""
    X, Y, Xs, Ys = data
    want = ((X.T @ X - Xs.T @ Xs) ** 2).sum() + ((X.T @ Y - Xs.T @ Ys) ** 2).sum()
    got = uf.unidd_loss(X, Y, Xs, Ys, filters.low_pass(), signal=False) + uf.unidd_loss(
        X, Y, Xs, Ys, filters.all_pass(), signal=True)
    torch.testing.assert_close(got, want)


def test_frepo_objective(data):
    """FRePo (Eq. 15) is UniDD with the KRR filter and g = XᵀY; labels may be class ids."""
    X, Y, Xs, Ys = data
    beta = 0.1
    eye = torch.eye(D, dtype=X.dtype)
    want = ((torch.linalg.inv(X.T @ X + beta * eye) @ X.T @ Y
             - torch.linalg.inv(Xs.T @ Xs + beta * eye) @ Xs.T @ Ys) ** 2).sum()
    torch.testing.assert_close(uf.unidd_loss(X, Y, Xs, Ys, filters.krr(beta)), want)
    torch.testing.assert_close(uf.unidd_loss(X, Y.argmax(1), Xs, Ys.argmax(1), filters.krr(beta)), want)


def test_all_pass_drives_gram_to_identity(data):
    """The all-pass filter maps every XsᵀXs to I (f(Λ) = 1), through the eigendecomposition too,
    so the all-pass filter term carries no information about Xs."""
    _, _, Xs, _ = data
    I = torch.eye(D, dtype=torch.float64)
    A = Xs.T @ Xs + 0.1 * I
    lam, U = torch.linalg.eigh(A)
    torch.testing.assert_close(filters.all_pass().from_eigh(U, lam), I, rtol=1e-10, atol=1e-10)
    assert uf.unidd_loss(data[0], None, Xs, None, filters.all_pass(), signal=False) == 0


def test_unidd_gradcheck(data):
    X, Y, Xs, Ys = data
    Xs = Xs.clone().requires_grad_(True)
    for f in (filters.krr(0.5), filters.low_pass(), filters.mtt(0.01, 3)):
        assert torch.autograd.gradcheck(lambda xs: uf.unidd_loss(X, Y, xs, Ys, f), (Xs,))


def test_krr_filter_is_high_pass():
    lam = torch.linspace(0, 10, 50, dtype=torch.float64)
    response = filters.krr(0.1)(lam)
    assert torch.all(response[1:] < response[:-1])  # small eigenvalues (high frequency) amplified
    assert torch.all(filters.low_pass()(lam)[1:] > filters.low_pass()(lam)[:-1])

"""Triton batched (A + βI)^-1 (interpreter) against the float64 reference: accuracy,
β as float or 0-d tensor, failure reporting, backward."""
import pytest
import torch

from unidd_fast import reference
from unidd_fast.errors import NotPositiveDefiniteError
from unidd_fast.kernels.triton.reg_inverse import cholesky_inverse, regularized_inverse


def covariances(k, d, gen, rows=None, scale=1.0):
    """Stack of k sample covariances of ``rows`` points (rank-deficient when rows < d)."""
    rows = rows or 3 * d
    X = torch.randn(k, rows, d, generator=gen, dtype=torch.float64) * scale
    X = X - X.mean(1, keepdim=True)
    return X.mT @ X / rows


def rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


# (d, block): a single padded tile; three 16-blocks with a partial last one (every
# stage of the blocked algorithm: panel, trailing update, off-diagonal inverse blocks)
CASES = [(24, 32), (40, 16), (70, 32)]


@pytest.mark.parametrize("d, block, beta", [case + (1e-3,) for case in CASES] + [(40, 16, 0.5)])
def test_fp32_within_1e_4_of_float64(d, block, beta, gen):
    """Spec: 1e-4 relative in fp32 for β ≥ 1e-3 (Ψ scaled to ‖Ψ‖ = 1, as for normalised
    features). Any fp32 inverse errs by ~κ·eps32 from rounding A alone; κ ≤ 1e3 here
    (rank-deficient Ψ, rows < d), so ≲ 6e-5. LAPACK's fp32 Cholesky is held to the same."""
    A = covariances(2, d, gen, rows=d // 2)
    A = A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    want = reference.regularized_inverse(A, beta)
    got = regularized_inverse(A.float(), beta, block=block)
    assert got.dtype == torch.float32
    assert rel(got, want) < 1e-4
    assert rel(got, want) < 2 * rel(reference.regularized_inverse(A.float(), beta), want) + 1e-6


@pytest.mark.parametrize("d, block", CASES)
def test_float64_exact(d, block, gen):
    A = covariances(2, d, gen)
    got = regularized_inverse(A, 0.1, block=block)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference.regularized_inverse(A, 0.1), rtol=1e-11, atol=1e-11)


def test_leading_dims_and_beta_tensor(gen):
    """(2, 2, d, d) stacks keep their shape; a 0-d tensor β is read by the kernel (fp64 β
    by value is split in two fp32 halves, so 0.1 is not rounded to fp32)."""
    A = covariances(4, 20, gen).reshape(2, 2, 20, 20)
    want = reference.regularized_inverse(A, 0.1)
    torch.testing.assert_close(regularized_inverse(A, torch.tensor(0.1, dtype=torch.float64), block=16), want,
                               rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(regularized_inverse(A, 0.1, block=16), want, rtol=1e-11, atol=1e-11)


def test_lower_triangle_is_read(gen):
    A = covariances(1, 20, gen)
    noisy = A + torch.triu(torch.randn(20, 20, generator=gen, dtype=torch.float64), diagonal=1)
    torch.testing.assert_close(regularized_inverse(noisy, 0.2, block=16), reference.regularized_inverse(A, 0.2),
                               rtol=1e-11, atol=1e-11)


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")
@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_not_positive_definite_raises_naming_the_site(bad, gen):
    A = covariances(3, 40, gen).float()
    if bad == "negative":
        A[1, 35, 35] = -50.0  # in the last, partial block: found after two trailing updates
    else:
        A[1, 20, 3] = A[1, 3, 20] = float("nan")
    with pytest.raises(NotPositiveDefiniteError, match=r"\['layer2'\]"):
        regularized_inverse(A, 0.1, names=["layer1", "layer2", "layer3"], block=16)
    _, info = cholesky_inverse(A, 0.1, block=16)
    assert info[0] == 0 and info[2] == 0
    assert (info[1] == 36) if bad == "negative" else (info[1] > 0)


def test_gradcheck_float64(gen):
    # fast mode (random directional derivatives): each interpreted call costs ~0.1 s
    A = covariances(2, 5, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: regularized_inverse(0.5 * (a + a.mT), 0.3, block=16), (A,),
                                    fast_mode=True)


def test_fp32_backward_matches_reference(gen):
    A = covariances(2, 40, gen)
    G = torch.randn(2, 40, 40, generator=gen, dtype=torch.float64)
    want, = torch.autograd.grad((reference.regularized_inverse(A.requires_grad_(), 0.05) * G).sum(), A)
    A32 = A.detach().float().requires_grad_()
    got, = torch.autograd.grad((regularized_inverse(A32, 0.05, block=16) * G.float()).sum(), A32)
    # dA = −Y sym(G) Y: the error of Y (κ·eps32, κ ≈ 100 here) enters twice
    assert rel(got, want) < 1e-4


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_pivot_names_its_column(dtype, gen):
    """An Inf on the diagonal is a failed pivot at its own column (pivot > 0 alone accepted it)."""
    A = covariances(2, 40, gen).to(dtype)
    A[1, 21, 21] = float("inf")  # second block, after one trailing update
    _, info = cholesky_inverse(A, 0.1, block=16)
    assert info.tolist() == [0, 22]
    with pytest.raises(NotPositiveDefiniteError, match=r"\['b'\]"):
        regularized_inverse(A, 0.1, names=["a", "b"], block=16)

"""CFMLoss on the Triton kernels (interpreter) against the torch backend, and op dispatch."""
import pytest
import torch
from test_cfm_loss import C, real_stats, tiny_convnet

import unidd_fast as uf
from unidd_fast.errors import NonFiniteError


def loss_and_image_grad(backend, model, stats, x, y, batches=2):
    """Loss and image gradient of the last of ``batches`` class-batches (EMU folds b > 1)."""
    cfm = uf.CFMLoss(model, stats, beta=0.2, eta=0.1, backend=backend)
    try:
        for _ in range(batches):
            xx = x.clone().requires_grad_()
            model(xx)
            reg = cfm(y)
            (grad,) = torch.autograd.grad(reg, xx)
            cfm.next_batch()
    finally:
        cfm.remove()
    return reg.detach(), grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_cfm_loss_triton_matches_torch(channels_last, gen):
    """fp32 model: both backends accumulate in fp32; the loss is a sum of norms of
    differences of inverses, so 1e-5 relative covers the rounding of either path. The image
    gradient: Triton's statistics backward multiplies in bf16x3 (``site_stats.grad_precision``,
    operands to 2^-16), so 1e-4."""
    model = tiny_convnet()
    stats = real_stats(model, gen)
    x = torch.randn(C, 3, 8, 8, generator=gen)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 1])
    want_loss, want_grad = loss_and_image_grad("torch", model, stats, x, y)
    got_loss, got_grad = loss_and_image_grad("triton", model, stats, x, y)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert ((got_grad - want_grad).norm() / want_grad.norm()) < 1e-4


def test_nan_in_features_names_the_site(gen):
    model = tiny_convnet()
    stats = real_stats(model, gen)
    cfm = uf.CFMLoss(model, stats, backend="triton")
    x = torch.randn(C, 3, 8, 8, generator=gen)
    x[0, 0, 0, 0] = float("nan")
    model(x)
    with pytest.raises(NonFiniteError, match="'1'"):
        cfm(torch.arange(C))
    cfm.remove()


def test_ops_route_to_triton(gen):
    feat = torch.randn(2, 24, 3, 5, generator=gen, dtype=torch.float64)
    for got, want in zip(uf.site_stats(feat, backend="triton"), uf.site_stats(feat, backend="torch")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    psi = uf.site_stats(feat, backend="torch")[0]
    torch.testing.assert_close(uf.regularized_inverse(psi, 0.1, backend="triton"),
                               uf.regularized_inverse(psi, 0.1, backend="torch"), rtol=1e-11, atol=1e-11)



"""The fused ops as torch custom operators (kernels/library.py): schema checks by
``torch.library.opcheck`` (fake shapes, autograd registration), gradients in float64, and a
recover step compiled with ``torch.compile(fullgraph=True)`` — no graph break — that gives the
eager step's loss and gradient."""
import pytest
import torch
import torch.nn.functional as F

from unidd_fast import CFMLoss, collect_real_stats, ops, reference
from unidd_fast.kernels import library
from unidd_fast.pipeline.models import build_model


def _spd(gen, k, d):
    X = torch.randn(k, d, d + 3, generator=gen, dtype=torch.float64)
    return X @ X.mT / d


@pytest.mark.parametrize("channels_last", [False, True])
def test_site_stats_op_passes_opcheck_and_gradcheck(gen, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feat = (torch.randn(3, 5, 4, 3, generator=gen, dtype=torch.float64) + 0.7).contiguous(memory_format=fmt)
    torch.library.opcheck(library.site_stats, (feat.requires_grad_(), "torch"))
    for got, want in zip(ops.site_stats(feat), reference.site_stats(feat)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for i in range(3):
        assert torch.autograd.gradcheck(lambda x: ops.site_stats(x)[i], (feat,))


def test_regularized_inverse_op_passes_opcheck_and_gradcheck(gen):
    A = _spd(gen, 3, 5).requires_grad_()
    torch.library.opcheck(library.regularized_inverse, (A, 0.3, None, True, None, "torch"))
    torch.library.opcheck(library.regularized_inverse, (A, 0.0, torch.tensor(0.3, dtype=torch.float64), True,
                                                        "a\x1fb\x1fc", "torch"))
    sym = lambda a: 0.5 * (a + a.mT)  # noqa: E731  the op reads symmetric matrices
    assert torch.autograd.gradcheck(lambda a: ops.regularized_inverse(sym(a), 0.3), (A,))
    torch.testing.assert_close(ops.regularized_inverse(A, torch.tensor(0.3, dtype=torch.float64)),
                               reference.regularized_inverse(A, 0.3), rtol=1e-12, atol=1e-12)


def _setup(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = build_model("convnet", 3, 8, channels=2, width=6, depth=2).eval().requires_grad_(False)
    data = [(torch.randn(8, 2, 8, 8, generator=gen) + 0.3, torch.randint(0, 3, (8,), generator=gen)) for _ in range(2)]
    cfm = CFMLoss(model, collect_real_stats(model, data, 3), beta=0.5)
    cfm.make_graph_safe()
    return model, cfm


def test_a_compiled_recover_step_has_no_graph_break_and_matches_eager(gen):
    model, cfm = _setup(gen)
    x = torch.randn(6, 2, 8, 8, generator=gen)
    targets = torch.arange(6) % 3

    def step(images, y):
        return F.cross_entropy(model(images), y) + cfm(y)

    eager_x = x.clone().requires_grad_()
    eager = step(eager_x, targets)
    eager.backward()
    compiled_x = x.clone().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled_x, targets)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-4, atol=1e-6)
    cfm.remove()

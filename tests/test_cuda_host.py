"""Host side of the CUDA backend (kernels/cuda/ops.py) on CPU: layouts, batching plans,
checks and error messages, run end to end against ``TorchKernels``, a plain-torch double
with the extension's interface that reads and writes only through the buffers, strides and
offsets cuda_ops hands it. No CUDA kernel runs here (see test_cuda_emulated.py)."""
import itertools

import pytest
import torch

from unidd_fast import reference
from unidd_fast.kernels import composite, registry
from unidd_fast.kernels.cuda import ops as cuda_ops
from unidd_fast.errors import ConfigError, NotPositiveDefiniteError


class TorchKernels:
    """The interface of unidd_fast._cuda, in torch, honouring its buffer contracts."""

    device_type = "cpu"
    INVERSE_TILE = 8
    INVERSE_MAX_GROUPS = 3

    def __init__(self):
        self.launches = 0

    @staticmethod
    def _rows(x, n, d, hw, sn, sc, sp):
        """The (n·hw, d) rows, read from x's storage through the layout cuda_ops computed."""
        flat = x.as_strided((x.untyped_storage().nbytes() // x.element_size(),), (1,), 0)
        i = torch.arange(n).repeat_interleave(hw)
        p = torch.arange(hw).repeat(n)
        offsets = x.storage_offset() + (i * sn + p * sp)[:, None] + torch.arange(d)[None, :] * sc
        return flat[offsets].float(), offsets

    def stats_workspace(self, n, d, hw):
        return 3 * (d * d + 3 * d) + d

    def stats_forward(self, x, n, d, hw, sn, sc, sp, partial, psum, psi, mu, pooled):
        assert partial.numel() == self.stats_workspace(n, d, hw) and psum.shape == (n, d)
        rows, _ = self._rows(x, n, d, hw, sn, sc, sp)
        mu.copy_(rows.mean(0))
        psi.copy_((rows - mu).T @ (rows - mu) / rows.shape[0])
        pooled.copy_(rows.reshape(n, hw, d).mean(1))

    def stats_backward(self, x, n, d, hw, sn, sc, sp, mu, gpsi, gmu, gpooled, dx):
        rows, offsets = self._rows(x, n, d, hw, sn, sc, sp)
        g = (rows - mu) @ (gpsi + gpsi.T) / rows.shape[0]
        if gmu is not None:
            g = g + gmu / rows.shape[0]
        if gpooled is not None:
            g = g + gpooled.repeat_interleave(hw, 0) / hw
        flat = dx.as_strided((dx.untyped_storage().nbytes() // dx.element_size(),), (1,), 0)
        flat[dx.storage_offset() + offsets] = g.to(dx.dtype)

    def inverse(self, a, out, work_offsets, info_offsets, beta, work, info):
        self.launches += 1
        assert len(a) <= self.INVERSE_MAX_GROUPS
        for ai, oi, wo, io in zip(a, out, work_offsets, info_offsets):
            k, d = ai.shape[0], ai.shape[-1]
            D = cuda_ops.padded_size(d, self.INVERSE_TILE)
            W = work[wo:wo + 2 * k * D * D].view(2, k, D, D)[0]  # must lie inside the workspace
            W.copy_(torch.eye(D).expand(k, D, D))
            W[:, :d, :d] = ai + beta * torch.eye(d)
            L, status = torch.linalg.cholesky_ex(W)
            info[io:io + k] = status
            oi.copy_(torch.cholesky_inverse(L)[:, :d, :d])


def spd(gen, *shape, dtype=torch.float32):
    """Random symmetric positive definite (*batch, d, d) matrices, shape = (*batch, d); condition number ~10."""
    d = shape[-1]
    X = torch.randn(*shape[:-1], d, d + 4, generator=gen, dtype=torch.float64)
    return (X @ X.transpose(-1, -2) / d + 0.5 * torch.eye(d, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("shape,memory_format,view", [
    ((3, 5, 4, 6), torch.contiguous_format, None),
    ((2, 7, 3, 5), torch.channels_last, None),
    ((2, 4, 1, 5), torch.channels_last, None),  # h = 1: its stride is arbitrary
    ((2, 4, 5, 1), torch.channels_last, None),  # w = 1: p walks h
    ((3, 6, 4, 4), torch.contiguous_format, "slice_hw"),  # neither layout: copied
    ((4, 6, 3, 3), torch.contiguous_format, "batch_stride"),  # every other sample: copied
])
def test_feature_layout_addresses_every_row(gen, shape, memory_format, view):
    x = torch.randn(shape, generator=gen).contiguous(memory_format=memory_format)
    if view == "slice_hw":
        x = torch.randn(shape[0], shape[1], 7, 9, generator=gen)[:, :, 1:5, 2:6]
    elif view == "batch_stride":
        x = torch.randn(2 * shape[0], *shape[1:], generator=gen)[::2]
    y, lay = cuda_ops.feature_layout(x)
    assert (y.data_ptr() == x.data_ptr()) == (view is None)
    rows, _ = TorchKernels._rows(y, lay.n, lay.d, lay.hw, lay.stride_n, lay.stride_c, lay.stride_p)
    torch.testing.assert_close(rows, x.permute(0, 2, 3, 1).reshape(-1, shape[1]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_site_stats_host_path_matches_reference(gen, dtype, memory_format):
    x = (torch.randn(3, 6, 5, 3, generator=gen, dtype=torch.float64) + 2).to(dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    out = cuda_ops.site_stats_cuda(x, kernels=TorchKernels())
    x64 = x.detach().double().requires_grad_()
    ref = reference.site_stats(x64)
    grads = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref]
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)  # fp32 accumulation of exact inputs
    sum((o * g.float()).sum() for o, g in zip(out, grads)).backward()
    sum((r * g).sum() for r, g in zip(ref, grads)).backward()
    assert x.grad.dtype == dtype and x.grad.stride() == x.stride()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # dx is rounded to the input dtype (bf16: 8 bits)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * x64.grad.abs().max().item())


def test_site_stats_backward_with_only_some_outputs_used(gen):
    x = torch.randn(2, 4, 3, 3, generator=gen, requires_grad=True)
    _, mu, _ = cuda_ops.site_stats_cuda(x, kernels=TorchKernels())
    mu.sum().backward()  # g_psi and g_pooled arrive as None
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 18))


def test_float64_is_refused_here_and_routed_to_torch_by_the_registry(gen, monkeypatch):
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    with pytest.raises(ConfigError, match="fp64 runs the torch backend"):
        cuda_ops.site_stats_cuda(x, kernels=TorchKernels())
    with pytest.raises(ConfigError, match="float64 matrices run the torch"):
        cuda_ops.regularized_inverse_cuda(spd(gen, 2, 3).double(), 0.2, kernels=TorchKernels())
    monkeypatch.setattr(registry, "cuda_extension_available", lambda: True)
    assert registry.implementation("site_stats", "cuda", "cuda", torch.float64) is composite.site_stats
    assert registry.implementation("regularized_inverse", "cuda", "cuda", torch.float64) is \
        composite.regularized_inverse


@pytest.mark.parametrize("bad,error,words", [
    (torch.zeros(3, 4, 5), ValueError, "(n, d, h, w)"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.int32), ConfigError, "fp32/fp16/bf16"),
    (torch.zeros(0, 3, 4, 4), ValueError, "empty"),
])
def test_site_stats_bad_input(bad, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        cuda_ops.site_stats_cuda(bad, kernels=TorchKernels())


def test_wrong_device_and_missing_extension_name_the_fix():
    class OnCuda(TorchKernels):
        device_type = "cuda"

    with pytest.raises(ConfigError, match=r"\.cuda\(\)"):
        cuda_ops.site_stats_cuda(torch.ones(1, 2, 2, 2), kernels=OnCuda())
    with pytest.raises(ConfigError, match=r"\.cuda\(\)"):
        cuda_ops.regularized_inverse_cuda(torch.eye(3), 0.1, kernels=OnCuda())
    try:
        from unidd_fast import _cuda  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="UNIDD_BUILD_CUDA=1"):
            cuda_ops.extension()


def _check_plan(sizes, tile, max_groups, max_matrices):
    plan = cuda_ops.plan_inverse(sizes, tile, max_groups, max_matrices)
    covered = {(e, m): 0 for e, (k, _) in enumerate(sizes) for m in range(k)}
    regions, first = [], list(itertools.accumulate([0] + [k for k, _ in sizes]))
    for groups in plan.launches:
        assert 1 <= len(groups) <= max_groups and sum(g.k for g in groups) <= max_matrices
        for g in groups:
            assert g.d == sizes[g.entry][1] and g.k > 0
            assert g.info_offset == first[g.entry] + g.start  # status in input order
            for m in range(g.start, g.start + g.k):
                covered[(g.entry, m)] += 1
            D = cuda_ops.padded_size(g.d, tile)
            regions.append((g.work_offset, g.work_offset + 2 * g.k * D * D))
    assert set(covered.values()) <= {1}
    regions.sort()
    assert all(a[1] <= b[0] for a, b in zip(regions, regions[1:]))  # disjoint work space
    assert regions[-1][1] <= plan.work_floats and plan.num_matrices == first[-1]
    biggest = [max(cuda_ops.padded_size(g.d, tile) for g in groups) for groups in plan.launches]
    assert biggest == sorted(biggest, reverse=True)  # large matrices first: similar sizes share launches
    return plan


@pytest.mark.parametrize("sizes,max_groups,max_matrices,launches", [
    ([(5, 64), (5, 128), (5, 256), (5, 512)], 32, 65535, 1),  # ResNet-18's 20 BN sites: one launch set
    ([(1, 3)] * 7, 3, 65535, 3),
    ([(10, 5), (4, 70)], 4, 6, 3),  # an input larger than a launch is split
    ([(0, 9), (2, 1), (3, 17)], 2, 65535, 1),
])
def test_plan_inverse(sizes, max_groups, max_matrices, launches):
    plan = _check_plan(sizes, 64, max_groups, max_matrices)
    assert len(plan.launches) == launches


def test_plan_inverse_random(gen):
    for _ in range(30):
        n = int(torch.randint(1, 8, (), generator=gen))
        sizes = [(int(torch.randint(0, 6, (), generator=gen)), int(torch.randint(1, 40, (), generator=gen)))
                 for _ in range(n)]
        if sum(k for k, _ in sizes):
            _check_plan(sizes, 16, int(torch.randint(1, 4, (), generator=gen)),
                        int(torch.randint(1, 7, (), generator=gen)))


def test_inverse_host_path_matches_reference_with_grad(gen):
    kernels = TorchKernels()
    mats = [spd(gen, 2, 5), spd(gen, 3, 2, 12), spd(gen, 1, 9), spd(gen, 4, 3)]
    leaves = [m.clone().requires_grad_() for m in mats]
    outs = cuda_ops.regularized_inverse_cuda(leaves, 0.3, kernels=kernels)
    assert kernels.launches == 2  # 4 inputs, at most 3 groups per launch
    grads = [torch.randn(m.shape, generator=gen) for m in mats]
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    for m, o, g, leaf in zip(mats, outs, grads, leaves):
        m64 = m.double().requires_grad_()
        ref = reference.regularized_inverse(m64, 0.3)
        (ref * g.double()).sum().backward()
        assert o.shape == m.shape and o.dtype == torch.float32
        torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)  # fp32, condition number ~10
        torch.testing.assert_close(leaf.grad.double(), m64.grad, rtol=1e-4, atol=1e-5)


def test_inverse_single_tensor_beta_tensor_and_dtypes(gen):
    A = spd(gen, 2, 3, 6)
    out = cuda_ops.regularized_inverse_cuda(A.bfloat16(), torch.tensor(0.2), kernels=TorchKernels())
    assert out.shape == A.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference.regularized_inverse(A.bfloat16().double(), 0.2),
                               rtol=1e-5, atol=1e-5)


def test_inverse_failure_names_the_site_in_input_order(gen):
    good, bad = spd(gen, 2, 4), spd(gen, 1, 7)
    bad[0, 3, 3] = -50.0  # not positive definite
    names = ["layer1.bn1", "layer1.bn2", "layer4.bn2"]
    with pytest.raises(NotPositiveDefiniteError, match=r"\['layer4\.bn2'\]"):
        cuda_ops.regularized_inverse_cuda([good, bad], 1e-3, names=names, kernels=TorchKernels())
    cuda_ops.regularized_inverse_cuda([good, bad], 1e-3, check=False, kernels=TorchKernels())  # no raise


@pytest.mark.parametrize("bad,error,words", [
    (torch.zeros(3, 4), ValueError, "square"),
    (torch.zeros(4), ValueError, "square"),
    (torch.zeros(2, 2, dtype=torch.int64), ConfigError, "floating-point"),
])
def test_inverse_bad_input(bad, error, words):
    with pytest.raises(error, match=words):
        cuda_ops.regularized_inverse_cuda(bad, 0.1, kernels=TorchKernels())


def test_inverse_names_must_match(gen):
    with pytest.raises(ValueError, match="2 names for 3 matrices"):
        cuda_ops.regularized_inverse_cuda([spd(gen, 1, 3), spd(gen, 2, 4)], 0.1, names=["a", "b"],
                                          kernels=TorchKernels())

"""The csrc/ kernels, compiled by g++ for csrc/emu.h — a CPU emulation of the CUDA thread
model (blocks in sequence, the threads of a block as fibres that switch at __syncthreads) —
run through kernels/cuda/ops.py against the float64 reference.

This executes the kernels' indexing, masking, barriers and fp32 arithmetic for real. It
does NOT run them on a GPU: races, the memory model, warp behaviour and speed are untested.
"""
import shutil

import pytest
import torch

from unidd_fast import reference
from unidd_fast.kernels.cuda import ops as cuda_ops
from unidd_fast.kernels.cuda.emulator import EmulatedKernels, build_emulator
from unidd_fast.errors import NotPositiveDefiniteError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found: cannot build the CPU emulation")


@pytest.fixture(scope="module")
def K(tmp_path_factory):
    return EmulatedKernels(build_emulator(tmp_path_factory.mktemp("emu")))


def spd(gen, k, d, cond_shift=0.5):
    X = torch.randn(k, d, d + 4, generator=gen, dtype=torch.float64)
    return (X @ X.transpose(-1, -2) / d + cond_shift * torch.eye(d, dtype=torch.float64)).float()


def _stats_case(K, gen, shape, dtype, memory_format, scale=2.0, offset=3.0, used=(True, True, True)):
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    out = cuda_ops.site_stats_cuda(x, kernels=K)
    x64 = x.detach().double().requires_grad_()  # the same (rounded) values, exactly
    ref = reference.site_stats(x64)
    for o, r in zip(out, ref):
        # fp32 accumulation of exact inputs: ~1e-6 relative to the largest entry
        torch.testing.assert_close(o.double(), r, rtol=0, atol=2e-6 * r.abs().max().item())
    grads = [torch.randn(r.shape, generator=gen, dtype=torch.float64) if u else None for r, u in zip(ref, used)]
    sum((o * g.float()).sum() for o, g in zip(out, grads) if g is not None).backward()
    sum((r * g).sum() for r, g in zip(ref, grads) if g is not None).backward()
    assert x.grad.dtype == dtype and x.grad.stride() == x.stride()
    # dx is rounded to the input dtype: half an ulp relative, 2^-24 / 2^-11 / 2^-8
    ulp = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=ulp, atol=ulp * x64.grad.abs().max().item())


@pytest.mark.parametrize("shape,dtype,memory_format", [
    ((5, 5, 7, 7), torch.float32, torch.contiguous_format),  # 8 row chunks cutting samples apart
    ((2, 70, 3, 5), torch.float32, torch.channels_last),      # two channel tiles: off-diagonal Gram tile
    ((3, 9, 6, 7), torch.bfloat16, torch.contiguous_format),
    ((2, 67, 1, 3), torch.float16, torch.channels_last),      # h = 1
    ((3, 3, 5, 1), torch.bfloat16, torch.channels_last),      # w = 1
])
def test_site_stats_forward_backward(K, gen, shape, dtype, memory_format):
    _stats_case(K, gen, shape, dtype, memory_format)


@pytest.mark.parametrize("shape", [
    (3, 5, 23, 29),  # 667 rows a sample: each spans many row chunks (head, middle, tail pieces)
    (40, 70, 3, 5),  # 15 rows a sample: a chunk holds whole samples inside it, cut ones at its ends
])
def test_site_stats_do_not_depend_on_block_order(K, gen, shape):
    """A GPU runs blocks in no fixed order; the forward must sum in an order of its own.
    The emulator runs the blocks in grid order and in shuffled orders: the outputs must be
    the same bits (the former fp32 atomicAdd of the per-sample sums failed this for samples
    spanning three chunks or more), and match float64."""
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3).float()
    n, d, h, w = shape
    assert K.stats_chunks(n, d, h * w) >= 8  # enough chunks for the order to matter
    runs = []
    try:
        for seed in (0, 1, 2, 3):
            K.set_block_order(seed)
            runs.append(cuda_ops.site_stats_cuda(x, kernels=K))
    finally:
        K.set_block_order(0)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
    for o, r in zip(runs[0], reference.site_stats(x.double())):  # sums of up to 600 fp32 terms
        torch.testing.assert_close(o.double(), r, rtol=0, atol=5e-6 * r.abs().max().item())


def test_site_stats_large_mean_keeps_covariance_accuracy(K, gen):
    """|mu| = 1000 sigma: E[xx^T] - mu mu^T in fp32 would lose every digit; the shifted sums keep them."""
    x = (torch.randn(4, 6, 5, 5, generator=gen, dtype=torch.float64) + 1000).float()
    psi, _, _ = cuda_ops.site_stats_cuda(x, kernels=K)
    ref, _, _ = reference.site_stats(x.double())
    torch.testing.assert_close(psi.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_site_stats_backward_partial_outputs(K, gen):
    _stats_case(K, gen, (2, 5, 3, 4), torch.float32, torch.contiguous_format, used=(True, False, False))
    _stats_case(K, gen, (2, 5, 3, 4), torch.float32, torch.channels_last, used=(False, True, True))


@pytest.mark.parametrize("ds", [[5], [64], [70, 130, 64, 3]])
def test_inverse_matches_reference(K, gen, ds):
    mats = [spd(gen, 2, d) for d in ds]
    leaves = [m.clone().requires_grad_() for m in mats]
    outs = cuda_ops.regularized_inverse_cuda(leaves, 1e-3, kernels=K)
    grads = [torch.randn(m.shape, generator=gen) for m in mats]
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    for m, o, g, leaf in zip(mats, outs, grads, leaves):
        m64 = m.double().requires_grad_()
        ref = reference.regularized_inverse(m64, 1e-3)
        (ref * g.double()).sum().backward()
        # the bound: 1e-4 relative in fp32 for beta >= 1e-3 (condition number here ~100)
        torch.testing.assert_close(o.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())
        assert torch.equal(o, o.mT)  # written symmetric
        torch.testing.assert_close(leaf.grad.double(), m64.grad, rtol=0, atol=1e-4 * m64.grad.abs().max().item())


def test_inverse_batch_dims_and_device_beta(K, gen):
    A = spd(gen, 6, 11).reshape(2, 3, 11, 11)
    out = cuda_ops.regularized_inverse_cuda(A, torch.tensor(0.25), kernels=K)
    ref = reference.regularized_inverse(A.double(), 0.25)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_inverse_failure_info_nan_and_error(K, gen):
    good, bad = spd(gen, 2, 9), spd(gen, 2, 70)
    bad[0, 66, 66] = -100.0  # first bad pivot in the second tile
    bad[1, 3, 1] = bad[1, 1, 3] = float("nan")
    with pytest.raises(NotPositiveDefiniteError, match=r"\['b0', 'b1'\]"):
        cuda_ops.regularized_inverse_cuda([good, bad], 0.1, names=["g0", "g1", "b0", "b1"], kernels=K)
    outs, info = cuda_ops.inverse_forward([good, bad], torch.tensor(0.1), K)
    assert info[:2].tolist() == [0, 0]
    assert info[2].item() == torch.linalg.cholesky_ex(bad[0].double() + 0.1 * torch.eye(70)).info.item() == 67
    assert info[3].item() > 0
    assert torch.isnan(outs[1]).all() and torch.isfinite(outs[0]).all()


def _guarded(t: torch.Tensor, pad: int = 64):
    """t's values inside a larger buffer filled with a sentinel, to catch out-of-bounds writes."""
    buf = torch.full((t.numel() + 2 * pad,), -7.25, dtype=t.dtype)
    inner = buf[pad:pad + t.numel()].view(t.shape)
    inner.copy_(t)
    return buf, inner


def _intact(buf, pad: int = 64):
    sentinel = torch.tensor(-7.25, dtype=buf.dtype)
    return bool((buf[:pad] == sentinel).all() and (buf[-pad:] == sentinel).all())


def test_kernels_write_inside_their_buffers(K, gen):
    mats = [spd(gen, 2, 70), spd(gen, 1, 5)]
    plan = cuda_ops.plan_inverse([(2, 70), (1, 5)], K.INVERSE_TILE, K.INVERSE_MAX_GROUPS)
    a = [_guarded(m) for m in mats]
    out = [_guarded(torch.zeros_like(m)) for m in mats]
    work = _guarded(torch.zeros(plan.work_floats))
    info = _guarded(torch.zeros(3, dtype=torch.int32))
    beta = _guarded(torch.tensor([0.1]))
    (groups,) = plan.launches
    K.inverse([a[g.entry][1] for g in groups], [out[g.entry][1] for g in groups], [g.work_offset for g in groups],
              [g.info_offset for g in groups], beta[1].reshape(()), work[1], info[1])
    assert all(_intact(b) for b, _ in a + out + [work, info, beta])
    assert info[1].tolist() == [0, 0, 0]

    x = torch.randn(3, 70, 5, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    xs, lay = cuda_ops.feature_layout(x)
    n, d, hw = lay.n, lay.d, lay.hw
    bufs = [_guarded(torch.zeros(size)) for size in (K.stats_workspace(n, d, hw), n * d, d * d, d, n * d)]
    K.stats_forward(xs, n, d, hw, lay.stride_n, lay.stride_c, lay.stride_p, *(inner for _, inner in bufs))
    dx = _guarded(torch.zeros(x.numel()))
    dx_view = dx[1].as_strided(x.shape, x.stride())
    g = [_guarded(torch.randn(size, generator=gen)) for size in (d * d, d, n * d)]
    K.stats_backward(xs, n, d, hw, lay.stride_n, lay.stride_c, lay.stride_p, bufs[3][1], *(inner for _, inner in g),
                     dx_view)
    assert all(_intact(b) for b, _ in bufs + g + [dx])


def test_launch_recorder_reads_the_grids_and_leaves_the_kernels_running(K, gen):
    """LaunchRecorder (compile report) runs the launchers' host code on meta tensors: the
    forward's Gram grid is (lower tile pairs, the chunks ``stats_chunks`` plans); the
    inverse's launch count is 2·⌈d/tile⌉ + 2. Recording is on only during its calls: the
    emulated kernels sharing the library still compute afterwards."""
    from unidd_fast.kernels.cuda.emulator import LaunchRecorder

    rec = LaunchRecorder(K.lib._name)  # the same loaded library as K
    feat = torch.empty(500, 130, 14, 14, dtype=torch.bfloat16, device="meta", memory_format=torch.channels_last)
    cuda_ops.site_stats_cuda(feat, kernels=rec)
    launches = rec.launches()
    assert [name for name, _, _ in launches] == ["gram_kernel<T>", "mean_kernel<T>", "pooled_kernel<T>", "psi_kernel"]
    tiles = -(-130 // 64)
    assert launches[0][1] == (tiles * (tiles + 1) // 2, K.stats_chunks(500, 130, 196), 1)
    assert rec.launches() == []
    cuda_ops.regularized_inverse_cuda(torch.empty(4, 200, 200, device="meta"), 0.1, check=False, kernels=rec)
    nt = -(-200 // K.INVERSE_TILE)
    inverse = rec.launches()
    assert len(inverse) == 2 * nt + 2 and all(grid[1] == 4 for _, grid, _ in inverse)
    _stats_case(K, gen, (3, 24, 5, 7), torch.float32, torch.contiguous_format)

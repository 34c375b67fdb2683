"""H100 roofline model of the teacher/student networks: PREDICTIONS, nothing measured.

Per leaf layer of a network, FLOPs and HBM bytes of the forward and of the input-gradient
backward; a layer takes max(FLOPs / peak, bytes / bandwidth). ``bench/roofline.py`` builds
the kernel-level model of a ResNet-18 recover step on these; ``unidd-fast plan`` uses the
coarser step totals below for any architecture.
"""
from __future__ import annotations

import math

import torch
import torchvision

PEAK = {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12, "fp64": 67e12}  # H100 SXM dense FLOP/s (fp64: tensor cores)
HBM = 3.35e12  # bytes/s
ELEM = {"bf16": 2, "fp32": 4}
LAUNCH_GAP_S = 1.0e-6  # ASSUMPTION: gap between two kernels of a replayed CUDA graph


def term(flops, peak, nbytes):
    t_c, t_m = flops / peak, nbytes / HBM
    return {"flops": flops, "bytes": nbytes, "t_compute_us": t_c * 1e6, "t_memory_us": t_m * 1e6,
            "predicted_us": max(t_c, t_m) * 1e6, "bound": "compute" if t_c > t_m else "memory"}


def teacher_layers(model, image: int, batch: int, dtype: str, channels: int = 3) -> list[dict]:
    """Per leaf layer of ``model`` at ``batch`` images of image×image: forward and backward
    (input gradients only: the teacher is frozen, the images are the parameters) FLOPs and
    HBM bytes at the activation dtype, and the elements of its output (``out``). Convolutions
    and the classifier on tensor cores; BatchNorm (eval: a per-channel affine), ReLU, pooling
    and the residual additions are memory passes; a max-pool saves int64 indices."""
    e = ELEM[dtype]
    shapes = []

    def hook(module, args, out):
        shapes.append((module, args[0].shape[1:], out.shape[1:]))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, channels, image, image))
    model.train(was_training)
    for h in handles:
        h.remove()
    layers = []
    for module, in_shape, out_shape in shapes:
        n_in, n_out = batch * math.prod(in_shape), batch * math.prod(out_shape)
        kind = type(module).__name__
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops = 2 * n_out * k
            w = module.weight.numel() * e
            fwd, bwd = (flops, n_in * e + n_out * e + w), (flops, n_out * e + w + n_in * e)
        elif isinstance(module, torch.nn.Linear):
            flops = 2 * batch * module.in_features * module.out_features
            w = module.weight.numel() * e
            fwd, bwd = (flops, n_in * e + n_out * 4 + w), (flops, n_out * 4 + w + n_in * e)
        elif isinstance(module, torch.nn.MaxPool2d):
            fwd, bwd = (0, n_in * e + n_out * (e + 8)), (0, n_out * (e + 8) + 2 * n_in * e)
        elif isinstance(module, torch.nn.ReLU):  # backward reads the output as its mask
            fwd, bwd = (0, 2 * n_in * e), (0, 3 * n_in * e)
        else:  # BatchNorm2d (eval), AdaptiveAvgPool2d
            fwd, bwd = (0, (n_in + n_out) * e), (0, (n_in + n_out) * e)
        layers.append({"layer": kind, "fwd": fwd, "bwd": bwd, "out": n_out})
    for module in model.modules():  # residual additions: out += identity, and its gradient fan-in
        last_bn = {torchvision.models.resnet.BasicBlock: "bn2", torchvision.models.resnet.Bottleneck: "bn3"}
        if type(module) in last_bn:
            bn = getattr(module, last_bn[type(module)])
            n = batch * bn.num_features * math.prod(next(o for m, _, o in shapes if m is bn)[1:])
            layers.append({"layer": "residual add", "fwd": (0, 3 * n * e), "bwd": (0, 3 * n * e), "out": n})
    return layers


def _seconds(layers: list[dict], direction: str, peak: float) -> float:
    return sum(max(layer[direction][0] / peak, layer[direction][1] / HBM) for layer in layers)


def step_seconds(model, image: int, channels: int, batch: int, dtype: str, kind: str,
                 sites: list[tuple] = ()) -> float:
    """Predicted H100 seconds of one step at ``batch`` images (coarse: per-layer rooflines
    plus one launch gap per kernel, no overlap):

    - "forward": a forward pass (stats adds the site statistics, ``sites``);
    - "recover": forward + input backward of the frozen teacher, augmentation, Adam + clip
      on fp32 images, and the CFM loss at its memory/GEMM floor on ``sites`` ((d, h, w)
      of every site: one read forward, one read + one write backward, a Gram forward and
      backward each);
    - "train": forward + input backward + weight backward (≈ another backward) and the
      optimizer (squeeze; evaluate adds a teacher forward itself)."""
    layers = teacher_layers(model, image, batch, dtype, channels)
    peak = PEAK["bf16"] if dtype == "bf16" else PEAK["tf32"]
    e = ELEM[dtype]
    fwd, bwd = _seconds(layers, "fwd", peak), _seconds(layers, "bwd", peak)
    site_s = sum(max(2 * batch * h * w * d * d / PEAK["tf32"], batch * d * h * w * e / HBM) for d, h, w in sites)
    kernels = len(layers)
    if kind == "forward":
        return fwd + site_s + (kernels + 3 * len(sites)) * LAUNCH_GAP_S
    if kind == "recover":
        pixels = batch * channels * image * image
        update = pixels * 4 * (4 + 9) / HBM
        return fwd + bwd + update + 3 * site_s + (2 * kernels + 7 + 8 * len(sites)) * LAUNCH_GAP_S
    if kind == "train":
        params = sum(p.numel() for p in model.parameters())
        return fwd + 2 * bwd + params * 4 * 4 / HBM + (3 * kernels + 4) * LAUNCH_GAP_S
    raise ValueError(f"unknown step kind {kind!r}")

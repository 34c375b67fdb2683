"""FLOPs and HBM bytes per leaf layer of a network (the teacher of recover, the student of
evaluate), against the H100 peaks of ``hardware``: PREDICTIONS."""
from __future__ import annotations

import math

import torch
import torchvision

from ..sites import module_calls
from .hardware import ELEM, HBM


def teacher_layers(model, image: int, batch: int, dtype: str, channels: int = 3, calls=None) -> list[dict]:
    """Per leaf layer of ``model`` at ``batch`` images of image×image: forward and backward
    (input gradients only: the teacher is frozen, the images are the parameters) FLOPs and
    HBM bytes at the activation dtype, and the elements of its output (``out``). Convolutions
    and the classifier on tensor cores; BatchNorm (eval: a per-channel affine), ReLU, pooling
    and the residual additions are memory passes; a max-pool saves int64 indices. The layer
    shapes are those of ``calls`` (``sites.module_calls(model, (channels, image, image))``:
    one probe serves every estimate of a model), probed here when not given."""
    e = ELEM[dtype]
    if calls is None:
        calls = module_calls(model, (channels, image, image))
    shapes = [(c.module, c.input, c.output) for c in calls if c.leaf]
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


def pass_seconds(layers: list[dict], direction: str, peak: float) -> float:
    """Seconds of one pass ("fwd" or "bwd") over ``layers``: each layer at its own bound."""
    return sum(max(layer[direction][0] / peak, layer[direction][1] / HBM) for layer in layers)

"""Benchmark geometry: the hook sites of a CIFAR-style ResNet-18 and synthetic real statistics."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

import unidd_fast as uf
from unidd_fast.real_stats import SiteStats


def cifar_resnet18(num_classes: int = 100) -> nn.Module:
    """torchvision ResNet-18 with SRe2L's small-image stem (3×3 conv, no max pool)."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


def site_shapes(model: nn.Module, image_size: int, batch: int = 1) -> dict[str, tuple]:
    """Input shape (n, d, h, w) of every BatchNorm2d of ``model`` for ``batch`` images."""
    shapes = uf.sites.site_input_shapes(model, "bn", (3, image_size, image_size))
    return {name: (batch,) + s for name, s in shapes.items()}


class SiteBank(nn.Module):
    """One identity module per site, so a loss's hooks see given feature maps and nothing else.
    ``site_names`` are the bank's module names ("site0", "site1", ...) in the order of ``shapes``."""

    def __init__(self, shapes: dict[str, tuple]):
        super().__init__()
        self.site_names = [f"site{i}" for i in range(len(shapes))]
        for name in self.site_names:
            self.add_module(name, nn.Identity())
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the bank a device

    def forward(self, feats):
        for name, feat in zip(self.site_names, feats):
            getattr(self, name)(feat)


def random_real_stats(shapes: dict[str, tuple], num_classes: int, model_class: str, gen) -> uf.RealStats:
    """Plausible real statistics (SPD Ψ, non-zero Φ) for every site, in float64."""
    sites = {}
    for name, (_, d, h, w) in shapes.items():
        A = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
        sites[name] = SiteStats(psi=A @ A.T / (2 * d), mu=torch.rand(d, generator=gen, dtype=torch.float64),
                                phi=torch.rand(d, num_classes, generator=gen, dtype=torch.float64) / num_classes,
                                phi_soft=torch.rand(d, num_classes, generator=gen, dtype=torch.float64) / num_classes,
                                count=1000)
    return uf.RealStats(sites, {n: s[1:] for n, s in shapes.items()}, model_class, 1000, num_classes)


def relu_features(shapes: dict[str, tuple], gen, memory_format=torch.contiguous_format) -> list[torch.Tensor]:
    """Post-ReLU-like random feature maps (leaf tensors with grad) of the given shapes."""
    return [torch.relu(torch.randn(s, generator=gen)).contiguous(memory_format=memory_format).requires_grad_(True)
            for s in shapes.values()]

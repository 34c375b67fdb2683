"""Hook sites (docs/math.md#sites): which layers' inputs are matched, and the forward hooks
that capture them."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .errors import ConfigError

SITE_KINDS = ("bn", "conv")
_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's network inside a DataParallel / DistributedDataParallel wrapper: site names
    and the model class recorded in statistics are always those of the unwrapped network."""
    return model.module if isinstance(model, _WRAPPERS) else model


def resolve_sites(model: nn.Module, sites: str | Iterable[str] = "bn") -> list[tuple[str, nn.Module]]:
    """Ordered (name, module) pairs whose *input* is matched.

    "bn": every BatchNorm2d (default); "conv": every Conv2d whose name contains neither
    "downsample" nor "shortcut" (the authors' release); or an explicit list of module names.
    """
    modules = dict(model.named_modules())
    if isinstance(sites, str):
        if sites == "bn":
            found = [(n, m) for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
        elif sites == "conv":
            found = [
                (n, m)
                for n, m in modules.items()
                if isinstance(m, nn.Conv2d) and "downsample" not in n and "shortcut" not in n
            ]
        else:
            raise ConfigError(f"sites must be one of {SITE_KINDS} or a list of module names, got {sites!r}")
    else:
        names = list(sites)
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(f"no module named {missing} in {type(model).__name__}; known names include {list(modules)[1:8]}")
        found = [(n, modules[n]) for n in names]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no {sites!r} sites to match")
    return found


class SiteHooks:
    """Forward pre-hooks on every site calling ``fn(site_name, input_tensor)``."""

    def __init__(self, model: nn.Module, sites, fn: Callable[[str, torch.Tensor], None]):
        self.sites = resolve_sites(model, sites)
        self.names = [name for name, _ in self.sites]
        self._handles = [
            module.register_forward_pre_hook(self._make_hook(name, fn)) for name, module in self.sites
        ]

    @staticmethod
    def _make_hook(name, fn):
        def hook(module, args):
            fn(name, args[0])

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def site_input_shapes(model: nn.Module, sites, input_shape: tuple) -> dict[str, tuple]:
    """{site name: (d, h, w)} of every site's input, in hook order, from one forward of a zero
    image of ``input_shape`` (c, h, w) in eval mode (BatchNorm statistics untouched; the
    model's mode is restored), in the dtype and on the device of the model's parameters."""
    shapes: dict = {}
    param = next(model.parameters())
    with SiteHooks(model, sites, lambda name, feat: shapes.__setitem__(name, tuple(feat.shape[1:]))), torch.no_grad():
        was_training = model.training
        model.eval()(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
        model.train(was_training)
    return shapes

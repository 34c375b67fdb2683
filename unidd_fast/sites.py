"""Hook sites (docs/math.md#sites): which layers' inputs are matched, and the forward hooks
that capture them."""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

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


class Call(NamedTuple):
    """One module call of a shape probe: the module's name and the module, whether it is a leaf
    (no children), and the per-image shapes (batch dimension dropped) of its first positional
    input and of its output (None where that is not a tensor)."""

    name: str
    module: nn.Module
    leaf: bool
    input: tuple | None
    output: tuple | None


def _shape(x) -> tuple | None:
    return tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None


def module_calls(model: nn.Module, input_shape: tuple) -> list[Call]:
    """Every module call of one forward of a zero image of ``input_shape`` (c, h, w), in the
    order the calls begin (a module called twice, like a ResNet block's shared ReLU, appears
    twice): the one shape probe that site shapes (``site_input_shapes``) and per-layer costs
    (``roofline.teacher.teacher_layers``) derive from. Eval mode (BatchNorm statistics
    untouched; the model's mode is restored), no autograd, in the dtype and on the device of the
    model's parameters."""
    calls: list[Call] = []
    open_calls: list[int] = []  # indices of the calls begun and not yet returned (they nest)

    def before(name, module):
        def hook(_, args):
            open_calls.append(len(calls))
            calls.append(Call(name, module, not any(True for _ in module.children()), _shape(args[0]) if args else None,
                              None))
        return hook

    def after(_, args, out):
        i = open_calls.pop()
        calls[i] = calls[i]._replace(output=_shape(out))

    handles = []
    for name, module in model.named_modules():
        handles += [module.register_forward_pre_hook(before(name, module)), module.register_forward_hook(after)]
    param = next(model.parameters())
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls


def site_input_shapes(model: nn.Module, sites, input_shape: tuple, calls: list[Call] | None = None
                      ) -> dict[str, tuple]:
    """{site name: (d, h, w)} of every site's input, in call order, from ``calls`` (those of
    ``module_calls(model, input_shape)``; probed here when not given)."""
    names: dict[nn.Module, list[str]] = {}
    for name, module in resolve_sites(model, sites):
        names.setdefault(module, []).append(name)
    shapes: dict = {}
    for call in calls if calls is not None else module_calls(model, input_shape):
        for name in names.get(call.module, ()):
            shapes[name] = call.input
    return shapes

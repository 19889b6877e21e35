"""Sparsify and desparsify: swap each covered layer's class for a sparse subclass of it, or refuse.

A converted layer stays an instance of its own class (``SparseBatchNorm2d(BatchNorm2d)`` …), so
parameter names, ``isinstance`` checks and extra behaviour (timm's ``BatchNormAct2d`` activation,
MONAI's ``Convolution`` blocks) stay. Layers that mix positions and are not covered make
:func:`sparsify` raise :class:`UnsafeLayerError` before anything is changed.
"""

from __future__ import annotations

import importlib
import re
from typing import Iterable, Sequence

from torch import nn

from ..errors import Spark3dError
from .context import MaskContext
from .layers import (
    SparseAvgPoolMixin, SparseConvMixin, SparseLayer, SparseLayerNormMixin, SparseMaxPoolMixin, SparseNormMixin,
)
from .sync import SYNC_FLAG

__all__ = ["UnsafeLayerError", "sparsify", "desparsify", "is_sparse", "find_unsafe_layers", "set_batchnorm_sync"]


class UnsafeLayerError(Spark3dError, RuntimeError):
    """A layer that mixes positions cannot be made sparse-safe (a user error: the CLI shows it as one message)."""


_CONV_TYPES = (nn.modules.conv._ConvNd,)
_MAXPOOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVGPOOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)

_POSITIONWISE_TYPES: tuple[type, ...] = (
    nn.Identity, nn.Linear, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid,
)
# Modules of these packages are trusted to compose their children position-wise, unless their
# name says they mix positions (attention, transformers, global response norm, …).
_TRUSTED_PACKAGES = ("torch.nn.", "timm.", "monai.", "spark3d.")
_POSITIONWISE_PACKAGES = ("timm.layers.activations", "timm.layers.drop", "timm.layers.layer_scale")
_MIXER_NAME = re.compile(
    r"attention|attn|transformer|sablock|swin|globalresponse|grn|nonlocal|mixer|blurpool|upsample|interpolat",
    re.IGNORECASE,
)


def _kind_of_class(cls: type) -> type | None:
    """The sparse behaviour (mixin) layers of this class need, by class alone."""
    if issubclass(cls, SparseLayer):
        return cls.__mro__[1]
    for types, mixin in (
        (_CONV_TYPES, SparseConvMixin),
        (_MAXPOOL_TYPES, SparseMaxPoolMixin),
        (_AVGPOOL_TYPES, SparseAvgPoolMixin),
        (_NORM_TYPES, SparseNormMixin),
        ((nn.LayerNorm,), SparseLayerNormMixin),
    ):
        if issubclass(cls, types):
            return mixin
    return None


def _kind_of(module: nn.Module) -> type | None:
    """The sparse behaviour a module needs, or None when it is not a covered layer."""
    mixin = _kind_of_class(type(module))
    if mixin is SparseLayerNormMixin and len(module.normalized_shape) != 1:
        return None  # LayerNorm over several axes mixes positions
    return mixin


def _refusal(module: nn.Module, trusted: tuple[type, ...]) -> str | None:
    """Why a module that is not converted cannot be trusted, or None when it is harmless."""
    cls = type(module)
    if trusted and isinstance(module, trusted):
        return None
    if getattr(module, "global_resp_norm", False) is True or getattr(module, "grn", False) is True:
        return "global response normalisation mixes all positions"
    if isinstance(module, nn.LayerNorm):
        return f"LayerNorm over {tuple(module.normalized_shape)} mixes positions (only LayerNorm over channels is covered)"
    if isinstance(module, nn.MultiheadAttention) or _MIXER_NAME.search(cls.__name__):
        return "mixes positions (attention / transformer / resampling) and has no sparse version"
    has_children = next(module.children(), None) is not None
    if not has_children:
        if isinstance(module, _POSITIONWISE_TYPES) or cls.__module__.startswith(_POSITIONWISE_PACKAGES):
            return None
        return "unknown layer type; it may mix positions"
    if cls.__module__.startswith(_TRUSTED_PACKAGES):
        return None
    return "custom block whose forward may mix positions"


def _sparse_class(cls: type, mixin: type) -> type:
    """The generated ``Sparse<Name>(mixin, cls)`` class, created once per dense class.

    Its ``__qualname__`` encodes the dense class's import path, and this module's ``__getattr__``
    rebuilds it from that name, so converted networks pickle (``torch.save``, spawned processes).
    """
    cached = _SPARSE_CLASSES.get(cls)
    if cached is None:
        qualname = f"Sparse__{cls.__module__.replace('.', '__')}___{cls.__qualname__}"
        cached = type(f"Sparse{cls.__name__}", (mixin, cls),
                      {"_dense_class": cls, "__module__": __name__, "__qualname__": qualname})
        _SPARSE_CLASSES[cls] = cached
    return cached


def __getattr__(name: str) -> type:
    """Rebuild a generated sparse class from its pickled name (see :func:`_sparse_class`)."""
    if not name.startswith("Sparse__") or "___" not in name:
        raise AttributeError(name)
    module_part, cls_name = name[len("Sparse__"):].split("___", 1)
    dense = getattr(importlib.import_module(module_part.replace("__", ".")), cls_name)
    mixin = _kind_of_class(dense)
    if mixin is None:
        raise AttributeError(name)
    return _sparse_class(dense, mixin)


_SPARSE_CLASSES: dict[type, type] = {}  # a cache of generated classes, one per dense class


def _is_channels_first_layernorm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return name.endswith(("1d", "2d", "3d")) or getattr(module, "data_format", "") == "channels_first"


def find_unsafe_layers(
    network: nn.Module, only: Iterable[str] | None = None, trusted: Sequence[type] = ()
) -> list[tuple[str, str, str]]:
    """``(path, type, reason)`` of every module that cannot be made sparse-safe."""
    only = None if only is None else set(only)
    trusted = tuple(trusted)
    problems = []
    for path, module in network.named_modules():
        if only is not None and path not in only:
            continue
        if _kind_of(module) is not None:
            continue
        reason = _refusal(module, trusted)
        if reason is not None:
            problems.append((path or "<root>", f"{type(module).__module__}.{type(module).__qualname__}", reason))
    return problems


def sparsify(
    network: nn.Module,
    ctx: MaskContext,
    only: Iterable[str] | None = None,
    trusted: Sequence[type] = (),
) -> list[str]:
    """Convert ``network`` in place to read its mask from ``ctx``; returns the converted module paths.

    ``only`` limits conversion and checks to these module paths (the modules that take part in
    encoding). ``trusted`` lists extra block classes known to compose their children position-wise.
    Raises :class:`UnsafeLayerError` naming every layer it cannot make safe, before changing anything.
    """
    only = None if only is None else set(only)
    problems = find_unsafe_layers(network, only, trusted)
    if problems:
        lines = "\n".join(f"  - {path} ({typ}): {reason}" for path, typ, reason in problems)
        raise UnsafeLayerError(
            "cannot make this network sparse-safe; these layers mix positions and are not covered:\n"
            f"{lines}\nReplace them, or pass their classes in `trusted=` if they only compose covered layers."
        )
    converted = []
    for path, module in network.named_modules():
        if only is not None and path not in only:
            continue
        mixin = _kind_of(module)
        if mixin is None:
            continue
        if not isinstance(module, SparseLayer):
            dense_cls = type(module)
            module.__class__ = _sparse_class(dense_cls, mixin)
            if mixin is SparseLayerNormMixin:
                module._channels_first = _is_channels_first_layernorm(module)
        module._sparse_ctx = ctx
        converted.append(path)
    return converted


def desparsify(network: nn.Module) -> nn.Module:
    """Restore every converted layer of ``network`` to its dense class, in place."""
    for module in network.modules():
        if isinstance(module, SparseLayer):
            module.__class__ = module._dense_class
            for attr in ("_sparse_ctx", "_channels_first", SYNC_FLAG):
                module.__dict__.pop(attr, None)
    return network


def is_sparse(module: nn.Module) -> bool:
    """Whether ``module`` is a converted (sparse) layer."""
    return isinstance(module, SparseLayer)


def set_batchnorm_sync(network: nn.Module, enabled: bool = True) -> int:
    """Mark every converted BatchNorm of ``network`` to sum its statistics over DDP processes.

    Works on CPU (gloo) and GPU alike, unlike ``torch.nn.SyncBatchNorm`` which DDP accepts on GPUs only.
    Returns the number of layers marked.
    """
    count = 0
    for module in network.modules():
        if isinstance(module, SparseLayer) and isinstance(module, nn.modules.batchnorm._BatchNorm):
            setattr(module, SYNC_FLAG, enabled)
            count += 1
    return count

"""Make a dense network act as a submanifold sparse network under a mask.

The mask reaches the layers through a :class:`MaskContext` owned by the model (no global state).
:func:`sparsify` swaps the class of every covered layer for a subclass of its own class
(``SparseBatchNorm2d(BatchNorm2d)`` …), so parameter names, ``isinstance`` checks and any extra
behaviour of the layer (timm's ``BatchNormAct2d`` activation, MONAI's ``Convolution`` blocks) stay.

- spatial operators (convs, pools) read and write visible sites only: their input and output are
  masked at their own resolution (max pools ignore masked sites, average pools take visible means);
- normalisations see visible sites only: the visible sites of each sample are packed into a
  ``(B, C, K, 1, …)`` tensor, the layer's *own* forward runs on it, and the result is scattered back;
- masked sites are exactly zero after every converted layer.

With no mask set in the context every converted layer computes exactly what the dense layer does.
Layers that mix positions and are not covered make :func:`sparsify` raise :class:`UnsafeLayerError`.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .masking import upsample_mask

__all__ = [
    "MaskContext",
    "UnsafeLayerError",
    "sparsify",
    "desparsify",
    "is_sparse",
    "find_unsafe_layers",
    "set_batchnorm_sync",
]


class UnsafeLayerError(RuntimeError):
    """A layer that mixes positions cannot be made sparse-safe."""


class MaskContext:
    """The current mask of one model, and its per-resolution views (cached per mask).

    Sparse layers ask it for the mask at their feature size; ``None`` as mask means dense mode.
    """

    def __init__(self) -> None:
        self._mask_b1g: torch.Tensor | None = None
        self._visible_cells = 0
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask_b1g

    @property
    def spatial_dims(self) -> int | None:
        return None if self._mask_b1g is None else self._mask_b1g.ndim - 2

    def set(self, mask_b1g: torch.Tensor | None) -> None:
        """Make ``mask_b1g`` current (``None``: dense mode). Setting the current mask again keeps the cache."""
        if mask_b1g is self._mask_b1g:
            return
        self._visible_cells = 0
        if mask_b1g is not None:
            if mask_b1g.dtype != torch.bool or mask_b1g.ndim < 3 or mask_b1g.shape[1] != 1:
                raise ValueError(f"mask must be a bool tensor (B, 1, *grid), got {mask_b1g.dtype} {tuple(mask_b1g.shape)}")
            counts = mask_b1g.flatten(1).sum(1).tolist()  # the one host sync per mask
            if any(c != counts[0] for c in counts):
                raise ValueError("every sample of a mask must have the same number of visible cells")
            self._visible_cells = int(counts[0])
        self._mask_b1g = mask_b1g
        self._cache = {}

    @contextlib.contextmanager
    def use(self, mask_b1g: torch.Tensor | None) -> Iterator[None]:
        """Set the mask for the duration of a ``with`` block, then restore the previous one."""
        previous = self._mask_b1g
        self.set(mask_b1g)
        try:
            yield
        finally:
            self.set(previous)

    def applies_to(self, size: Sequence[int]) -> bool:
        """Whether a tensor of this spatial size is a feature map under the mask (not a pooled vector)."""
        return self._mask_b1g is not None and len(size) == self._mask_b1g.ndim - 2 and math.prod(size) > 1

    def mask_at(self, size: Sequence[int]) -> torch.Tensor:
        """Bool mask ``(B, 1, *size)``: the mask upsampled to a feature map of this size."""
        key = ("bool", tuple(size))
        if key not in self._cache:
            self._cache[key] = upsample_mask(self._mask_b1g, size)
        return self._cache[key]

    def weights_at(self, size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The mask at this size as 0/1 values of ``dtype``, for multiplication."""
        key = ("weights", tuple(size), dtype)
        if key not in self._cache:
            self._cache[key] = self.mask_at(size).to(dtype)
        return self._cache[key]

    def visible_index(self, size: Sequence[int]) -> torch.Tensor:
        """Flat indices ``(B, 1, K)`` of the visible sites of each sample at this size, in raster order."""
        key = ("index", tuple(size))
        if key not in self._cache:
            mask_bn = self.mask_at(size).flatten(1)
            k = self._visible_cells * (mask_bn.shape[1] // self._mask_b1g[0].numel())
            order_bn = torch.sort((~mask_bn).to(torch.uint8), dim=1, stable=True).indices
            self._cache[key] = order_bn[:, None, :k]
        return self._cache[key]


# --------------------------------------------------------------------------------------------
# Sparse layer behaviours (mixins placed before the original class in a generated subclass)
# --------------------------------------------------------------------------------------------


class SparseLayer:
    """Marker base of converted layers; ``_sparse_ctx`` is the owning model's :class:`MaskContext`."""

    _sparse_ctx: MaskContext
    _dense_class: type

    def _mask_active(self, x: torch.Tensor) -> bool:
        ctx = getattr(self, "_sparse_ctx", None)
        return ctx is not None and ctx.applies_to(x.shape[2:])

    def _zero_masked(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._sparse_ctx.weights_at(y.shape[2:], y.dtype)


class SparseConvMixin(SparseLayer):
    """Convolution reading and writing visible sites only."""

    def forward(self, x, *args, **kwargs):
        if not self._mask_active(x):
            return super().forward(x, *args, **kwargs)
        y = super().forward(self._zero_masked(x), *args, **kwargs)
        return self._zero_masked(y) if self._sparse_ctx.applies_to(y.shape[2:]) else y


class SparseMaxPoolMixin(SparseLayer):
    """Max pooling over visible sites only (masked sites never win)."""

    def forward(self, x):
        if not self._mask_active(x):
            return super().forward(x)
        lowest = torch.finfo(x.dtype).min
        y = super().forward(x.masked_fill(~self._sparse_ctx.mask_at(x.shape[2:]), lowest))
        if self._sparse_ctx.applies_to(y.shape[2:]):
            return torch.where(self._sparse_ctx.mask_at(y.shape[2:]), y, 0.0)
        return y


class SparseAvgPoolMixin(SparseLayer):
    """Average pooling as the mean over visible sites (equal to the dense pool when all are visible)."""

    def forward(self, x):
        if not self._mask_active(x):
            return super().forward(x)
        w = self._sparse_ctx.weights_at(x.shape[2:], x.dtype)
        summed = super().forward(x * w)
        visible_fraction = super().forward(w) / super().forward(torch.ones_like(w))
        y = summed / visible_fraction.clamp_min(1e-12)
        if self._sparse_ctx.applies_to(y.shape[2:]):
            return self._zero_masked(y)
        return y


class SparseNormMixin(SparseLayer):
    """Normalisation over visible sites: pack them, run the layer's own forward, scatter back."""

    def forward(self, x):
        if not self._mask_active(x):
            if _needs_cross_process_sync(self):
                return _synced_batch_norm(self, x)
            return super().forward(x)
        b, c = x.shape[:2]
        idx_b1k = self._sparse_ctx.visible_index(x.shape[2:])
        idx_bck = idx_b1k.expand(b, c, -1)
        packed = x.reshape(b, c, -1).gather(2, idx_bck)
        packed = packed.view(b, c, packed.shape[2], *([1] * (x.ndim - 3)))
        if _needs_cross_process_sync(self):
            y_packed = _synced_batch_norm(self, packed)
        else:
            y_packed = super().forward(packed)
        out = x.new_zeros(b, y_packed.shape[1], math.prod(x.shape[2:]), dtype=y_packed.dtype)
        out = out.scatter(2, idx_b1k.expand(b, y_packed.shape[1], -1), y_packed.reshape(b, y_packed.shape[1], -1))
        return out.view(b, y_packed.shape[1], *x.shape[2:])


def _process_group(layer: nn.Module):
    return getattr(layer, "process_group", None) or torch.distributed.group.WORLD


def _needs_cross_process_sync(layer: nn.Module) -> bool:
    """Batch statistics must be summed over processes: a SyncBatchNorm, or a BatchNorm marked for sync."""
    return (
        (isinstance(layer, nn.SyncBatchNorm) or getattr(layer, "_sync_stats", False))
        and layer.training
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size(_process_group(layer)) > 1
    )


def set_batchnorm_sync(network: nn.Module, enabled: bool = True) -> int:
    """Mark every converted BatchNorm of ``network`` to sum its statistics over DDP processes.

    Works on CPU (gloo) and GPU alike, unlike ``torch.nn.SyncBatchNorm`` which DDP accepts on GPUs only.
    Returns the number of layers marked.
    """
    count = 0
    for module in network.modules():
        if isinstance(module, SparseLayer) and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module._sync_stats = enabled
            count += 1
    return count


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the gradients over processes too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _synced_batch_norm(layer: nn.SyncBatchNorm, packed: torch.Tensor) -> torch.Tensor:
    """Batch norm of packed visible sites with statistics summed over all processes (any device, gloo too).

    torch's own SyncBatchNorm runs on GPUs only; this keeps the same semantics: the mean and biased
    variance over every visible site of every process normalise, the unbiased variance updates the
    running statistics, and gradients flow through the all-reduce.
    """
    c = packed.shape[1]
    v_cn = packed.transpose(0, 1).reshape(c, -1).float()
    count = torch.full((1,), float(v_cn.shape[1]), device=v_cn.device)
    stats = torch.cat([v_cn.sum(1), v_cn.pow(2).sum(1), count])
    stats = _AllReduceSum.apply(stats, _process_group(layer))
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c : 2 * c] / n - mean.pow(2)).clamp_min(0.0)
    if layer.track_running_stats:
        with torch.no_grad():
            layer.num_batches_tracked.add_(1)
            momentum = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
            layer.running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(layer.running_mean.dtype))
            unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
            layer.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(layer.running_var.dtype))
    shape = (1, c) + (1,) * (packed.ndim - 2)
    y = (packed - mean.view(shape).to(packed.dtype)) / (var.view(shape) + layer.eps).sqrt().to(packed.dtype)
    if layer.affine:
        y = y * layer.weight.view(shape) + layer.bias.view(shape)
    for extra in ("drop", "act"):  # timm's SyncBatchNormAct: BN, then dropout and activation
        fn = getattr(layer, extra, None)
        if isinstance(fn, nn.Module):
            y = fn(y)
    return y


class SparseLayerNormMixin(SparseLayer):
    """LayerNorm over channels (a per-site op): the layer's own forward, then masked sites to zero."""

    _channels_first: bool = False

    def forward(self, x):
        y = super().forward(x)
        ctx = getattr(self, "_sparse_ctx", None)
        if ctx is None or ctx.mask is None:
            return y
        size = y.shape[2:] if self._channels_first else y.shape[1:-1]
        if not ctx.applies_to(size):
            return y
        w = ctx.weights_at(size, y.dtype)
        return y * (w if self._channels_first else w.movedim(1, -1))


# --------------------------------------------------------------------------------------------
# Which layers are covered, harmless, or refused
# --------------------------------------------------------------------------------------------

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
    import importlib

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
            module.__dict__.pop("_sparse_ctx", None)
            module.__dict__.pop("_channels_first", None)
            module.__dict__.pop("_sync_stats", None)
    return network


def is_sparse(module: nn.Module) -> bool:
    return isinstance(module, SparseLayer)

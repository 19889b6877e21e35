"""Behaviours of covered layers under a mask: spatial operators, normalisations, channel LayerNorm.

Each behaviour is a mixin placed before the original class in a generated subclass (see
:mod:`spark3d.sparse.convert`), so the layer's own ``forward`` still does the work:

- spatial operators (convs, pools) read and write visible sites only: their input and output are
  masked at their own resolution (max pools ignore masked sites, average pools take visible means);
- normalisations see visible sites only: the visible sites of each sample are packed into a
  ``(B, C, K, 1, …)`` tensor, the layer's *own* forward runs on it, and the result is scattered back;
- masked sites are exactly zero after every converted layer;
- a block that pools globally by itself (squeeze-excitation's ``x.mean((2, 3))``) runs under a function
  mode that turns a global mean / max over a masked map into the mean / max over its visible sites.

With no mask set in the context every converted layer computes exactly what the dense layer does.
"""

from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode

from .compute import packed_forward
from .pools import visible_global_pool
from .context import MaskContext
from .sync import needs_cross_process_sync, synced_batch_norm

__all__ = [
    "SparseLayer", "SparseConvMixin", "SparseMaxPoolMixin", "SparseAvgPoolMixin", "SparseNormMixin",
    "SparseLayerNormMixin", "SparseGlobalPoolMixin", "VisibleGlobalPooling", "match_global_pool",
]


class SparseLayer:
    """Marker base of converted layers; ``_sparse_ctx`` is the owning model's :class:`MaskContext`."""

    _sparse_ctx: MaskContext
    _dense_class: type

    def _mask_active(self, x: torch.Tensor) -> bool:
        ctx = getattr(self, "_sparse_ctx", None)
        return ctx is not None and ctx.applies_to(x.shape[2:])

    def _zero_masked(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._sparse_ctx.weights_at(y.shape[2:], y.dtype)

    def _packed(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a packed map of the sparse-compute path (:mod:`spark3d.sparse.compute` runs the layer)."""
        ctx = getattr(self, "_sparse_ctx", None)
        layout = getattr(ctx, "layout", None)
        return layout is not None and layout.holds(x)


class SparseConvMixin(SparseLayer):
    """Convolution reading and writing visible sites only."""

    def forward(self, x, *args, **kwargs):
        if self._packed(x):  # sparse compute: packed visible cells
            return packed_forward(self, x, *args, **kwargs)
        if not self._mask_active(x):
            return super().forward(x, *args, **kwargs)
        y = super().forward(self._zero_masked(x), *args, **kwargs)
        return self._zero_masked(y) if self._sparse_ctx.applies_to(y.shape[2:]) else y


class SparseMaxPoolMixin(SparseLayer):
    """Max pooling over visible sites only (masked sites never win)."""

    def forward(self, x):
        if self._packed(x):  # sparse compute: packed visible cells
            return packed_forward(self, x)
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
        if self._packed(x):  # sparse compute: packed visible cells
            return packed_forward(self, x)
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
        if self._packed(x):  # sparse compute: packed visible cells
            return packed_forward(self, x)
        if not self._mask_active(x):
            if needs_cross_process_sync(self):
                return synced_batch_norm(self, x)
            return super().forward(x)
        b, c = x.shape[:2]
        idx_b1k = self._sparse_ctx.visible_index(x.shape[2:])
        idx_bck = idx_b1k.expand(b, c, -1)
        packed = x.reshape(b, c, -1).gather(2, idx_bck)
        packed = packed.view(b, c, packed.shape[2], *([1] * (x.ndim - 3)))
        if needs_cross_process_sync(self):
            y_packed = synced_batch_norm(self, packed)
        else:
            y_packed = super().forward(packed)
        out = x.new_zeros(b, y_packed.shape[1], math.prod(x.shape[2:]), dtype=y_packed.dtype)
        out = out.scatter(2, idx_b1k.expand(b, y_packed.shape[1], -1), y_packed.reshape(b, y_packed.shape[1], -1))
        return out.view(b, y_packed.shape[1], *x.shape[2:])


class SparseLayerNormMixin(SparseLayer):
    """LayerNorm over channels (a per-site op): the layer's own forward, then masked sites to zero."""

    _channels_first: bool = False

    def forward(self, x):
        if self._packed(x):  # sparse compute: packed visible cells
            return packed_forward(self, x)
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
# functional global pooling (squeeze-excitation): made exact by a function mode, scoped to the
# block that calls it. Kept apart from the covered layers above.
# --------------------------------------------------------------------------------------------

_GLOBAL_KINDS = {"mean": "mean", "amax": "max", "adaptive_avg_pool1d": "mean", "adaptive_avg_pool2d": "mean",
                 "adaptive_avg_pool3d": "mean", "adaptive_max_pool1d": "max", "adaptive_max_pool2d": "max",
                 "adaptive_max_pool3d": "max"}


def match_global_pool(func, args: tuple, kwargs: dict) -> tuple[str, torch.Tensor, bool, torch.dtype | None] | None:
    """``(kind, x, keepdim, dtype)`` when a call pools ``x (B, C, *S)`` over every spatial axis, else None.

    Recognised: ``x.mean(dims)`` / ``torch.mean``, ``x.amax(dims)``, and adaptive average / max pooling to
    size 1, where ``dims`` are exactly the spatial axes ``2 … ndim-1`` (kind ``"mean"`` or ``"max"``).
    """
    kind = _GLOBAL_KINDS.get(getattr(func, "__name__", ""))
    if kind is None or not args or not isinstance(args[0], torch.Tensor) or args[0].ndim < 3:
        return None
    x = args[0]
    if func.__name__ in ("mean", "amax"):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if dim is None:
            return None
        dims = {d % x.ndim for d in ((dim,) if isinstance(dim, int) else dim)}
        if dims != set(range(2, x.ndim)):
            return None
        keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        return kind, x, keepdim, kwargs.get("dtype")
    size = args[1] if len(args) > 1 else kwargs.get("output_size")
    sizes = (size,) if isinstance(size, int) else tuple(size or ())
    if any(s != 1 for s in sizes) or kwargs.get("return_indices") or (len(args) > 2 and args[2]):
        return None
    return kind, x, True, None


class VisibleGlobalPooling(TorchFunctionMode):
    """While active, a global mean or max over the spatial axes of a masked feature map uses visible sites only."""

    def __init__(self, ctx: MaskContext) -> None:
        super().__init__()
        self.ctx = ctx

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = match_global_pool(func, args, kwargs)
        layout = getattr(self.ctx, "layout", None)
        if call is None or not (self.ctx.applies_to(call[1].shape[2:]) or (layout is not None and layout.holds(call[1]))):
            return func(*args, **kwargs)
        kind, x, keepdim, dtype = call
        x = x if dtype is None else x.to(dtype)
        layout = getattr(self.ctx, "layout", None)
        if layout is not None and layout.holds(x):  # packed cells: each sample's visible sites, repeated per cell
            return visible_global_pool(layout, x, kind, keepdim)
        dims = tuple(range(2, x.ndim))
        if kind == "max":
            visible = self.ctx.mask_at(x.shape[2:])
            return x.masked_fill(~visible, float("-inf")).amax(dims, keepdim=keepdim)
        w = self.ctx.weights_at(x.shape[2:], x.dtype)
        return (x * w).sum(dims, keepdim=keepdim) / w.sum(dims, keepdim=keepdim).clamp_min(1.0)


class SparseGlobalPoolMixin(SparseLayer):
    """A block that pools globally itself (``x.mean((2, 3))``): its forward runs under :class:`VisibleGlobalPooling`."""

    def forward(self, *args, **kwargs):
        ctx = getattr(self, "_sparse_ctx", None)
        if ctx is None or ctx.mask is None:
            return super().forward(*args, **kwargs)
        with VisibleGlobalPooling(ctx):
            return super().forward(*args, **kwargs)

"""Random draws on packed maps, made exactly as masked-dense makes them (stochastic depth, dropout).

On the packed layout a map is ``(N = B·K, C, *cell)``. A per-sample draw written for ``(B, 1, …)``
(timm's and MONAI's ``drop_path``: ``x.new_empty((x.shape[0], 1, …)).bernoulli_(keep)``) would draw ``N``
values, one per cell: another random decision than masked-dense's, and one that a check on weights with
zero residual branches cannot see. :class:`PackedRandomness`, active while packed cells flow, makes
every such draw the masked-dense one:

- a draw shaped ``(N, 1, …, 1)`` or ``(N, C)`` (per sample, or a per-sample vector): the ``(B, …)`` draw,
  each sample's value repeated for its ``K`` cells;
- element-wise dropout of a packed map: the mask drawn on the dense ``(B, C, *S)`` map, then packed;
- channel dropout (``dropout1d/2d/3d``): the ``(B, C, 1, …)`` draw, repeated per cell.

The same torch seed therefore gives the same features on both paths. Other random ops pass through
unchanged; the one-time exactness check (train mode, one seed) is what catches those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["PackedRandomness"]


def _per_sample(layout, t: torch.Tensor) -> bool:
    """A tensor with one row per packed cell and nothing spatial: per-sample values repeated per cell."""
    return t.ndim >= 1 and t.shape[0] == layout.n and (t.ndim == 2 or all(s == 1 for s in t.shape[1:]))


def _cell_map(layout, t: torch.Tensor) -> bool:
    return layout.holds(t) and not all(s == 1 for s in t.shape[1:])


def _repeat(layout, sample_values: torch.Tensor) -> torch.Tensor:
    return sample_values.repeat_interleave(layout.visible, dim=0)


def _dense_shape(layout, t: torch.Tensor) -> tuple[int, ...]:
    return (layout.batch, t.shape[1], *[g * c for g, c in zip(layout.grid, t.shape[2:])])


def _bernoulli_(layout, args: tuple, kwargs: dict):
    self = args[0]
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    gen = kwargs.get("generator")
    if _per_sample(layout, self) and not self.requires_grad:
        draw = self.new_empty((layout.batch, *self.shape[1:])).bernoulli_(p, generator=gen)
        return self.copy_(_repeat(layout, draw))
    if _cell_map(layout, self) and not isinstance(p, torch.Tensor) and not self.requires_grad:
        draw = self.new_empty(_dense_shape(layout, self)).bernoulli_(p, generator=gen)
        return self.copy_(layout.pack(draw))
    return NotImplemented


def _dropout(layout, func, args: tuple, kwargs: dict):
    names = ("input", "p", "training", "inplace")
    call = {**dict(zip(names, args)), **kwargs}
    x, p = call["input"], float(call.get("p", 0.5))
    if not call.get("training", True) or p == 0.0:
        return NotImplemented
    channel = func is not F.dropout
    if _per_sample(layout, x) and x.ndim == 2 and not channel:
        keep = F.dropout(x.new_ones(layout.batch, x.shape[1]), p, True)
    elif _cell_map(layout, x) and not channel:
        keep = layout.pack(F.dropout(x.new_ones(_dense_shape(layout, x)), p, True))
    elif layout.holds(x) and channel and x.ndim == 2 + layout.spatial_dims:
        keep = _repeat(layout, func(x.new_ones(layout.batch, x.shape[1], *([1] * layout.spatial_dims)), p, True))
    else:
        return NotImplemented
    return x.mul_(keep) if call.get("inplace") else x * keep


_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}


class PackedRandomness(TorchFunctionMode):
    """While active, per-sample and per-site random draws on packed maps are the masked-dense draws (see module docs)."""

    def __init__(self, layout) -> None:
        super().__init__()
        self.layout = layout

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = NotImplemented
        if func is torch.Tensor.bernoulli_:
            out = _bernoulli_(self.layout, args, kwargs)
        elif func in _DROPOUTS:
            out = _dropout(self.layout, func, args, kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


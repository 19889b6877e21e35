"""How a conv or pool window maps a packed cell to its output cell (halo, output cell, taps), and when it cannot."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["ConvGeometry", "conv_geometry", "window_geometry", "padding_pairs", "pad_pairs_of"]


class ConvGeometry:
    """How a conv or pool window maps a packed cell to its output cell: halo, output cell, kernel taps."""

    def __init__(self, kernel, stride, padding, dilation, cell_in) -> None:
        self.kernel, self.stride, self.dilation = tuple(kernel), tuple(stride), tuple(dilation)
        self.cell_in = tuple(cell_in)
        self.cell_out = tuple(c // s for c, s in zip(cell_in, stride))
        self.lo = tuple(lo for lo, _ in padding)
        # last input site read by the cell's last output, relative to the cell's end (may be negative)
        self.hi = tuple(d * (k - 1) - p - s + 1 for k, s, (p, _), d in zip(kernel, stride, padding, dilation))

    @property
    def needs_halo(self) -> bool:
        return any(v > 0 for v in self.lo + self.hi)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """Drop trailing input sites no output reads (negative ``hi``)."""
        for a, h in enumerate(self.hi):
            if h < 0:
                x = x.narrow(2 + a, 0, x.shape[2 + a] + h)
        return x

    def halo_ratio(self) -> float:
        """Volume of a halo-padded input block over the cell's volume."""
        return math.prod((c + lo + max(h, 0)) / c for c, lo, h in zip(self.cell_in, self.lo, self.hi))


def padding_pairs(padding, kernel, dilation, stride) -> list[tuple[int, int]] | None:
    """``(before, after)`` zero padding per axis of a conv/pool, or None when it is not plain."""
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * nd
        if padding == "same" and all(s == 1 for s in stride):
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return [(t // 2, t - t // 2) for t in totals]
        return None
    pads = (padding,) * nd if isinstance(padding, int) else tuple(padding)
    return [(int(p), int(p)) for p in pads]


def pad_pairs_of(pad: Sequence[int], nd: int) -> list[tuple[int, int]] | None:
    """``F.pad``'s flat ``(last_before, last_after, …)`` as ``(before, after)`` per spatial axis (None if not spatial)."""
    pad = [int(p) for p in pad]
    if len(pad) % 2 or len(pad) > 2 * nd:
        return None
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)][::-1]  # first spatial axis first
    return [(0, 0)] * (nd - len(pairs)) + pairs


def window_geometry(kernel, stride, pads, dilation, cell: Sequence[int], grid: Sequence[int],
                    ceil_mode: bool = False) -> ConvGeometry | None:
    """The packed geometry of a window op with these parameters on cells of ``cell``, or None when its output
    is not cell-aligned (the dense output does not line up with the mask grid)."""
    nd = len(cell)
    tup = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)  # noqa: E731
    kernel, stride, dilation = tup(kernel), tup(stride), tup(dilation)
    if pads is None or any(c % s for c, s in zip(cell, stride)) or any(lo < 0 or hi < 0 for lo, hi in pads):
        return None
    geo = ConvGeometry(kernel, stride, pads, dilation, cell)
    for g, c_in, c_out, k, s, (p0, p1), d in zip(grid, cell, geo.cell_out, kernel, stride, pads, dilation):
        span = g * c_in + p0 + p1 - d * (k - 1) - 1
        dense_out = (span + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (dense_out - 1) * s >= g * c_in + p0:
            dense_out -= 1  # torch: the last window must start inside the input or its left padding
        if dense_out != g * c_out or c_out < 1:
            return None
    return geo


def conv_geometry(layer: nn.Module, x_ncs: torch.Tensor, grid: Sequence[int]) -> ConvGeometry | None:
    """The packed geometry of a conv / pool layer on ``x``, or None when its output is not cell-aligned."""
    nd = x_ncs.ndim - 2
    tup = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)  # noqa: E731
    kernel, dilation = tup(layer.kernel_size), tup(getattr(layer, "dilation", 1))
    stride = tup(layer.stride if layer.stride is not None else layer.kernel_size)
    pads = padding_pairs(layer.padding, kernel, dilation, stride)
    return window_geometry(kernel, stride, pads, dilation, tuple(x_ncs.shape[2:]), grid,
                           bool(getattr(layer, "ceil_mode", False)))

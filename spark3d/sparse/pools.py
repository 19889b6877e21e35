"""Pools and norms on packed cells: max and average pools (halo blocks), global pools, per-sample norms.

Each returns ``(output, strategy, why)``; output ``None`` means the layer cannot take packed cells and
runs masked-dense on the unpacked map (``why`` says why, for the plan).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import conv_geometry
from .packed import PackedLayout, channels_last
from .sync import needs_cross_process_sync, synced_batch_norm

__all__ = ["packed_max_pool", "packed_avg_pool", "packed_global_pool", "packed_norm", "ADAPTIVE", "visible_global_pool"]

_MAXPOOL_FORWARDS = {nn.MaxPool1d.forward, nn.MaxPool2d.forward, nn.MaxPool3d.forward}
_AVGPOOL_FORWARDS = {nn.AvgPool1d.forward, nn.AvgPool2d.forward, nn.AvgPool3d.forward}
ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ADAPTIVE_FORWARDS = {cls.forward for cls in ADAPTIVE}
_OWN_FORWARD = "its class has a forward of its own (not torch's), so spark3d does not know which op it replaces"
_UNALIGNED = "its output is not aligned with the mask grid (a window or stride that does not divide the cell)"


def packed_max_pool(layer: nn.Module, x: torch.Tensor, layout: PackedLayout):
    """Max pool: halo-padded blocks filled with the lowest value where masked, then a valid pool."""
    if layer._dense_class.forward not in _MAXPOOL_FORWARDS:
        return None, "dense", _OWN_FORWARD
    if layer.return_indices:
        return None, "dense", "it returns indices (positions of the dense map)"
    geo = conv_geometry(layer, x, layout.grid)
    if geo is None:
        return None, "dense", _UNALIGNED
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[layout.spatial_dims]
    lowest = torch.finfo(x.dtype).min
    block = geo.crop(layout.halo(x, geo.lo, geo.hi, fill=lowest)) if geo.needs_halo else geo.crop(x)
    return channels_last(pool(block, geo.kernel, geo.stride, 0, geo.dilation)), \
        ("blocks" if geo.needs_halo else "direct"), ""


def _in_bounds(layer: nn.Module, layout: PackedLayout, cell: tuple) -> torch.Tensor:
    """``(N, 1, *cell_out)``: per output site, the in-bounds share of its window (the dense pool of ones)."""

    def make():
        size = [g * c for g, c in zip(layout.grid, cell)]
        ones = torch.ones(1, 1, *size, device=layout.device, dtype=torch.float64)
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[layout.spatial_dims]
        share = pool(ones, layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode, True)
        return layout.pack(share.expand(layout.batch, *share.shape[1:]))

    return layout.table(("avgpool-in-bounds", repr((layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode)),
                         tuple(cell)), make)


def packed_avg_pool(layer: nn.Module, x: torch.Tensor, layout: PackedLayout):
    """Average pool as masked-dense computes it (the visible mean, scaled as the layer's divisor scales it)."""
    if layer._dense_class.forward not in _AVGPOOL_FORWARDS:
        return None, "dense", _OWN_FORWARD
    geo = conv_geometry(layer, x, layout.grid)
    if geo is None:
        return None, "dense", _UNALIGNED
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[layout.spatial_dims]
    ones = x.new_ones(x.shape[0], 1, *x.shape[2:])
    if geo.needs_halo:
        x_block, v_block = layout.halo(x, geo.lo, geo.hi), layout.halo(ones, geo.lo, geo.hi)
    else:
        x_block, v_block = x, ones
    summed = pool(geo.crop(x_block), geo.kernel, geo.stride, 0)  # S / k
    visible = pool(geo.crop(v_block), geo.kernel, geo.stride, 0)  # V / k
    in_bounds = _in_bounds(layer, layout, tuple(x.shape[2:])).to(x.dtype)  # I / k
    override = getattr(layer, "divisor_override", None)
    if not layer.count_include_pad and not override:
        scale = 1.0 / visible.clamp_min(1e-30)  # S / V
    else:
        k = float(torch.tensor(geo.kernel).prod())
        scale = in_bounds / visible.clamp_min(1e-30) * (k / override if override else 1.0)  # S·I / (div·V)
    return channels_last(summed * scale), ("blocks" if geo.needs_halo else "direct"), ""


def visible_global_pool(layout: PackedLayout, x: torch.Tensor, kind: str, keepdim: bool) -> torch.Tensor:
    """Each sample's mean / max over its visible sites, repeated for each of its cells: ``(N, C[, 1, …])``."""
    v = x.reshape(layout.batch, layout.visible, x.shape[1], -1)
    pooled = v.amax(dim=(1, 3)) if kind == "max" else v.mean(dim=(1, 3))
    pooled = pooled.repeat_interleave(layout.visible, dim=0)
    return pooled.view(layout.n, x.shape[1], *([1] * (x.ndim - 2))) if keepdim else pooled


def packed_global_pool(layer: nn.Module, x: torch.Tensor, layout: PackedLayout):
    """Global pools: each sample's visible mean / max, repeated for each of its cells (so it broadcasts back)."""
    size = layer.output_size
    sizes = (size,) * layout.spatial_dims if isinstance(size, int) or size is None else tuple(size)
    if layer._dense_class.forward not in _ADAPTIVE_FORWARDS:
        return None, "dense", _OWN_FORWARD
    if any(s != 1 for s in sizes) or getattr(layer, "return_indices", False):
        return None, "dense", f"an adaptive pool to size {size} (only global pools to size 1 are packed)"
    kind = "max" if "Max" in layer._dense_class.__name__ else "mean"
    return visible_global_pool(layout, x, kind, keepdim=True), "direct", ""


def packed_norm(layer: nn.Module, x: torch.Tensor, layout: PackedLayout):
    """BatchNorm on the packed batch; Instance/Group norm on a per-sample view of the visible sites."""
    dense_forward = layer._dense_class.forward
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        y = synced_batch_norm(layer, x) if needs_cross_process_sync(layer) else dense_forward(layer, x)
        return y, "direct", ""
    y = dense_forward(layer, layout.per_sample(x))  # per-sample statistics over the sample's visible sites
    return layout.from_per_sample(y, x.shape[2:]), "direct", ""

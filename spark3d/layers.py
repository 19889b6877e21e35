"""Small building blocks shared by the decoder and the densifier, generic in ``spatial_dims``."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["conv_nd", "conv_transpose_nd", "make_norm", "ChannelLayerNorm", "NORM_KINDS"]

NORM_KINDS = ("batch", "instance", "group", "layer")


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def conv_transpose_nd(spatial_dims: int) -> type[nn.Module]:
    return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first tensor ``(B, C, *S)``, per site."""

    data_format = "channels_first"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def make_norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    """A normalisation layer of the given kind for ``channels`` channels."""
    if kind == "batch":
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels)
    if kind == "instance":
        return {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims](channels, affine=True)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "layer":
        return ChannelLayerNorm(channels)
    raise ValueError(f"unknown norm kind '{kind}'; expected one of {NORM_KINDS}")


def norm_kind_of(network: nn.Module, only: Sequence[str] | None = None) -> str:
    """The most common normalisation kind among the network's modules (``batch`` when it has none)."""
    counts = dict.fromkeys(NORM_KINDS, 0)
    only = None if only is None else set(only)
    for name, m in network.named_modules():
        if only is not None and name not in only:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            counts["batch"] += 1
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            counts["instance"] += 1
        elif isinstance(m, nn.GroupNorm):
            counts["group"] += 1
        elif isinstance(m, nn.LayerNorm):
            counts["layer"] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else "batch"

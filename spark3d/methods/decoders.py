"""The light hierarchical (UNet-like) decoder of SparK, for any ``spatial_dims`` and per-axis strides.

Coarsest scale first: at each scale the densified skip is fused (added, or concatenated), then an
up block (transposed conv by the per-axis stride ratio, then two 3×3 convs with norm + activation)
moves to the next finer scale; past the finest encoder level it keeps upsampling (×2 per axis at
most) until stride 1, and a 1×1 conv maps to the output channels.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..layers import conv_nd, conv_transpose_nd, make_norm

__all__ = ["LightDecoder", "up_steps"]


def up_steps(strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Per-axis upsampling ratios from the coarsest stride down to stride 1 (finest-first input)."""
    steps = []
    for fine, coarse in zip(strides[:-1][::-1], strides[1:][::-1]):
        ratio = tuple(c // f for c, f in zip(coarse, fine))
        if any(c % f for c, f in zip(coarse, fine)):
            raise ValueError(f"stride {tuple(coarse)} is not a whole multiple of {tuple(fine)}")
        steps.append(ratio)
    remaining = list(strides[0])
    while any(r > 1 for r in remaining):
        ratio = tuple(2 if r % 2 == 0 else r for r in remaining)
        steps.append(ratio)
        remaining = [r // q for r, q in zip(remaining, ratio)]
    return steps


class UpBlock(nn.Module):
    """Transposed conv by ``ratio`` then two 3×3 convs with norm + activation."""

    def __init__(self, in_ch: int, out_ch: int, ratio: Sequence[int], spatial_dims: int, norm: str) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.up = conv_transpose_nd(spatial_dims)(in_ch, in_ch, kernel_size=tuple(ratio), stride=tuple(ratio))
        self.conv = nn.Sequential(
            conv(in_ch, in_ch, 3, padding=1, bias=False), make_norm(norm, in_ch, spatial_dims), nn.ReLU6(inplace=True),
            conv(in_ch, out_ch, 3, padding=1, bias=False), make_norm(norm, out_ch, spatial_dims), nn.ReLU6(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """Decodes densified features (finest first, widths ``widths[k]``) to ``out_channels`` at stride 1.

    Args:
        strides: cumulative per-axis strides of the inputs, finest first.
        width: channels at the coarsest scale; halves with each up block (not below ``min_width``).
        fusion: ``"add"`` (SparK) or ``"concat"``.
    """

    def __init__(
        self,
        strides: Sequence[Sequence[int]],
        out_channels: int,
        width: int,
        spatial_dims: int,
        norm: str = "batch",
        fusion: str = "add",
        min_width: int = 16,
    ) -> None:
        super().__init__()
        if fusion not in ("add", "concat"):
            raise ValueError(f"fusion must be 'add' or 'concat', got '{fusion}'")
        self.fusion = fusion
        self.num_levels = len(strides)
        steps = up_steps(strides)
        self.widths = [max(width // 2**i, min_width) for i in range(len(steps) + 1)]
        blocks = [
            UpBlock(self._in_channels(i), self.widths[i + 1], ratio, spatial_dims, norm) for i, ratio in enumerate(steps)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.head = conv_nd(spatial_dims)(self._in_channels(len(steps)), out_channels, 1)

    def _in_channels(self, i: int) -> int:
        """Channels entering step ``i``: doubled where a skip was concatenated."""
        doubled = self.fusion == "concat" and 0 < i < self.num_levels
        return self.widths[i] * (2 if doubled else 1)

    def level_widths(self) -> list[int]:
        """Decoder width at each encoder level, finest first (what the densifier must project to)."""
        return [self.widths[self.num_levels - 1 - k] for k in range(self.num_levels)]

    def _fuse(self, x: torch.Tensor | None, skip: torch.Tensor) -> torch.Tensor:
        if x is None:
            return skip
        return x + skip if self.fusion == "add" else torch.cat([x, skip], dim=1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = None
        coarse_first = list(feats)[::-1]
        for i in range(len(self.blocks) + 1):
            if i < len(coarse_first):
                x = self._fuse(x, coarse_first[i])
            if i < len(self.blocks):
                x = self.blocks[i](x)
        return self.head(x)

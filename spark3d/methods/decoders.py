"""SparK's decoders, for any ``spatial_dims`` and per-axis strides: the faithful light decoder and an efficient one.

Both take the densified encoder levels (finest first) and predict ``out_channels`` at stride 1.

- :class:`LightDecoder` (``decoder="spark"``, as in SparK): coarsest scale first, at each scale the
  densified skip is fused (added, or concatenated), then an up block (transposed conv by the per-axis
  stride ratio, then two 3×3 convs with norm + activation) moves to the next finer scale; past the
  finest encoder level it keeps upsampling (×2 per axis at most) until stride 1, and a 1×1 conv maps
  to the output channels. Densify projections: 3×3 (1×1 at the coarsest level).
- :class:`EfficientDecoder` (``decoder="efficient"``): decodes only down to a coarser *head stride*
  (4 per axis by default), with cheap up blocks (a transposed conv that also narrows the width, then
  one depthwise-separable inverted-bottleneck block); levels finer than the head stride enter through a
  patchifying projection (a conv whose kernel equals its stride, i.e. space-to-depth + 1×1), and a
  pixel-shuffle head predicts each head position's ``prod(head stride)`` finer pixels. Its cost no
  longer grows with full-resolution convolutions.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..layers import conv_nd, conv_transpose_nd, make_norm

__all__ = ["LightDecoder", "EfficientDecoder", "up_steps", "pixel_shuffle", "DECODERS", "make_decoder"]


def up_steps(strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Per-axis upsampling ratios from the coarsest stride down to stride 1 (finest-first input)."""
    steps = _level_steps(strides)
    remaining = list(strides[0])
    while any(r > 1 for r in remaining):
        ratio = tuple(2 if r % 2 == 0 else r for r in remaining)
        steps.append(ratio)
        remaining = [r // q for r, q in zip(remaining, ratio)]
    return steps


def _level_steps(strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Per-axis ratios between consecutive encoder levels, coarsest first."""
    steps = []
    for fine, coarse in zip(strides[:-1][::-1], strides[1:][::-1]):
        if any(c % f for c, f in zip(coarse, fine)):
            raise ValueError(f"stride {tuple(coarse)} is not a whole multiple of {tuple(fine)}")
        steps.append(tuple(c // f for c, f in zip(coarse, fine)))
    return steps


def pixel_shuffle(x_bcs: torch.Tensor, ratio: Sequence[int]) -> torch.Tensor:
    """N-d depth-to-space: ``(B, C·prod(r), *S)`` → ``(B, C, *(S·r))``; channel ``c·prod(r) + offset`` fills
    sub-position ``offset`` (raster order) of output channel ``c``."""
    b, cr, *size = x_bcs.shape
    nd = len(size)
    c = cr // math.prod(ratio)
    x = x_bcs.reshape(b, c, *ratio, *size)
    perm = [0, 1]
    for i in range(nd):
        perm += [2 + nd + i, 2 + i]  # (size_i, ratio_i) pairs
    return x.permute(perm).reshape(b, c, *[s * r for s, r in zip(size, ratio)])


class UpBlock(nn.Module):
    """Transposed conv by ``ratio`` then two 3×3 convs with norm + activation (SparK's decoder block)."""

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
        self.spatial_dims = spatial_dims
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

    def projections(self, channels: Sequence[int]) -> nn.ModuleList:
        """SparK's densify projections: a 3×3 conv per level (1×1 at the coarsest) to the level's width."""
        conv, n = conv_nd(self.spatial_dims), len(channels)
        return nn.ModuleList([conv(c, w, kernel_size=1 if k == n - 1 else 3, padding=0 if k == n - 1 else 1)
                              for k, (c, w) in enumerate(zip(channels, self.level_widths()))])

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


class SeparableBlock(nn.Module):
    """Residual inverted-bottleneck block: depthwise 3×3 conv → norm → 1×1 expand ×2 → GELU → 1×1, plus the input."""

    def __init__(self, channels: int, spatial_dims: int, norm: str, expansion: int = 2) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.dw = conv(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.norm = make_norm(norm, channels, spatial_dims)
        self.pw1 = conv(channels, channels * expansion, 1)
        self.act = nn.GELU()
        self.pw2 = conv(channels * expansion, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(x)))))


class EfficientUpBlock(nn.Module):
    """Transposed conv by ``ratio`` that also narrows ``in_ch`` → ``out_ch``, norm + activation, then a separable block."""

    def __init__(self, in_ch: int, out_ch: int, ratio: Sequence[int], spatial_dims: int, norm: str) -> None:
        super().__init__()
        self.up = conv_transpose_nd(spatial_dims)(in_ch, out_ch, kernel_size=tuple(ratio), stride=tuple(ratio),
                                                  bias=False)
        self.norm = make_norm(norm, out_ch, spatial_dims)
        self.act = nn.GELU()
        self.block = SeparableBlock(out_ch, spatial_dims, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.act(self.norm(self.up(x))))


def head_level(strides: Sequence[Sequence[int]], head_stride: int | Sequence[int] = 4) -> int:
    """Index of the finest encoder level whose stride reaches ``head_stride`` on every axis (capped by the total)."""
    total = strides[-1]
    want = (head_stride,) * len(total) if isinstance(head_stride, int) else tuple(head_stride)
    want = tuple(min(w, t) for w, t in zip(want, total))
    return next(k for k, s in enumerate(strides) if all(a >= w for a, w in zip(s, want)))


class EfficientDecoder(nn.Module):
    """Decodes to the head stride and predicts the finer pixels of each position with a pixel-shuffle head.

    Args:
        strides: cumulative per-axis strides of the encoder levels, finest first.
        width: channels at the coarsest level; halves per level (not below ``min_width``).
        head_stride: the stride (per axis, capped by the total stride) at which decoding stops; the head
            then predicts ``prod(stride)`` pixels per position. Levels finer than it enter by patchifying
            projections.
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
        head_stride: int | Sequence[int] = 4,
    ) -> None:
        super().__init__()
        if fusion != "add":
            raise ValueError(f"the efficient decoder fuses levels by addition; fusion='{fusion}' needs decoder='spark'")
        self.spatial_dims = spatial_dims
        self.strides = [tuple(s) for s in strides]
        self.num_levels = len(strides)
        self.head_level = head_level(self.strides, head_stride)
        self.head_stride = self.strides[self.head_level]
        steps = _level_steps(self.strides)[: self.num_levels - 1 - self.head_level]  # coarsest → head level
        self.widths = [max(width // 2**i, min_width) for i in range(len(steps) + 1)]
        self.blocks = nn.ModuleList(
            [EfficientUpBlock(self.widths[i], self.widths[i + 1], r, spatial_dims, norm) for i, r in enumerate(steps)]
        )
        w = self.widths[-1]
        self.refine = SeparableBlock(w, spatial_dims, norm)
        self.head = conv_nd(spatial_dims)(w, out_channels * math.prod(self.head_stride), 1)

    def level_widths(self) -> list[int]:
        """Decoder width each (projected) level is added at, finest first."""
        return [self.widths[-1] if k <= self.head_level else self.widths[self.num_levels - 1 - k]
                for k in range(self.num_levels)]

    def projections(self, channels: Sequence[int]) -> nn.ModuleList:
        """Densify projections: 1×1 at and above the head level; below it a conv with kernel = stride =
        the ratio to the head stride (space-to-depth + 1×1), so fine levels never meet a full-resolution conv."""
        conv = conv_nd(self.spatial_dims)
        projs = []
        for k, (c, w) in enumerate(zip(channels, self.level_widths())):
            ratio = tuple(h // s for h, s in zip(self.head_stride, self.strides[k])) if k < self.head_level else 1
            projs.append(conv(c, w, kernel_size=ratio, stride=ratio))
        return nn.ModuleList(projs)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        coarse_first = list(feats)[::-1]
        x = coarse_first[0]
        for i, block in enumerate(self.blocks):
            x = block(x) + coarse_first[i + 1]
        for fine in coarse_first[len(self.blocks) + 1:]:  # levels finer than the head stride, already patchified
            x = x + fine
        return pixel_shuffle(self.head(self.refine(x)), self.head_stride)


DECODERS: dict[str, type[nn.Module]] = {"spark": LightDecoder, "efficient": EfficientDecoder}


def make_decoder(kind: str, strides: Sequence[Sequence[int]], out_channels: int, width: int, spatial_dims: int,
                 norm: str = "batch", fusion: str = "add") -> nn.Module:
    """The decoder ``kind`` (``"spark"``: faithful, ``"efficient"``); unknown kinds are a ValueError."""
    if kind not in DECODERS:
        raise ValueError(f"decoder must be one of {sorted(DECODERS)}, got '{kind}'")
    return DECODERS[kind](strides, out_channels, width, spatial_dims, norm=norm, fusion=fusion)

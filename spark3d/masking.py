"""Mask grids and random masks for sparse masked modeling.

A mask is a bool tensor of layout ``(B, 1, *grid)`` with ``True`` = visible. The grid is the
input size divided by the encoder's total stride, per axis. Masks reach feature maps of any
size by per-axis nearest upsampling (``repeat_interleave``), so anisotropic strides work.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .errors import ConfigError

__all__ = [
    "check_mask_ratio",
    "mask_grid",
    "num_visible",
    "random_mask",
    "upsample_mask",
]


def _as_tuple(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise ValueError(f"{what} {value} has {len(value)} axes, expected {ndim}")
    return value


def mask_grid(input_size: Sequence[int], stride: int | Sequence[int]) -> tuple[int, ...]:
    """Per-axis mask grid ``input_size / stride``; raises when an axis does not divide exactly."""
    input_size = tuple(int(s) for s in input_size)
    stride = _as_tuple(stride, len(input_size), "stride")
    bad = [(i, s, t) for i, (s, t) in enumerate(zip(input_size, stride)) if s % t != 0 or s < t]
    if bad:
        axis, size, step = bad[0]
        raise ConfigError(
            f"input size {input_size} is not divisible by the encoder's total stride {stride} "
            f"(axis {axis}: {size} % {step} != 0); choose an input size that is a multiple of {stride}"
        )
    return tuple(s // t for s, t in zip(input_size, stride))


def check_mask_ratio(mask_ratio: float, what: str = "mask_ratio") -> float:
    """``mask_ratio`` strictly between 0 and 1 (0 masks nothing: the loss is 0 and nothing is learnt; 1 leaves
    nothing visible); ConfigError naming ``what`` otherwise."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
        raise ConfigError(f"{what} is {mask_ratio}; expected a fraction strictly between 0 and 1 (0 masks nothing, "
                          "so there is nothing to learn; 1 leaves nothing visible)")
    return float(mask_ratio)


def num_visible(grid: Sequence[int], mask_ratio: float) -> int:
    """Number of visible cells per sample: ``round(prod(grid) * (1 - mask_ratio))``, at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    total = math.prod(grid)
    return max(1, min(total, round(total * (1.0 - mask_ratio))))


def random_mask(
    batch_size: int,
    grid: Sequence[int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random mask ``(B, 1, *grid)`` with exactly the same number of visible cells per sample."""
    grid = tuple(int(g) for g in grid)
    total = math.prod(grid)
    keep = num_visible(grid, mask_ratio)
    gen_device = generator.device if generator is not None else device
    noise_bl = torch.rand(batch_size, total, generator=generator, device=gen_device)
    rank_bl = noise_bl.argsort(dim=1).argsort(dim=1)  # rank of each cell's noise within its sample
    mask_bl = rank_bl < keep
    return mask_bl.view(batch_size, 1, *grid).to(device if device is not None else mask_bl.device)


def upsample_mask(mask_b1g: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest upsampling of a ``(B, 1, *grid)`` mask to ``(B, 1, *size)`` with integer per-axis factors."""
    grid = tuple(mask_b1g.shape[2:])
    size = tuple(int(s) for s in size)
    if len(size) != len(grid):
        raise ValueError(f"cannot upsample a mask of grid {grid} to a size with {len(size)} axes {size}")
    out = mask_b1g
    for axis, (g, s) in enumerate(zip(grid, size)):
        if s % g != 0:
            raise ValueError(
                f"feature map of spatial size {size} is not a whole multiple of the mask grid {grid} "
                f"(axis {axis}: {s} / {g}); every encoder layer must work at a multiple of the mask grid"
            )
        if s != g:
            out = out.repeat_interleave(s // g, dim=2 + axis)
    return out

"""The mask of one model and its per-resolution views: what sparse layers read instead of a global."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch

from ..masking import upsample_mask

__all__ = ["MaskContext"]


class MaskContext:
    """The current mask of one model, and its per-resolution views (cached per mask).

    Sparse layers ask it for the mask at their feature size; ``None`` as mask means dense mode.
    ``layout`` is set (by :func:`spark3d.sparse.compute.packed_flow`) while packed visible cells flow
    through the layers instead of dense maps; ``None`` otherwise.
    """

    def __init__(self) -> None:
        self._mask_b1g: torch.Tensor | None = None
        self._visible_cells = 0
        self._cache: dict[tuple, torch.Tensor] = {}
        self.layout = None  # the PackedLayout of the sparse-compute path while it runs

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask_b1g

    @property
    def spatial_dims(self) -> int | None:
        return None if self._mask_b1g is None else self._mask_b1g.ndim - 2

    @property
    def visible_cells(self) -> int:
        """Visible cells per sample of the current mask (0 in dense mode)."""
        return self._visible_cells

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

    def cached(self, key: tuple, make) -> object:
        """A per-mask cache for derived views (``make()`` runs once per mask and key)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def mask_at(self, size: Sequence[int]) -> torch.Tensor:
        """Bool mask ``(B, 1, *size)``: the mask upsampled to a feature map of this size."""
        return self.cached(("bool", tuple(size)), lambda: upsample_mask(self._mask_b1g, size))

    def weights_at(self, size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The mask at this size as 0/1 values of ``dtype``, for multiplication."""
        return self.cached(("weights", tuple(size), dtype), lambda: self.mask_at(size).to(dtype))

    def visible_index(self, size: Sequence[int]) -> torch.Tensor:
        """Flat indices ``(B, 1, K)`` of the visible sites of each sample at this size, in raster order."""

        def make() -> torch.Tensor:
            mask_bn = self.mask_at(size).flatten(1)
            k = self._visible_cells * (mask_bn.shape[1] // self._mask_b1g[0].numel())
            order_bn = torch.sort((~mask_bn).to(torch.uint8), dim=1, stable=True).indices
            return order_bn[:, None, :k]

        return self.cached(("index", tuple(size)), make)

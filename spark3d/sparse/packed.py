"""The packed layout of the sparse-compute path: the visible cells of a mask as one batch ``(N = B·K, C, *cell)``.

:class:`PackedLayout` packs dense maps, unpacks them (masked cells zero, or a fill such as a mask
token), gives per-sample views for per-sample norms, and moves halos between neighbouring cells
with index tables built once per mask. :func:`packed_flow` makes a context's converted layers take
and return packed maps for the duration of a ``with`` block (see :mod:`spark3d.sparse.compute`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .context import MaskContext

__all__ = ["PackedLayout", "packed_flow", "suspended", "channels_last", "empty_channels_last", "gather_rows", "rows", "STRATEGIES"]

STRATEGIES = ("auto", "direct", "blocks", "sites", "dense")


class PackedLayout:
    """The visible cells of one mask as a packed batch, with the index tables that move data between cells.

    ``pack`` takes a dense ``(B, C, *S)`` map (``S`` a multiple of the mask grid) to ``(N, C, *cell)``,
    ``unpack`` scatters back (masked cells zero, or a fill value); ``neighbour(offset)`` gives, for
    each packed cell, the packed index of the cell at that grid offset and whether it is a visible
    cell inside the grid; ``halo`` pads every cell with its neighbours' sites. ``strategy`` forces one convolution strategy (tests, benchmarks).
    """

    def __init__(self, mask_b1g: torch.Tensor, visible_cells: int, strategy: str = "auto") -> None:
        self.batch = int(mask_b1g.shape[0])
        self.grid = tuple(int(g) for g in mask_b1g.shape[2:])
        self.visible = int(visible_cells)
        self.n = self.batch * self.visible
        self.spatial_dims = len(self.grid)
        self.strategy = strategy
        self.device = mask_b1g.device
        mask_bl = mask_b1g.flatten(1)
        order_bl = torch.sort((~mask_bl).to(torch.uint8), dim=1, stable=True).indices[:, : self.visible]
        flat_n = order_bl.reshape(-1)  # grid raster index of each packed cell
        self.sample_n = torch.arange(self.batch, device=self.device).repeat_interleave(self.visible)
        self.coords_n = torch.stack(torch.unravel_index(flat_n, self.grid), dim=1) if self.grid else flat_n[:, None]
        cell_map = torch.full((self.batch, math.prod(self.grid)), -1, dtype=torch.long, device=self.device)
        cell_map.scatter_(1, order_bl, torch.arange(self.n, device=self.device).view(self.batch, self.visible))
        self.cell_map = cell_map.view(self.batch, *self.grid)  # packed index of each cell, -1 where masked
        self.visible_fraction = self.visible / math.prod(self.grid)
        self._tables: dict[tuple, object] = {}
        self.plan: dict[int, tuple] | None = None  # when a dict: id(layer) -> (layer, strategy, detail), see note()
        self.setup_s = 0.0  # seconds spent building this mask's index tables (what a fresh mask costs)

    def note(self, layer: object, strategy: str, detail: str = "") -> None:
        """Record which strategy ``layer`` ran (when a plan is being recorded; the first call of a layer wins)."""
        if self.plan is not None and id(layer) not in self.plan:
            self.plan[id(layer)] = (layer, strategy, detail)

    # ---------------------------------------------------------------------------- layout
    def holds(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a packed map of this layout (``(N, C, *cell)``, or channels-last ``(N, *cell, C)``)."""
        return x.ndim == 2 + self.spatial_dims and x.shape[0] == self.n

    def table(self, key: tuple, make: Callable[[], object]) -> object:
        """A per-mask cache of derived index tables."""
        if key not in self._tables:
            t0 = time.perf_counter()
            self._tables[key] = make()
            self.setup_s += time.perf_counter() - t0
        return self._tables[key]

    def _index(self) -> tuple:
        """Advanced index into a ``(B, C, G1, c1, G2, c2, …)`` view selecting the packed cells."""
        idx: list = [self.sample_n, slice(None)]
        for a in range(self.spatial_dims):
            idx += [self.coords_n[:, a], slice(None)]
        return tuple(idx)

    def _cell_view_shape(self, b: int, c: int, size: Sequence[int]) -> list[int]:
        shape = [b, c]
        for g, s in zip(self.grid, size):
            if s % g:
                raise ValueError(f"feature map of size {tuple(size)} is not a multiple of the mask grid {self.grid}")
            shape += [g, s // g]
        return shape

    def pack(self, x_bcs: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` → ``(N, C, *cell)``: the visible cells of every sample."""
        b, c, *size = x_bcs.shape
        return channels_last(x_bcs.reshape(self._cell_view_shape(b, c, size))[self._index()])

    def unpack(self, x_ncs: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, C, *cell)`` → ``(B, C, *S)`` with masked cells 0 (or ``fill``, broadcast to the map)."""
        n, c, *cell = x_ncs.shape
        size = [g * s for g, s in zip(self.grid, cell)]
        if fill is None:
            canvas = x_ncs.new_zeros(self._cell_view_shape(self.batch, c, size))
        else:
            canvas = fill.to(x_ncs.dtype).expand(self.batch, c, *size).reshape(
                self._cell_view_shape(self.batch, c, size)).clone()
        canvas[self._index()] = x_ncs
        return canvas.view(self.batch, c, *size)

    def per_sample(self, x_ncs: torch.Tensor) -> torch.Tensor:
        """``(N, C, *cell)`` → ``(B, C, K·V, 1, …)``: each sample's visible sites in one axis (for per-sample norms)."""
        n, c, *cell = x_ncs.shape
        v = x_ncs.reshape(self.batch, self.visible, c, -1).transpose(1, 2)
        return v.reshape(self.batch, c, -1, *([1] * (len(cell) - 1)))

    def from_per_sample(self, y: torch.Tensor, cell: Sequence[int]) -> torch.Tensor:
        """Inverse of :meth:`per_sample`."""
        c = y.shape[1]
        return channels_last(y.reshape(self.batch, c, self.visible, -1).transpose(1, 2).reshape(self.n, c, *cell))

    def neighbour(self, offset: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each packed cell, the packed index ``(N,)`` of the cell at grid ``offset`` from it, and ``(N,)``
        whether that cell is visible and inside the grid (index 0 where not)."""

        def make():
            coords = self.coords_n + torch.tensor(offset, device=self.device)
            grid = torch.tensor(self.grid, device=self.device)
            inside = ((coords >= 0) & (coords < grid)).all(1)
            coords = torch.minimum(coords.clamp_min(0), grid - 1)
            found = self.cell_map[(self.sample_n, *coords.unbind(1))]
            valid = inside & (found >= 0)
            return found.clamp_min(0), valid

        return self.table(("neighbour", tuple(offset)), make)

    def halo_pieces(self, cell: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> list:
        """How a halo-padded block is assembled: ``(offset, source slices, target slices)`` per neighbour piece."""

        def make():
            segments = []  # per axis: (cell offset, start in that cell, length, start in the block)
            for c, before, after in zip(cell, lo, hi):
                parts, need, t = [], max(before, 0), 1
                while need > 0:
                    take = min(need, c)
                    parts.insert(0, (-t, c - take, take))
                    need, t = need - take, t + 1
                parts.append((0, 0, c))
                need, t = max(after, 0), 1
                while need > 0:
                    take = min(need, c)
                    parts.append((t, 0, take))
                    need, t = need - take, t + 1
                at, placed = 0, []
                for off, start, length in parts:
                    placed.append((off, slice(start, start + length), slice(at, at + length)))
                    at += length
                segments.append(placed)
            pieces = []
            for combo in itertools.product(*segments):
                offset = tuple(part[0] for part in combo)
                pieces.append((offset, tuple(part[1] for part in combo), tuple(part[2] for part in combo)))
            return pieces

        return self.table(("halo", tuple(cell), tuple(lo), tuple(hi)), make)

    def block_table(self, cell: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
        """``(N·prod(block),)`` rows of :meth:`rows` (``N·V`` = the fill row) that make each cell's halo-padded block."""

        def make():
            v = math.prod(cell)
            block = [c + max(a, 0) + max(b, 0) for c, a, b in zip(cell, lo, hi)]
            site_rows = torch.arange(self.n * v, device=self.device).view(self.n, *cell)
            table = torch.full((self.n, *block), self.n * v, dtype=torch.long, device=self.device)
            for offset, source, target in self.halo_pieces(cell, lo, hi):
                idx, valid = self.neighbour(offset)
                part = site_rows[(slice(None), *source)].index_select(0, idx)
                part[~valid] = self.n * v
                table[(slice(None), *target)] = part
            return table.view(-1)

        return self.table(("block", tuple(cell), tuple(lo), tuple(hi)), make)

    def halo(self, x_ncs: torch.Tensor, lo: Sequence[int], hi: Sequence[int], fill: float = 0.0) -> torch.Tensor:
        """Each cell padded by ``lo``/``hi`` sites per axis taken from the neighbouring cells, diagonal ones
        included (``fill`` where a neighbour is masked or outside the grid); channels-last, one gather."""
        cell = tuple(x_ncs.shape[2:])
        block = [c + max(a, 0) + max(b, 0) for c, a, b in zip(cell, lo, hi)]
        out = gather_rows(rows(x_ncs, fill), self.block_table(cell, lo, hi))
        return out.view(x_ncs.shape[0], *block, x_ncs.shape[1]).movedim(-1, 1)


def channels_last(x_ncs: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory (what packed maps use: gathers move rows of ``C`` contiguous values)."""
    if x_ncs.ndim == 4:
        return x_ncs.contiguous(memory_format=torch.channels_last)
    if x_ncs.ndim == 5:
        return x_ncs.contiguous(memory_format=torch.channels_last_3d)
    return x_ncs.movedim(1, -1).contiguous().movedim(-1, 1)


def empty_channels_last(n: int, c: int, cell: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``(n, c, *cell)`` tensor with channels-last strides (a tensor of its own, not a view)."""
    strides, step = [0] * (2 + len(cell)), c
    for a in range(len(cell) - 1, -1, -1):
        strides[2 + a], step = step, step * cell[a]
    strides[0], strides[1] = step, 1
    return torch.empty_strided((n, c, *cell), strides, dtype=like.dtype, device=like.device)


def gather_rows(rows_vc: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``rows_vc[table]``: ``embedding``'s row gather where no gradient is needed (faster on CPU), else
    ``index_select`` (whose backward is an index-add)."""
    if torch.is_grad_enabled() and rows_vc.requires_grad:
        return rows_vc.index_select(0, table)
    return F.embedding(table, rows_vc)


def rows(x_ncs: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``(N·V + 1, C)``: the sites of ``x`` as rows (raster order per cell), then one row of ``fill``."""
    c = x_ncs.shape[1]
    sites = x_ncs.movedim(1, -1).reshape(-1, c)  # a view for channels-last maps
    return torch.cat([sites, sites.new_full((1, c), fill)])


@contextlib.contextmanager
def packed_flow(ctx: MaskContext, strategy: str = "auto") -> Iterator[PackedLayout]:
    """Within the block, converted layers of ``ctx`` take and return packed maps of the current mask."""
    if ctx.mask is None:
        raise RuntimeError("packed_flow needs a mask in the context")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got '{strategy}'")
    def make() -> PackedLayout:
        t0 = time.perf_counter()
        made = PackedLayout(ctx.mask, ctx.visible_cells)
        made.setup_s += time.perf_counter() - t0
        return made

    layout = ctx.cached(("packed-layout",), make)
    layout.strategy = strategy
    previous, ctx.layout = getattr(ctx, "layout", None), layout
    from .stochastic import PackedRandomness  # a lower module's import would be circular

    try:
        with PackedRandomness(layout):  # random draws per sample / per dense site, as masked-dense makes them
            yield layout
    finally:
        ctx.layout = previous


@contextlib.contextmanager
def suspended(ctx: MaskContext) -> Iterator[None]:
    """Within the block, the context's layers take dense maps again (the masked-dense fallback)."""
    previous, ctx.layout = ctx.layout, None
    try:
        yield
    finally:
        ctx.layout = previous

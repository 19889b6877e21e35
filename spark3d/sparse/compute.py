"""The sparse-compute path: only the visible cells flow through the encoder, so its work follows the visible fraction.

Under a mask with ``K`` visible cells per sample, the encoder is fed the visible cells alone, packed
as a batch of ``N = B·K`` cells ``(N, C, *cell)`` (sample-major, raster order within a sample; see
:class:`PackedLayout`). Every converted layer keeps that layout, and computes exactly what the
masked-dense path computes at the visible sites:

- convolutions and max pools need a halo from the neighbouring cells; they either gather it
  (``blocks``: per cell, the halo-padded block, then a *valid* dense conv — masked or absent
  neighbours are zeros, or the lowest value for max pools), or gather each output site's
  neighbourhood and do one GEMM (``sites``, for small cells), or need none (``direct``: 1×1 convs,
  kernel = stride patchify convs); anything else runs masked-dense on the unpacked map (``dense``);
- BatchNorm runs on the packed batch (its statistics are over every visible site already);
  per-sample norms (Instance/Group) run on a per-sample view; channel LayerNorm and every
  position-wise op (activations, adds, linear layers) run unchanged;
- global average / max pools reduce over each sample's visible sites and repeat the result for the
  sample's cells, so per-sample vectors broadcast back onto packed maps.

Index tables (neighbours per axis and offset, per-site gather tables) are built once per mask and
geometry and kept in the layout, which the :class:`~spark3d.sparse.context.MaskContext` caches per
mask. :func:`packed_forward` is the one entry point the converted layers call.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .context import MaskContext
from .packed import (
    STRATEGIES, PackedLayout, channels_last, empty_channels_last, gather_rows, packed_flow, rows, suspended,
)
from .sync import needs_cross_process_sync, synced_batch_norm

__all__ = ["packed_forward", "packed_flow_difference", "conv_geometry", "ConvGeometry", "PackedLayout", "packed_flow",
           "STRATEGIES"]

# layers whose forward is torch's own (so the packed version knows exactly which op it replaces)
_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_OWN_CONV_FORWARDS = {nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward}
_MAXPOOL_FORWARDS = {nn.MaxPool1d.forward, nn.MaxPool2d.forward, nn.MaxPool3d.forward}
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ADAPTIVE_FORWARDS = {cls.forward for cls in _ADAPTIVE}
_SITES_MAX_TABLE = 1 << 25  # largest per-site gather table (entries) worth building


# -------------------------------------------------------------------------------- geometry
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


def _padding_pairs(padding, kernel, dilation, stride) -> list[tuple[int, int]] | None:
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


def conv_geometry(layer: nn.Module, x_ncs: torch.Tensor, grid: Sequence[int]) -> ConvGeometry | None:
    """The packed geometry of a conv / max pool on ``x``, or None when its output is not cell-aligned."""
    nd = x_ncs.ndim - 2
    tup = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)  # noqa: E731
    kernel, dilation = tup(layer.kernel_size), tup(getattr(layer, "dilation", 1))
    stride = tup(layer.stride if layer.stride is not None else layer.kernel_size)
    pads = _padding_pairs(layer.padding, kernel, dilation, stride)
    cell = tuple(x_ncs.shape[2:])
    if pads is None or any(c % s for c, s in zip(cell, stride)):
        return None
    geo = ConvGeometry(kernel, stride, pads, dilation, cell)
    for g, c_in, c_out, k, s, (p0, p1), d in zip(grid, cell, geo.cell_out, kernel, stride, pads, dilation):
        dense_out = (g * c_in + p0 + p1 - d * (k - 1) - 1) // s + 1
        if dense_out != g * c_out or c_out < 1:
            return None  # the dense map's output does not line up with the mask grid
    return geo


# -------------------------------------------------------------------------------- convolutions
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _adjoint(geo: ConvGeometry) -> ConvGeometry:
    """The geometry of a stride-1 conv's input gradient: the same taps, flipped, with ``lo`` and ``hi`` swapped."""
    return ConvGeometry(geo.kernel, geo.stride, [(h, h) for h in geo.hi], geo.dilation, geo.cell_in)


def _adjoint_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``(C_in, C_out/groups, *k)``: the flipped, transposed kernel whose conv is a conv's input gradient."""
    c_out, c_in_g, *k = weight.shape
    w = weight.reshape(groups, c_out // groups, c_in_g, *k).transpose(1, 2).reshape(groups * c_in_g, c_out // groups, *k)
    return w.flip(list(range(2, w.ndim)))


def _site_table(layout: PackedLayout, geo: ConvGeometry) -> torch.Tensor:
    """``(N·V_out·T,)`` rows of :func:`~spark3d.sparse.packed.rows` (``N·V_in`` = the zero row) that each
    output site's ``T`` taps read, tap-major per site."""

    def make():
        dev, nd = layout.device, layout.spatial_dims
        out_sites = torch.cartesian_prod(*[torch.arange(c, device=dev) for c in geo.cell_out]).view(-1, nd)
        taps = torch.cartesian_prod(*[torch.arange(k, device=dev) for k in geo.kernel]).view(-1, nd)
        s, d, lo = (torch.tensor(v, device=dev) for v in (geo.stride, geo.dilation, geo.lo))
        c_in = torch.tensor(geo.cell_in, device=dev)
        q = out_sites[:, None, :] * s - lo + taps[None, :, :] * d  # (V_out, T, nd) local input coordinates
        shift, local = torch.div(q, c_in, rounding_mode="floor"), torch.remainder(q, c_in)
        coords = layout.coords_n[:, None, None, :] + shift[None]  # (N, V_out, T, nd) cells read
        grid = torch.tensor(layout.grid, device=dev)
        inside = ((coords >= 0) & (coords < grid)).all(-1)
        coords = torch.minimum(coords.clamp_min(0), grid - 1)
        sample = layout.sample_n.view(-1, 1, 1).expand(coords.shape[:3])
        cell = layout.cell_map[(sample, *coords.unbind(-1))]
        site = torch.zeros(local.shape[:2], dtype=torch.long, device=dev)
        for a in range(nd):
            site = site * geo.cell_in[a] + local[..., a]
        v_in = math.prod(geo.cell_in)
        table = torch.where(inside & (cell >= 0), cell * v_in + site[None], layout.n * v_in)
        return table.view(-1)

    return layout.table(("sites", geo.kernel, geo.stride, geo.dilation, geo.lo, geo.cell_in), make)


def _gemm_conv(x: torch.Tensor, w_mat: torch.Tensor, bias: torch.Tensor | None, table: torch.Tensor,
               cell_out: Sequence[int]) -> torch.Tensor:
    """Gather each output site's taps from ``x``'s rows and multiply by ``w_mat`` ``(T·C, C_out)``; channels-last out."""
    cols = gather_rows(rows(x), table).view(-1, w_mat.shape[0])
    if torch.is_grad_enabled() and (cols.requires_grad or w_mat.requires_grad):  # autograd (strided convs)
        y = cols @ w_mat if bias is None else torch.addmm(bias.to(cols.dtype), cols, w_mat)
        return y.view(x.shape[0], *cell_out, -1).movedim(-1, 1)
    out = empty_channels_last(x.shape[0], w_mat.shape[1], cell_out, cols)
    out_rows = out.movedim(1, -1).view(-1, w_mat.shape[1])  # a view of out's own memory
    if bias is None:
        torch.mm(cols, w_mat, out=out_rows)
    else:
        torch.addmm(bias.to(cols.dtype), cols, w_mat, out=out_rows)
    return out


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``(C_out, C_in, *k)`` → ``(T·C_in, C_out)``, tap-major rows (what :func:`_gemm_conv` multiplies by)."""
    return weight.movedim(1, -1).reshape(weight.shape[0], -1).t()


class _SubmanifoldConv(torch.autograd.Function):
    """A stride-1 conv of packed cells that keeps only the packed input for backward.

    ``blocks``: gather halo-padded blocks, valid conv. ``sites``: gather every output site's taps, one GEMM.
    The input gradient is the same operation on the output gradient with the adjoint kernel (a gather,
    never a scatter-add); the weight gradient re-gathers the input.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layout: PackedLayout, geo: ConvGeometry, groups: int, strategy: str):
        ctx.layout, ctx.geo, ctx.groups, ctx.strategy = layout, geo, groups, strategy
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        if strategy == "sites":
            y = _gemm_conv(x, _weight_matrix(weight).to(x.dtype), bias, _site_table(layout, geo), geo.cell_out)
        else:
            block = layout.halo(x, geo.lo, geo.hi)
            y = _CONV[x.ndim - 2](block, weight.to(block.dtype), None if bias is None else bias.to(block.dtype),
                                  1, 0, geo.dilation, groups)
        ctx.compute_dtype = y.dtype
        return channels_last(y)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        layout, geo, groups = ctx.layout, ctx.geo, ctx.groups
        dtype = ctx.compute_dtype
        g = channels_last(grad_y.to(dtype))
        grad_x = grad_w = grad_b = None
        adj = _adjoint(geo)
        if ctx.needs_input_grad[0]:
            w_adj = _adjoint_weight(weight.to(dtype), groups)
            if ctx.strategy == "sites":
                grad_x = _gemm_conv(g, _weight_matrix(w_adj), None, _site_table(layout, adj), geo.cell_in)
            else:
                grad_x = _CONV[x.ndim - 2](layout.halo(g, adj.lo, adj.hi), w_adj, None, 1, 0, geo.dilation, groups)
            grad_x = channels_last(grad_x).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            xd = x.to(dtype)
            if ctx.strategy == "sites":
                g_rows = g.movedim(1, -1).reshape(-1, g.shape[1])
                if ctx.needs_input_grad[1]:
                    cols = gather_rows(rows(xd), _site_table(layout, geo)).view(g_rows.shape[0], -1)
                    w_t = (g_rows.t() @ cols).view(weight.shape[0], *geo.kernel, -1)
                    grad_w = w_t.movedim(-1, 1).to(weight.dtype)
                if ctx.needs_input_grad[2]:
                    grad_b = g_rows.sum(0).to(weight.dtype)
            else:
                block = layout.halo(xd, geo.lo, geo.hi)
                nd = x.ndim - 2
                _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                    g, block, weight.to(dtype), [weight.shape[0]] if ctx.has_bias else None, [1] * nd, [0] * nd,
                    list(geo.dilation), False, [0] * nd, groups, [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
                grad_w = None if grad_w is None else grad_w.to(weight.dtype)
                grad_b = None if grad_b is None else grad_b.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _conv_strategy(layer: nn.Module, layout: PackedLayout, geo: ConvGeometry) -> str:
    """``direct`` / ``blocks`` / ``sites`` / ``dense`` for this conv on this packed map (see module docs)."""
    if not geo.needs_halo:
        return "direct"
    forced = layout.strategy
    sites_ok = layer.groups == 1 and layout.n * math.prod(geo.cell_out) * math.prod(geo.kernel) <= _SITES_MAX_TABLE
    if forced == "sites" and sites_ok or forced in ("blocks", "dense"):
        return forced
    if layer.groups == 1:
        # compute-bound: a valid conv over halo-padded blocks does exactly the visible sites' work, but on
        # small cells the halo outweighs the cell and a GEMM over gathered taps is faster
        return "sites" if math.prod(geo.cell_out) <= 2 ** layout.spatial_dims and sites_ok else "blocks"
    # grouped / depthwise convs are memory-bound: blocks move halo-padded visible volume, dense everything
    return "blocks" if geo.halo_ratio() * layout.visible_fraction < 1.0 else "dense"


def _packed_conv(layer: nn.Module, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor | None:
    dense = layer._dense_class
    if dense.forward not in _CONV_FORWARDS or dense._conv_forward not in _OWN_CONV_FORWARDS \
            or layer.padding_mode != "zeros":
        return None  # a conv with its own forward (dynamic padding, weight standardisation …): masked-dense
    geo = conv_geometry(layer, x, layout.grid)
    if geo is None:
        return None
    strategy = _conv_strategy(layer, layout, geo)
    if strategy == "direct":
        return _CONV[x.ndim - 2](geo.crop(x), layer.weight, layer.bias, geo.stride, 0, geo.dilation, layer.groups)
    if strategy == "dense":
        return None
    if all(s == 1 for s in geo.stride) and all(h >= 0 for h in geo.hi):
        return _SubmanifoldConv.apply(x, layer.weight, layer.bias, layout, geo, layer.groups, strategy)
    if strategy == "sites":  # strided: plain autograd (its backward scatter-adds)
        w_mat = _weight_matrix(layer.weight).to(x.dtype)
        return channels_last(_gemm_conv(x, w_mat, layer.bias, _site_table(layout, geo), geo.cell_out))
    block = geo.crop(layout.halo(x, geo.lo, geo.hi))
    return _CONV[x.ndim - 2](block, layer.weight, layer.bias, geo.stride, 0, geo.dilation, layer.groups)


# -------------------------------------------------------------------------------- pools and norms
def _packed_max_pool(layer: nn.Module, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor | None:
    if layer._dense_class.forward not in _MAXPOOL_FORWARDS or layer.ceil_mode or layer.return_indices:
        return None
    geo = conv_geometry(layer, x, layout.grid)
    if geo is None:
        return None
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[layout.spatial_dims]
    lowest = torch.finfo(x.dtype).min
    block = geo.crop(layout.halo(x, geo.lo, geo.hi, fill=lowest)) if geo.needs_halo else geo.crop(x)
    return channels_last(pool(block, geo.kernel, geo.stride, 0, geo.dilation))


def _packed_global_pool(layer: nn.Module, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor | None:
    """Global pools: each sample's visible mean / max, repeated for each of its cells (so it broadcasts back)."""
    size = layer.output_size
    sizes = (size,) * layout.spatial_dims if isinstance(size, int) or size is None else tuple(size)
    if layer._dense_class.forward not in _ADAPTIVE_FORWARDS or any(s != 1 for s in sizes) \
            or getattr(layer, "return_indices", False):
        return None
    v = x.reshape(layout.batch, layout.visible, x.shape[1], -1)
    if "Max" in layer._dense_class.__name__:
        pooled = v.amax(dim=(1, 3))
    else:
        pooled = v.mean(dim=(1, 3))
    return pooled.repeat_interleave(layout.visible, dim=0).view(layout.n, x.shape[1], *([1] * layout.spatial_dims))


def _packed_norm(layer: nn.Module, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    dense_forward = layer._dense_class.forward
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return synced_batch_norm(layer, x) if needs_cross_process_sync(layer) else dense_forward(layer, x)
    y = dense_forward(layer, layout.per_sample(x))  # per-sample statistics over the sample's visible sites
    return layout.from_per_sample(y, x.shape[2:])


def packed_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A converted layer's forward while packed cells flow (``ctx.layout`` set): exact, and cheap where it can be."""
    ctx: MaskContext = layer._sparse_ctx
    layout: PackedLayout = ctx.layout
    dense_forward = layer._dense_class.forward
    if not args and not kwargs:
        y = None
        if isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed:
            y = _packed_conv(layer, x, layout)
        elif isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            y = _packed_max_pool(layer, x, layout)
        elif isinstance(layer, _ADAPTIVE):
            y = _packed_global_pool(layer, x, layout)
        elif isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)):
            y = _packed_norm(layer, x, layout)
        elif isinstance(layer, nn.LayerNorm):
            y = dense_forward(layer, x)  # over channels: per site
        if y is not None:
            return y
    # anything else: the masked-dense behaviour on the unpacked map, packed again (exact, not faster)
    with suspended(ctx):
        y = layer(layout.unpack(x), *args, **kwargs)
    if y.ndim == x.ndim and all(s % g == 0 and s >= g for s, g in zip(y.shape[2:], layout.grid)) \
            and math.prod(y.shape[2:]) > 1:
        return layout.pack(y)
    return y


# -------------------------------------------------------------------------------- verification
def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def packed_flow_difference(encoder: Callable[[torch.Tensor], Sequence[torch.Tensor]], network: nn.Module,
                           ctx: MaskContext, x: torch.Tensor, mask_b1g: torch.Tensor) -> float:
    """Largest relative difference between the packed flow's features and the masked-dense ones, in train and
    eval mode (``inf`` when the packed flow fails); buffers, train flags and random state are left as they were.

    Every covered layer is exact by construction; this catches what a network's own ``forward`` does to a
    packed map outside covered layers (a functional global pool, a shape-dependent reshape, per-sample
    random draws such as stochastic depth).
    """
    flags = {m: m.training for m in network.modules()}
    buffers = [b.detach().clone() for b in network.buffers()]
    worst = 0.0
    try:
        with torch.autocast(x.device.type, enabled=False), torch.random.fork_rng(
                devices=[x.device] if x.device.type == "cuda" else []):
            for training in (True, False):
                network.train(training)
                seed = int(torch.randint(0, 2**31 - 1, ()).item())
                with ctx.use(mask_b1g):
                    torch.manual_seed(seed)
                    reference = encoder(x * ctx.weights_at(x.shape[2:], x.dtype))
                    for b, saved in zip(network.buffers(), buffers):
                        b.copy_(saved)
                    torch.manual_seed(seed)
                    with packed_flow(ctx) as layout:
                        packed = encoder(layout.pack(x))
                    for b, saved in zip(network.buffers(), buffers):
                        b.copy_(saved)
                    if len(packed) != len(reference):
                        return math.inf
                    for p, r in zip(packed, reference):
                        if not layout.holds(p) or tuple(p.shape[1:2]) != tuple(r.shape[1:2]):
                            return math.inf
                        worst = max(worst, _relative(layout.unpack(p), r))
    except (RuntimeError, ValueError, IndexError, TypeError):
        return math.inf  # the network's forward cannot take packed maps
    finally:
        for m, flag in flags.items():
            m.training = flag
        for b, saved in zip(network.buffers(), buffers):
            b.copy_(saved)
    return worst

"""The sparse-compute path: only the visible cells flow through the encoder, so its work follows the visible fraction.

Under a mask with ``K`` visible cells per sample, the encoder is fed the visible cells alone, packed
as a batch of ``N = B·K`` cells ``(N, C, *cell)`` (sample-major, raster order within a sample; see
:class:`PackedLayout`). Every converted layer keeps that layout, and computes exactly what the
masked-dense path computes at the visible sites:

- convolutions and pools need a halo from the neighbouring cells; they either gather it
  (``blocks``: per cell, the halo-padded block, then a *valid* dense conv — masked or absent
  neighbours are zeros, or the lowest value for max pools), or gather each output site's
  neighbourhood and do one GEMM (``sites``, for small cells), or need none (``direct``: 1×1 convs,
  kernel = stride patchify convs). The choice depends on the layer's geometry only (kernel, stride,
  cell, groups), so a check on a small grid exercises what training runs. A conv class with a forward
  of its own (timm's ``Conv2dSame``, ``StdConv2d``: dynamic padding, standardised weights) runs that
  forward with its one zero pad and conv of the input replaced by the packed conv. What cannot run
  packed runs masked-dense on the unpacked map (``dense``), and says why in the plan;
- BatchNorm runs on the packed batch (its statistics are over every visible site already);
  per-sample norms (Instance/Group) run on a per-sample view; channel LayerNorm and every
  position-wise op (activations, adds, linear layers) run unchanged;
- global average / max pools reduce over each sample's visible sites and repeat the result for the
  sample's cells, so per-sample vectors broadcast back onto packed maps; random draws (stochastic
  depth, dropout) are made per sample as masked-dense makes them (:mod:`spark3d.sparse.stochastic`).

Index tables (neighbours per axis and offset, per-site gather tables) are built once per mask and
geometry and kept in the layout. :func:`packed_forward` is the one entry point the converted layers call;
with ``layout.plan`` set it records per layer the strategy that ran (:func:`spark3d.sparse.verify.plan_of`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .context import MaskContext
from .geometry import ConvGeometry, conv_geometry, pad_pairs_of, padding_pairs, window_geometry
from .packed import (
    STRATEGIES, PackedLayout, channels_last, empty_channels_last, gather_rows, packed_flow, rows, suspended,
)
from .pools import ADAPTIVE, packed_avg_pool, packed_global_pool, packed_max_pool, packed_norm
from .verify import packed_flow_difference

__all__ = ["packed_forward", "packed_flow_difference", "conv_geometry", "ConvGeometry", "PackedLayout", "packed_flow",
           "STRATEGIES", "conv_strategy"]

# layers whose forward is torch's own (so the packed version knows exactly which op it replaces)
_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_OWN_CONV_FORWARDS = {nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward}
_MAXPOOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVGPOOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)


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
                slow = groups > 1 and dtype == torch.float64 and not x.is_cuda  # torch's CPU float64 grouped conv crawls
                w_used = expand_groups(weight.to(dtype), groups) if slow else weight.to(dtype)
                _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                    g, block, w_used, [weight.shape[0]] if ctx.has_bias else None, [1] * nd, [0] * nd,
                    list(geo.dilation), False, [0] * nd, 1 if slow else groups,
                    [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
                if slow and grad_w is not None:
                    grad_w = diagonal_groups(grad_w, groups)
                grad_w = None if grad_w is None else grad_w.to(weight.dtype)
                grad_b = None if grad_b is None else grad_b.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None



def expand_groups(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight ``(C_out, C_in/G, *k)`` as the block-diagonal weight ``(C_out, C_in, *k)`` of the
    same conv with one group (differentiable; float64 grouped convs are far faster so on CPU)."""
    c_out, c_in_g, *k = weight.shape
    w = weight.reshape(groups, c_out // groups, c_in_g, -1)
    eye = torch.eye(groups, dtype=weight.dtype, device=weight.device)
    return torch.einsum("goik,gh->gohik", w, eye).reshape(c_out, groups * c_in_g, *k)


def diagonal_groups(full: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`expand_groups`: the grouped weight's entries of a block-diagonal ``(C_out, C_in, *k)``."""
    c_out, c_in, *k = full.shape
    f = full.reshape(groups, c_out // groups, groups, c_in // groups, -1)
    idx = torch.arange(groups, device=full.device)
    return f[idx, :, idx].reshape(c_out, c_in // groups, *k)


def conv_strategy(groups: int, geo: ConvGeometry, spatial_dims: int, forced: str = "auto") -> str:
    """``direct`` / ``blocks`` / ``sites`` / ``dense`` for a conv of this geometry (see module docs).

    A function of the geometry alone (never of the batch or the visible fraction), so the strategies a
    one-time check runs are the ones training runs.
    """
    if not geo.needs_halo:
        return "direct"
    if forced in ("blocks", "dense"):
        return forced
    if forced == "sites":
        return "sites" if groups == 1 else "blocks"
    # compute-bound: a valid conv over halo-padded blocks does exactly the visible sites' work, but on
    # small cells the halo outweighs the cell and a GEMM over gathered taps is faster; grouped and
    # depthwise convs always take blocks (a valid grouped conv of the visible blocks)
    return "sites" if groups == 1 and math.prod(geo.cell_out) <= 2 ** spatial_dims else "blocks"


_UNALIGNED = "its output is not aligned with the mask grid (a window or stride that does not divide the cell)"


def _conv_core(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, pads, dilation, groups: int,
               layout: PackedLayout):
    """One zero-padded conv of a packed map: ``(y, strategy, why)`` (``y`` None: not possible packed)."""
    nd = x.ndim - 2
    kernel = tuple(weight.shape[2:])
    geo = window_geometry(kernel, stride, pads, dilation, tuple(x.shape[2:]), layout.grid)
    if geo is None:
        return None, "dense", _UNALIGNED
    strategy = conv_strategy(groups, geo, nd, layout.strategy)
    if strategy == "direct":
        return _CONV[nd](geo.crop(x), weight, bias, geo.stride, 0, geo.dilation, groups), strategy, ""
    if strategy == "dense":
        return None, "dense", "forced (strategy='dense')"
    if all(s == 1 for s in geo.stride) and all(h >= 0 for h in geo.hi):
        return _SubmanifoldConv.apply(x, weight, bias, layout, geo, groups, strategy), strategy, ""
    if strategy == "sites":  # strided: plain autograd (its backward scatter-adds)
        w_mat = _weight_matrix(weight).to(x.dtype)
        return channels_last(_gemm_conv(x, w_mat, bias, _site_table(layout, geo), geo.cell_out)), strategy, ""
    block = geo.crop(layout.halo(x, geo.lo, geo.hi))
    return _CONV[nd](block, weight, bias, geo.stride, 0, geo.dilation, groups), strategy, ""


class _Abort(Exception):
    pass


_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d}
_HARMLESS = {"size", "dim", "ndimension", "numel", "__get__", "is_floating_point", "is_complex", "get_device"}


class _ConvCapture(TorchFunctionMode):
    """Runs a conv layer's own forward on a packed map; its zero ``F.pad`` and ``F.conv`` of the input become
    the packed conv (weights computed by the forward, e.g. standardised, keep their autograd graph)."""

    def __init__(self, x: torch.Tensor, layout: PackedLayout) -> None:
        super().__init__()
        self.x, self.layout, self.pads, self.result, self.why = x, layout, None, None, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not args or args[0] is not self.x or self.result is not None:
            return func(*args, **kwargs)
        nd = self.x.ndim - 2
        if func is F.pad:
            call = {**dict(zip(("input", "pad", "mode", "value"), args)), **kwargs}
            pairs = pad_pairs_of(call["pad"], nd)
            if call.get("mode", "constant") != "constant" or call.get("value") not in (None, 0, 0.0) \
                    or pairs is None or self.pads is not None:
                self.why = f"it pads its input with mode='{call.get('mode', 'constant')}' (only zero padding is packed)"
                raise _Abort
            self.pads = pairs
            return self.x
        if func in _CONV_FUNCS:
            call = {**dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args)), **kwargs}
            kernel = tuple(call["weight"].shape[2:])
            tup = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)  # noqa: E731
            stride, dilation = tup(call.get("stride", 1)), tup(call.get("dilation", 1))
            pads = padding_pairs(call.get("padding", 0), kernel, dilation, stride)
            if pads is not None and self.pads is not None:
                pads = [(a + c, b + d) for (a, b), (c, d) in zip(pads, self.pads)]
            y, strategy, why = _conv_core(self.x, call["weight"], call.get("bias"), stride, pads, dilation,
                                          int(call.get("groups", 1)), self.layout)
            if y is None:
                self.why = why
                raise _Abort
            self.result, self.strategy = y, strategy
            return y
        if getattr(func, "__name__", "") in _HARMLESS:
            return func(*args, **kwargs)
        self.why = f"its forward runs {getattr(func, '__name__', func)} on its input besides one zero pad and conv"
        raise _Abort


def packed_conv(layer: nn.Module, x: torch.Tensor, layout: PackedLayout):
    """A converted conv on a packed map: ``(y, strategy, why)``, ``y`` None when it must run masked-dense."""
    dense = layer._dense_class
    if dense.forward in _CONV_FORWARDS and dense._conv_forward in _OWN_CONV_FORWARDS:
        if layer.padding_mode != "zeros":
            return None, "dense", f"padding_mode='{layer.padding_mode}' (only zero padding is packed)"
        nd = x.ndim - 2
        tup = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)  # noqa: E731
        pads = padding_pairs(layer.padding, tuple(layer.kernel_size), tup(layer.dilation), tup(layer.stride))
        return _conv_core(x, layer.weight, layer.bias, tup(layer.stride), pads, tup(layer.dilation), layer.groups,
                          layout)
    capture = _ConvCapture(x, layout)  # a forward of its own (timm Conv2dSame, StdConv2d, …)
    try:
        with capture:
            y = dense.forward(layer, x)
    except _Abort:
        return None, "dense", capture.why
    if capture.result is None or y is not capture.result:
        return None, "dense", "its forward does not return one conv of its input"
    return y, capture.strategy, "its own forward, conv packed"


def packed_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A converted layer's forward while packed cells flow (``ctx.layout`` set): exact, and cheap where it can be."""
    ctx: MaskContext = layer._sparse_ctx
    layout: PackedLayout = ctx.layout
    y, strategy, why = None, "dense", "it is called with more than its input"
    if not args and not kwargs:
        if isinstance(layer, nn.modules.conv._ConvNd):
            y, strategy, why = (None, "dense", "a transposed convolution") if layer.transposed else \
                packed_conv(layer, x, layout)
        elif isinstance(layer, _MAXPOOLS):
            y, strategy, why = packed_max_pool(layer, x, layout)
        elif isinstance(layer, _AVGPOOLS):
            y, strategy, why = packed_avg_pool(layer, x, layout)
        elif isinstance(layer, ADAPTIVE):
            y, strategy, why = packed_global_pool(layer, x, layout)
        elif isinstance(layer, _NORMS):
            y, strategy, why = packed_norm(layer, x, layout)
        elif isinstance(layer, nn.LayerNorm):
            y, strategy, why = layer._dense_class.forward(layer, x), "direct", ""  # over channels: per site
        else:
            why = "a layer kind without a packed form"
    if y is not None:
        layout.note(layer, strategy, why)
        return y
    layout.note(layer, "dense", why)
    # the masked-dense behaviour on the unpacked map, packed again (exact, not faster)
    with suspended(ctx):
        y = layer(layout.unpack(x), *args, **kwargs)
    if y.ndim == x.ndim and all(s % g == 0 and s >= g for s, g in zip(y.shape[2:], layout.grid)) \
            and math.prod(y.shape[2:]) > 1:
        return layout.pack(y)
    return y

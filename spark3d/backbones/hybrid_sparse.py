"""ConvMAE's conv part on the visible cells only: the hybrid network's stages 1-2, token embedding and fusion convs.

The masked-dense path (the converted layers of :mod:`spark3d.sparse` on the whole map) computes every
site and zeroes the masked ones after each layer. Here only the visible cells of the token grid flow,
packed as ``(N = B·K, C, *cell)`` maps (:class:`~spark3d.sparse.packed.PackedLayout`, channels-last), and
each part of the network computes exactly what masked-dense computes at the visible sites:

- per-position parts (channel LayerNorm, GELU, the 1×1 convs as matrix products on the sites' rows,
  residual adds) act on the visible sites alone;
- patch-embedding and fusion convs have kernel = stride, so a cell maps onto its own output cell;
- the depthwise conv is the one operator that mixes positions: each cell is padded with its
  neighbours' sites (zeros where a neighbour is masked or outside: exactly what masked-dense reads),
  then a valid depthwise conv; its backward is the same on the output gradient with the flipped
  kernel, and the weight gradient a valid conv's over the padded blocks (torch's dense depthwise
  weight gradient with padding is the slow part of masked-dense: ~20x slower than on pre-padded input);
- stochastic depth draws one decision per sample, with the module itself on a ``(B, 1, …)`` tensor of
  ones: the same random numbers, in the same order, as masked-dense.

With every token visible the layout is one cell per sample (the whole volume), so the same code is
the fastest exact dense forward too. :func:`sparse_problem` says why a network cannot take this path
(a module replaced, a hook, a conv of another shape): this code knows the blocks' structure, so
anything else is refused rather than guessed.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ChannelLayerNorm
from ..sparse.packed import PackedLayout, channels_last
from .hybrid import ConvBlock, ConvStage, HybridEncoder, PatchEmbed

__all__ = ["sparse_problem", "cell_layout", "conv_stages", "token_parts", "tokens_of_cells", "depthwise_conv"]

_CONV_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# -------------------------------------------------------------------------------- what this path supports
def _dense_class(module: nn.Module) -> type:
    """The class a converted layer was made from (its own class when not converted)."""
    return getattr(module, "_dense_class", type(module))


def _tuple(value, nd: int) -> tuple[int, ...]:
    return (int(value),) * nd if isinstance(value, int) else tuple(int(v) for v in value)


def _conv_problem(conv: nn.Module, nd: int, kind: str) -> str | None:
    """Why ``conv`` is not a plain torch conv of this ``kind`` (``patch``, ``pointwise``, ``depthwise``)."""
    cls = _dense_class(conv)
    if not issubclass(cls, _CONV_CLASSES) or cls.forward is not _CONV_CLASSES[nd - 1].forward \
            or cls._conv_forward is not _CONV_CLASSES[nd - 1]._conv_forward:
        return f"is a {cls.__name__}, not a plain torch Conv{nd}d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"has padding {conv.padding!r} / padding_mode '{conv.padding_mode}' (zeros, as numbers, needed)"
    k, s, p, d = (_tuple(v, nd) for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    if kind == "patch" and (k != s or any(p) or any(v != 1 for v in d) or conv.groups != 1):
        return f"is not a patch conv (kernel {k} = stride {s}, no padding, no groups)"
    if kind == "pointwise" and (any(v != 1 for v in k + s + d) or any(p) or conv.groups != 1):
        return f"is not a 1x1 conv (kernel {k}, stride {s}, groups {conv.groups})"
    if kind == "depthwise":
        if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels or any(v != 1 for v in s):
            return f"is not a stride-1 depthwise conv (groups {conv.groups}, stride {s})"
        if any(lo > dd * (kk - 1) for lo, kk, dd in zip(p, k, d)):
            return f"pads more ({p}) than its kernel reaches"
    return None


def _exact_class(module: nn.Module, cls: type) -> str | None:
    if _dense_class(module) is not cls:
        return f"is a {_dense_class(module).__name__}, not {cls.__name__}"
    return None


def _module_problem(path: str, module: nn.Module) -> str | None:
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{path} has forward hooks (this path does not call the modules' forward)"
    return None


def _embed_problem(path: str, embed: nn.Module, nd: int) -> str | None:
    if _exact_class(embed, PatchEmbed):
        return f"{path} {_exact_class(embed, PatchEmbed)}"
    for name, why in (("proj", _conv_problem(embed.proj, nd, "patch")), ("norm", _exact_class(embed.norm, ChannelLayerNorm)),
                      ("act", _exact_class(embed.act, nn.GELU))):
        if why:
            return f"{path}.{name} {why}"
    return None


def _block_problem(path: str, block: nn.Module, nd: int) -> str | None:
    why = _exact_class(block, ConvBlock)
    if why:
        return f"{path} {why}"
    checks = [("norm1", _exact_class(block.norm1, ChannelLayerNorm)), ("norm2", _exact_class(block.norm2, ChannelLayerNorm)),
              ("conv1", _conv_problem(block.conv1, nd, "pointwise")), ("conv2", _conv_problem(block.conv2, nd, "pointwise")),
              ("dwconv", _conv_problem(block.dwconv, nd, "depthwise")), ("mlp", _exact_class(block.mlp, nn.Sequential))]
    if not checks[-1][1]:
        names = [n for n, _ in block.mlp.named_children()]
        checks += [("mlp", None if names == ["fc1", "act", "fc2"] else f"has parts {names}, not fc1, act, fc2")]
        if names == ["fc1", "act", "fc2"]:
            checks += [("mlp.fc1", _conv_problem(block.mlp.fc1, nd, "pointwise")),
                       ("mlp.act", _exact_class(block.mlp.act, nn.GELU)),
                       ("mlp.fc2", _conv_problem(block.mlp.fc2, nd, "pointwise"))]
    dp = _dense_class(block.drop_path)
    if dp is not nn.Identity and not (dp.__name__ == "DropPath" and dp.__module__.startswith("timm.")):
        checks.append(("drop_path", f"is a {dp.__name__}, not timm's DropPath (per-sample) or Identity"))
    for name, problem in checks:
        if problem:
            return f"{path}.{name} {problem}"
    return None


def sparse_problem(encoder: nn.Module) -> str | None:
    """Why the conv part of ``encoder`` cannot compute on packed visible cells (``<module path> <reason>``), or None."""
    if _exact_class(encoder, HybridEncoder):
        return f"encoder {_exact_class(encoder, HybridEncoder)}"
    nd = encoder.spatial_dims
    for path, module in encoder.named_modules(prefix="encoder"):
        if path.startswith("encoder.stage3.") and not path.startswith("encoder.stage3.embed"):
            continue  # the transformer blocks run on gathered tokens, their forward is called
        why = _module_problem(path, module)
        if why:
            return why
    for k in (1, 2):
        stage = getattr(encoder, f"stage{k}")
        why = _exact_class(stage, ConvStage) or _exact_class(stage.blocks, nn.Sequential)
        if why:
            return f"encoder.stage{k} {why}"
        why = _embed_problem(f"encoder.stage{k}.embed", stage.embed, nd)
        for i, block in enumerate(stage.blocks):
            why = why or _block_problem(f"encoder.stage{k}.blocks.{i}", block, nd)
        if why:
            return why
    why = _embed_problem("encoder.stage3.embed", encoder.stage3.embed, nd)
    for name in ("fuse1", "fuse2"):
        problem = _conv_problem(getattr(encoder, name), nd, "patch")
        why = why or (problem and f"encoder.{name} {problem}")
    return why


# -------------------------------------------------------------------------------- layouts and rows
def cell_layout(mask_b1g: torch.Tensor, visible_cells: int) -> PackedLayout:
    """The packed layout of a mask's visible cells; with every cell visible, one cell per sample (the whole map)."""
    if visible_cells == math.prod(mask_b1g.shape[2:]):
        whole = torch.ones(mask_b1g.shape[0], 1, *([1] * (mask_b1g.ndim - 2)), dtype=torch.bool, device=mask_b1g.device)
        return PackedLayout(whole, 1)
    return PackedLayout(mask_b1g, visible_cells)


def _rows(x_ncs: torch.Tensor) -> torch.Tensor:
    """``(N, C, *cell)`` channels-last → ``(N·V, C)``, the sites as rows (a view)."""
    return x_ncs.movedim(1, -1).reshape(-1, x_ncs.shape[1])


def _map(rows_vc: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Rows back to an ``(N, C, *cell)`` channels-last map of ``like``'s cells."""
    return rows_vc.view(like.shape[0], *like.shape[2:], rows_vc.shape[1]).movedim(-1, 1)


def _layer_norm(norm: nn.LayerNorm, rows_vc: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(rows_vc, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _pointwise(conv: nn.Module, rows_vc: torch.Tensor) -> torch.Tensor:
    return F.linear(rows_vc, conv.weight.view(conv.weight.shape[0], -1), conv.bias)


def _gelu(act: nn.GELU, rows_vc: torch.Tensor) -> torch.Tensor:
    return F.gelu(rows_vc, approximate=act.approximate)


def _patch_conv(conv: nn.Module, x_ncs: torch.Tensor) -> torch.Tensor:
    """A kernel = stride conv maps each cell onto its own output cell: computed as one matrix product of the
    patches' rows ``(N·G, C·k)`` with the flattened kernel, not by the conv kernel, whose bf16 channels-last form
    is wrong on some CPUs (oneDNN with AVX512-BF16: kernel = stride 4 onto one output site, 16 or 24 channels in;
    ``tests/test_convmae_sparse.py::test_patch_conv_equals_the_dense_conv_in_bf16``)."""
    nd = x_ncs.ndim - 2
    n, c, *size = x_ncs.shape
    k = _tuple(conv.stride, nd)
    g = [s // kk for s, kk in zip(size, k)]
    split = x_ncs.reshape(n, c, *[v for gg, kk in zip(g, k) for v in (gg, kk)])  # (N, C, g1, k1, g2, k2, …)
    order = [0, *(2 + 2 * a for a in range(nd)), 1, *(3 + 2 * a for a in range(nd))]  # (N, g…, C, k…)
    rows = split.permute(order).reshape(n * math.prod(g), c * math.prod(k))
    y = F.linear(rows, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
    return y.view(n, *g, y.shape[1]).movedim(-1, 1)  # channels-last (N, C_out, *g)


def _embed(embed: PatchEmbed, x_ncs: torch.Tensor) -> torch.Tensor:
    y = _patch_conv(embed.proj, x_ncs)
    return _map(_gelu(embed.act, _layer_norm(embed.norm, _rows(y))), y)


# -------------------------------------------------------------------------------- the depthwise conv
def _pad_cells(layout: PackedLayout, x_ncs: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """Each cell padded with its neighbours' sites (zeros where masked or outside); zero padding for whole maps."""
    if all(g == 1 for g in layout.grid):
        pads = [v for a in reversed(range(len(lo))) for v in (lo[a], hi[a])]
        return channels_last(F.pad(x_ncs, pads))
    return channels_last(layout.halo(x_ncs, lo, hi))


class _DepthwiseCells(torch.autograd.Function):
    """A stride-1 depthwise conv of packed cells: padded blocks, then a valid conv (see the module docs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layout: PackedLayout, lo, hi, dilation):
        block = _pad_cells(layout, x, lo, hi)
        groups = x.shape[1]
        y = _CONV[x.ndim - 2](block, weight.to(block.dtype), None if bias is None else bias.to(block.dtype),
                              1, 0, dilation, groups)
        ctx.layout, ctx.lo, ctx.hi, ctx.dilation, ctx.has_bias = layout, lo, hi, dilation, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, y.dtype)
        ctx.save_for_backward(block, weight)
        return channels_last(y)

    @staticmethod
    def backward(ctx, grad_y):
        block, weight = ctx.saved_tensors
        x_dtype, w_dtype, dtype = ctx.dtypes
        nd, groups = block.ndim - 2, block.shape[1]
        g = channels_last(grad_y.to(dtype))
        w = weight.to(dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the adjoint: the output gradient padded the other way, the flipped kernel
            g_block = _pad_cells(ctx.layout, g, ctx.hi, ctx.lo)
            grad_x = channels_last(_CONV[nd](g_block, w.flip(list(range(2, w.ndim))), None, 1, 0, ctx.dilation,
                                             groups)).to(x_dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                g, block.to(dtype), w, [weight.shape[0]] if ctx.has_bias else None, [1] * nd, [0] * nd,
                list(ctx.dilation), False, [0] * nd, groups, [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
            grad_w = None if grad_w is None else grad_w.to(w_dtype)
            grad_b = None if grad_b is None else grad_b.to(w_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def depthwise_conv(conv: nn.Module, x_ncs: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """``conv`` (a stride-1 depthwise conv with zero padding) on packed cells: what masked-dense computes at them."""
    nd = x_ncs.ndim - 2
    k, p, d = (_tuple(v, nd) for v in (conv.kernel_size, conv.padding, conv.dilation))
    hi = tuple(dd * (kk - 1) - pp for kk, pp, dd in zip(k, p, d))
    return _DepthwiseCells.apply(x_ncs, conv.weight, conv.bias, layout, p, hi, d)


# -------------------------------------------------------------------------------- blocks and stages
def _per_sample(drop_path: nn.Module, branch_vc: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """``branch * drop_path``'s per-sample factor, drawn by the module on ``(B, 1, …)`` ones as masked-dense draws it."""
    if isinstance(drop_path, nn.Identity) or not drop_path.training:
        return branch_vc
    ones = branch_vc.new_ones((layout.batch,) + (1,) * (layout.spatial_dims + 1))
    factor = drop_path(ones).view(layout.batch, 1, 1)
    return (branch_vc.view(layout.batch, -1, branch_vc.shape[1]) * factor).view_as(branch_vc)


def _block(block: ConvBlock, x_ncs: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """``x + dp(conv2(dwconv(conv1(norm1(x)))))``, then ``x + dp(mlp(norm2(x)))``, on the visible sites."""
    x_vc = _rows(x_ncs)
    h = _map(_pointwise(block.conv1, _layer_norm(block.norm1, x_vc)), x_ncs)
    h = _pointwise(block.conv2, _rows(depthwise_conv(block.dwconv, h, layout)))
    x_vc = x_vc + _per_sample(block.drop_path, h, layout)
    h = _pointwise(block.mlp.fc2, _gelu(block.mlp.act, _pointwise(block.mlp.fc1, _layer_norm(block.norm2, x_vc))))
    x_vc = x_vc + _per_sample(block.drop_path, h, layout)
    return _map(x_vc, x_ncs)


def _stage(stage: ConvStage, x_ncs: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    x_ncs = _embed(stage.embed, x_ncs)
    for block in stage.blocks:
        x_ncs = _block(block, x_ncs, layout)
    return x_ncs


def conv_stages(encoder: HybridEncoder, x_ncs: torch.Tensor, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 1 and 2 on packed input cells ``layout.pack(x)``: the stride-4 and stride-8 features, packed."""
    f4 = _stage(encoder.stage1, x_ncs, layout)
    return f4, _stage(encoder.stage2, f4, layout)


def tokens_of_cells(t_ncs: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Packed token-grid maps ``(N, D, *cell)`` → ``(B, K, D)``: each sample's visible tokens in raster order."""
    if math.prod(t_ncs.shape[2:]) != 1 and math.prod(layout.grid) != 1:
        raise ValueError(f"cells of {tuple(t_ncs.shape[2:])} tokens on a grid {layout.grid}: not in raster order")
    return _rows(t_ncs).view(layout.batch, -1, t_ncs.shape[1])


def token_parts(encoder: HybridEncoder, f4: torch.Tensor, f8: torch.Tensor,
                layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The visible tokens ``(B, K, D)`` of the stage-3 patch embedding, and of the fusion convs' sum."""
    embedded = tokens_of_cells(_embed(encoder.stage3.embed, f8), layout)
    fused = tokens_of_cells(_patch_conv(encoder.fuse1, f4), layout) + tokens_of_cells(_patch_conv(encoder.fuse2, f8), layout)
    return embedded, fused

"""Judging each tensor op a probe pass runs: does it keep positions apart, pool globally, or mix positions?

:class:`OpJudge` is the half of :class:`~spark3d.sparse.trace.OpRecorder` that knows ops: per kind of op
(elementwise, reductions, ops along one axis, views and permutes, tiling, concatenation, indexing, matmuls
and einsums, functional spatial operators) it follows the layouts of :mod:`spark3d.sparse.layout` to the
op's outputs and records a verdict where positions meet: ``"exact"`` (a global mean / max, made exact
under a mask) or ``"refused"`` (with why).
"""

from __future__ import annotations

from typing import Any

import torch

from .layers import match_global_pool
from .layout import (
    PRIMES, Layout, channels_first_problem, dims_of, display_name, generic, has_positions, is_position, reshape_layout,
    shape_on_meta, tensors_in,
)

__all__ = ["OpJudge"]

# op tables (names after dropping ``__`` dunders and a trailing in-place ``_``)

_ELEMENTWISE = set("""
abs absolute neg negative positive pos add sub subtract rsub mul multiply div divide true_divide floor_divide
floordiv truediv mod remainder fmod pow float_power sqrt rsqrt exp exp2 expm1 log log2 log10 log1p sin cos tan
asin acos atan atan2 arcsin arccos arctan sinh cosh tanh asinh acosh atanh sigmoid logit sign sgn signbit erf
erfc erfinv reciprocal square clamp clip clamp_min clamp_max floor ceil round trunc frac fix maximum minimum fmax
fmin where lerp addcmul addcdiv eq ne lt le gt ge greater greater_equal less less_equal equal logical_and
logical_or logical_not logical_xor bitwise_and bitwise_or bitwise_xor bitwise_not and or xor invert isnan isinf
isfinite isneginf isposinf nan_to_num masked_fill copysign hypot xlogy relu relu6 leaky_relu elu selu celu gelu
silu mish hardswish hardsigmoid hardtanh hardshrink softshrink softplus softsign tanhshrink threshold logsigmoid
prelu rrelu dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout feature_dropout to type
float double half bfloat16 int long bool byte short char contiguous clone detach requires_grad type_as copy zero
fill bernoulli uniform normal exponential cpu cuda retain_grad channel_shuffle native_channel_shuffle data real
""".split())
_LIKE_FACTORIES = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}
_FACTORIES = set("""zeros ones empty full arange range linspace logspace eye rand randn randint randperm tensor
as_tensor from_numpy new_zeros new_ones new_empty new_full new_tensor scalar_tensor""".split())
_REDUCTIONS = set("""sum nansum mean nanmean prod amax amin max min aminmax argmax argmin all any var std var_mean
std_mean norm vector_norm linalg_vector_norm logsumexp median nanmedian mode count_nonzero""".split())
# ops along one axis that keep the others: (position of the dim argument, its keyword, default)
_ALONG = {"softmax": (1, "dim", None), "log_softmax": (1, "dim", None), "softmin": (1, "dim", None),
          "cumsum": (1, "dim", 0), "cumprod": (1, "dim", 0), "cummax": (1, "dim", 0), "cummin": (1, "dim", 0),
          "logcumsumexp": (1, "dim", 0), "sort": (1, "dim", -1), "argsort": (1, "dim", -1),
          "topk": (2, "dim", -1), "kthvalue": (2, "dim", -1), "normalize": (2, "dim", 1), "glu": (1, "dim", -1),
          "diff": (2, "dim", -1), "flip": (1, "dims", ()), "roll": (2, "dims", "all"), "rot90": (2, "dims", (0, 1)),
          "fliplr": (None, None, 1), "flipud": (None, None, 0), "chunk": (2, "dim", 0), "split": (2, "dim", 0),
          "split_with_sizes": (2, "dim", 0), "tensor_split": (2, "dim", 0), "unbind": (1, "dim", 0),
          "narrow": (1, "dim", 0), "select": (1, "dim", 0), "repeat_interleave": (2, "dim", "all"),
          "index_select": (1, "dim", 0), "gather": (1, "dim", 0), "take_along_dim": (2, "dim", "all"),
          "scatter": (1, "dim", 0), "scatter_add": (1, "dim", 0), "index_add": (1, "dim", 0),
          "index_copy": (1, "dim", 0), "index_fill": (1, "dim", 0), "unfold": (1, "dimension", 0)}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T", "mT", "H", "mH",
             "adjoint"}
_MATMULS = {"matmul", "mm", "bmm", "rmatmul"}
_MIXERS = {
    "a convolution called functionally reads neighbouring positions (an nn.Conv layer is covered)":
        "conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d conv_tbc convolution".split(),
    "pooling called functionally mixes neighbouring positions (an nn pooling layer is covered)":
        """avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d max_pool1d_with_indices
        max_pool2d_with_indices max_pool3d_with_indices lp_pool1d lp_pool2d lp_pool3d adaptive_avg_pool1d
        adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
        fractional_max_pool2d fractional_max_pool3d max_unpool1d max_unpool2d max_unpool3d""".split(),
    "resamples positions (interpolation / grid sampling)":
        "interpolate upsample upsample_nearest upsample_bilinear grid_sample affine_grid".split(),
    "pads the spatial axes, which shifts positions off the mask grid": ["pad"],
    "moves positions into channels or windows (or back)": "pixel_shuffle pixel_unshuffle fold".split(),
    "a normalisation called functionally takes statistics over all positions, masked ones included "
    "(the nn layer is covered)": "batch_norm instance_norm group_norm local_response_norm".split(),
    "attention mixes every position with every other":
        "scaled_dot_product_attention multi_head_attention_forward".split(),
}
_MIXER_WHY = {name: why for why, names in _MIXERS.items() for name in names}


def _name(func: Any) -> str:
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    name = name.strip("_") if name.startswith("__") else name
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    if name not in _ELEMENTWISE and name[:1] in ("r", "i") and name[1:] in _ELEMENTWISE:
        name = name[1:]  # __radd__, __iadd__
    return name


def _subsamples(name: str, args: tuple, kwargs: dict) -> bool:
    """A pooling with a window of one site and no padding: a strided subsampling, per position like a 1x1 conv."""
    if not name.startswith(("avg_pool", "max_pool")):
        return False
    kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
    padding = args[3] if len(args) > 3 else kwargs.get("padding", 0)
    ones = all(k == 1 for k in ((kernel,) if isinstance(kernel, int) else kernel))
    return ones and all(p == 0 for p in ((padding,) if isinstance(padding, int) else padding))


_ALONG_WHY = {
    **dict.fromkeys(("softmax", "log_softmax", "softmin", "normalize"), "normalises along a spatial axis (over positions)"),
    **dict.fromkeys(("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "diff"),
                    "accumulates or differences neighbouring positions"),
    **dict.fromkeys(("sort", "argsort", "topk", "kthvalue"), "ranks positions against each other"),
    **dict.fromkeys(("flip", "roll", "rot90", "fliplr", "flipud"), "flips, rotates or rolls positions"),
    **dict.fromkeys(("chunk", "split", "split_with_sizes", "tensor_split", "unbind", "narrow", "select", "glu"),
                    "splits or crops a spatial axis"),
    **dict.fromkeys(("index_select", "gather", "take_along_dim", "scatter", "scatter_add", "index_add", "index_copy",
                     "index_fill", "repeat_interleave"), "gathers, scatters or repeats positions by index"),
    "unfold": "takes sliding windows of positions",
}


class OpJudge:
    """Per-op rules; the recorder provides ``spatial_dims``, ``_layouts``, ``_judge``, ``_set`` and ``_positional``."""

    spatial_dims: int

    def _observe(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = _name(func)
        ins = tensors_in(args) + tensors_in(list(kwargs.values()))
        layouts = [self._layouts.get(t) for t in ins]
        outs = tensors_in(out)
        if name == "setitem":
            return self._index(func, args[0], args[1], None, writes=True)
        if not outs:
            if name in ("item", "tolist", "numpy") and any(self._positional(lay) for lay in layouts):
                self._judge(func, "refused", "reads the values of positions into Python")
            return
        if name in _FACTORIES or all(lay is None for lay in layouts):
            return  # constants in, constants out
        x, lx = ins[0], layouts[0]
        if name in _LIKE_FACTORIES:
            return self._set(outs[0], lx)
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            name = "maximum"  # torch.max(a, b): elementwise
        if name in _ELEMENTWISE:
            return self._elementwise(func, ins, layouts, outs)
        if lx is None and name not in ("matmul", "mm", "bmm", "rmatmul", "einsum", "cat", "concat", "concatenate",
                                       "stack", "addmm", "baddbmm", "addbmm"):
            lx = generic(x.shape, False)
        if name in _REDUCTIONS:
            return self._reduction(func, args, kwargs, x, lx, outs)
        if name == "unfold" and display_name(func).startswith("F."):
            name = "fold"
        if name in _ALONG:
            return self._along(func, name, args, kwargs, x, lx, outs)
        if name in _RESHAPES:
            return self._set(outs[0], reshape_layout(lx, outs[0].shape) or generic(outs[0].shape, self._positional(lx)))
        if name in _PERMUTES:
            shape = shape_on_meta(func, args, kwargs, x.ndim)
            perm = None if shape is None else [PRIMES.index(s) for s in shape]
            return self._set(outs[0], generic(outs[0].shape, self._positional(lx)) if perm is None
                             else tuple(lx[p] for p in perm))
        if name in ("expand", "expand_as", "broadcast_to", "repeat", "tile"):
            return self._tile(func, name, x, lx, outs[0])
        if name in ("cat", "concat", "concatenate", "stack"):
            return self._concat(func, name, args, kwargs, outs[0])
        if name == "getitem":
            return self._index(func, x, args[1], outs[0], writes=False)
        if name in _MATMULS or name in ("addmm", "baddbmm", "addbmm"):
            return self._matmul(func, name, args, outs[0])
        if name == "einsum":
            return self._einsum(func, args, outs[0])
        if name == "linear":
            if has_positions(lx[-1]) or self._positional(layouts[1] if len(layouts) > 1 else None):
                self._judge(func, "refused", "applies a linear map across positions (its input's last axis holds "
                            "positions)")
            return self._set(outs[0], (*lx[:-1], (("C", outs[0].shape[-1]),)))
        if name in ("layer_norm", "rms_norm"):
            k = len(args[1]) if len(args) > 1 and not isinstance(args[1], int) else 1
            if any(has_positions(a) for a in lx[-k:]):
                self._judge(func, "refused", "normalises over axes that hold positions")
            return self._set(outs[0], lx)
        if name in _MIXER_WHY:
            return self._mixer(func, name, args, kwargs, lx, outs[0])
        if self._positional(lx) or any(self._positional(lay) for lay in layouts):
            self._judge(func, "refused", "an operation spark3d does not know; it may mix positions")
        for t in outs:
            self._set(t, lx if tuple(t.shape) == tuple(x.shape) else generic(t.shape, self._positional(lx)))

    # ------------------------------------------------------------------ rules per kind of op
    def _elementwise(self, func: Any, ins: list, layouts: list, outs: list) -> None:
        shape = outs[0].shape
        n, result, conflict = len(shape), [], False
        for i in range(n):
            chosen = None
            for t, lay in zip(ins, layouts):
                j = i - (n - t.ndim)
                if lay is None or j < 0 or t.shape[j] == 1 or not lay[j]:
                    continue
                axis = lay[j]
                mine = [tok for tok, _ in axis if is_position(tok)]
                theirs = [tok for tok, _ in (chosen or ()) if is_position(tok)]
                if chosen is None or (mine and not theirs):
                    chosen = axis
                elif mine and theirs and mine != theirs:
                    conflict = True
            result.append(chosen if chosen is not None else ((None, shape[i]),))
        if conflict:
            self._judge(func, "refused", "combines values of different positions (its inputs' spatial axes disagree)")
        for t in outs:
            self._set(t, tuple(result) if t.shape == shape else generic(t.shape, any(has_positions(a) for a in result)))

    def _reduction(self, func: Any, args: tuple, kwargs: dict, x: torch.Tensor, lx: Layout, outs: list) -> None:
        shape = shape_on_meta(func, args, kwargs, x.ndim)
        if shape is None:
            reduced = list(range(x.ndim))
        else:
            reduced = [i for i, p in enumerate(PRIMES[: x.ndim]) if p not in shape]
        positional = [i for i in reduced if has_positions(lx[i])]
        if positional:
            every = all(i in reduced for i, a in enumerate(lx) if has_positions(a))
            if (every and match_global_pool(func, args, kwargs) is not None
                    and channels_first_problem(lx, self.spatial_dims) is None and len(lx) == 2 + self.spatial_dims):
                self._judge(func, "exact", "a global pooling over every position; under a mask it is taken over the "
                            "visible sites only")
            elif every:
                self._judge(func, "refused", "a global statistic over every position (a sum, norm or variance, as in "
                            "global response normalisation); only a global mean or max is made exact under a mask")
            else:
                self._judge(func, "refused", "reduces over some of the spatial axes only, mixing positions along them")
        keep = shape is not None and len(shape) == x.ndim
        layout = tuple(() if i in reduced else a for i, a in enumerate(lx)) if keep else tuple(
            a for i, a in enumerate(lx) if i not in reduced)
        for t in outs:
            self._set(t, layout)

    def _along(self, func: Any, name: str, args: tuple, kwargs: dict, x: torch.Tensor, lx: Layout, outs: list) -> None:
        position, keyword, default = _ALONG[name]
        if keyword in kwargs:
            value = kwargs[keyword]
        elif position is not None and len(args) > position:
            value = args[position]
        else:
            value = default
        if value is None and name in ("softmax", "log_softmax", "softmin"):
            value = 0 if x.ndim in (0, 1, 3) else 1  # torch's implicit softmax axis
        dims = dims_of(value, x.ndim)
        if any(has_positions(lx[d]) for d in dims):
            self._judge(func, "refused", _ALONG_WHY.get(name, "works along a spatial axis"))
        for t in outs:
            if t.ndim == x.ndim:
                self._set(t, lx)
            elif t.ndim == x.ndim - 1 and len(dims) == 1:
                self._set(t, tuple(a for i, a in enumerate(lx) if i != dims[0]))
            else:
                self._set(t, generic(t.shape, self._positional(lx)))

    def _tile(self, func: Any, name: str, x: torch.Tensor, lx: Layout, out: torch.Tensor) -> None:
        new = out.ndim - x.ndim
        layout = [((None, n),) for n in out.shape[:new]]
        for i, axis in enumerate(lx):
            n_in, n_out = x.shape[i], out.shape[new + i]
            if n_in == 1 or not axis:
                layout.append(((None, n_out),))
            elif n_out != n_in and has_positions(axis):
                self._judge(func, "refused", "tiles positions along a spatial axis")
                layout.append((("P", n_out),))
            else:
                layout.append(axis)
        self._set(out, tuple(layout))

    def _concat(self, func: Any, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        tensors = list(args[0]) if args else list(kwargs.get("tensors", ()))
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        labelled = [(t, self._layouts.get(t)) for t in tensors if self._layouts.get(t) is not None]
        if not labelled:
            return
        t0, base = labelled[0]
        if name == "stack":
            dim %= out.ndim
            return self._set(out, (*base[:dim], ((None, out.shape[dim]),), *base[dim:]))
        dim %= out.ndim
        if any(has_positions(lay[dim]) for _, lay in labelled):
            self._judge(func, "refused", "concatenates along a spatial axis")
        self._set(out, (*base[:dim], (("C", out.shape[dim]),), *base[dim + 1:]))

    def _index(self, func: Any, x: torch.Tensor, index: Any, out: torch.Tensor | None, writes: bool) -> None:
        lx = self._layouts.get(x)
        if lx is None:
            return
        items = index if isinstance(index, tuple) else (index,)

        def consumed(item: Any) -> int:
            if item is None or item is Ellipsis:
                return 0
            return item.ndim if isinstance(item, torch.Tensor) and item.dtype == torch.bool else 1

        total, d, layout, why = sum(consumed(i) for i in items), 0, [], None
        for item in items:
            if item is Ellipsis:
                layout.extend(lx[d: d + x.ndim - total])
                d += x.ndim - total
            elif item is None:
                layout.append(())
            elif isinstance(item, slice):
                if len(range(x.shape[d])[item]) != x.shape[d] and has_positions(lx[d]):
                    why = "crops or strides positions along a spatial axis"
                layout.append(lx[d])
                d += 1
            elif isinstance(item, int):
                if has_positions(lx[d]):
                    why = "picks single positions along a spatial axis"
                d += 1
            else:
                k = consumed(item)
                if any(has_positions(a) for a in lx[d: d + k]):
                    why = "gathers positions by index"
                layout.append((("C", 0),))
                d += k
        layout.extend(lx[d:])
        if why:
            self._judge(func, "refused", ("writes at chosen positions: " if writes else "") + why)
        if out is not None:
            self._set(out, tuple(layout) if len(layout) == out.ndim else generic(out.shape, self._positional(lx)))

    def _matmul(self, func: Any, name: str, args: tuple, out: torch.Tensor) -> None:
        a, b = (args[1], args[0]) if name == "rmatmul" else (args[1], args[2]) if name in ("addmm", "baddbmm", "addbmm") \
            else (args[0], args[1])
        la = self._layouts.get(a) or generic(a.shape, False)
        lb = self._layouts.get(b) or generic(b.shape, False)
        la = la if a.ndim > 1 else ((), *la)
        lb = lb if b.ndim > 1 else (*lb, ())
        if has_positions(la[-1]) or has_positions(lb[-2]):
            self._judge(func, "refused", "a matmul that sums over positions (positions flattened into its contracted axis)")
        elif has_positions(la[-2]) and has_positions(lb[-1]):
            self._judge(func, "refused", "a matmul that pairs every position with every other (attention-like)")
        batch = la[:-2] if len(la) >= len(lb) else lb[:-2]
        layout = (*batch, la[-2], lb[-1])
        layout = layout[1:] if a.ndim == 1 else layout
        layout = layout[:-1] if b.ndim == 1 else layout
        self._set(out, layout)

    def _einsum(self, func: Any, args: tuple, out: torch.Tensor) -> None:
        equation = args[0].replace(" ", "")
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        lhs, _, rhs = equation.partition("->")
        terms = lhs.split(",")
        if "..." in equation or not rhs:
            if any(self._positional(self._layouts.get(t)) for t in operands):
                self._judge(func, "refused", "an einsum with '...' or an implicit output over positions is not analysed")
            return self._set(out, generic(out.shape, any(self._positional(self._layouts.get(t)) for t in operands)))
        letters: dict[str, list[tuple[int, tuple]]] = {}
        for k, (term, t) in enumerate(zip(terms, operands)):
            lay = self._layouts.get(t) or generic(t.shape, False)
            for j, letter in enumerate(term):
                letters.setdefault(letter, []).append((k, lay[j]))
        if any(has_positions(axis) for c in letters if c not in rhs for _, axis in letters[c]):
            self._judge(func, "refused", "an einsum that sums over positions")
        sources = [{k for k, axis in letters[c] if has_positions(axis)} for c in rhs]
        sources = [s for s in sources if s]
        if any(not (s & r) for s in sources for r in sources):
            self._judge(func, "refused", "an einsum that pairs positions of different operands (attention-like)")
        layout = tuple(next((ax for _, ax in letters[c] if has_positions(ax)), next((ax for _, ax in letters[c] if ax), ()))
                       for c in rhs)
        self._set(out, layout)

    def _mixer(self, func: Any, name: str, args: tuple, kwargs: dict, lx: Layout, out: torch.Tensor) -> None:
        if not self._positional(lx) or _subsamples(name, args, kwargs):
            pass
        elif (name.startswith("adaptive_") and match_global_pool(func, args, kwargs) is not None
              and channels_first_problem(lx, self.spatial_dims) is None and len(lx) == 2 + self.spatial_dims):
            self._judge(func, "exact", "a global pooling over every position; under a mask it is taken over the "
                        "visible sites only")
        else:
            self._judge(func, "refused", _MIXER_WHY[name])
        if out.ndim == len(lx) >= 2:
            self._set(out, (lx[0], (("C", out.shape[1]),), *lx[2:]))
        else:
            self._set(out, generic(out.shape, self._positional(lx)))

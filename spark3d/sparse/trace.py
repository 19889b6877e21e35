"""What a network runs outside its covered layers during a probe pass, and whether each op keeps positions apart.

:class:`OpRecorder` is a torch function mode plus forward hooks: it attributes every tensor operation to
the innermost running module and follows, through every op, which axes of each tensor carry positions
(a *layout*: per axis, the spatial axes, batch or feature axes folded into it). From that it judges
each op that runs outside a covered layer (convs, pools, norms: :mod:`spark3d.sparse.layers`):

- per position (elementwise maths, activations, channel ops and reductions, additions, channel
  concatenation, views and permutes that keep the spatial axes): fine;
- a mean or max over every spatial axis of a ``(B, C, *S)`` map (squeeze-excitation): made exact under a
  mask (the block is converted to :class:`~spark3d.sparse.layers.SparseGlobalPoolMixin`);
- anything that mixes positions (functional convs and pools, interpolation, padding, spatial reductions
  and crops, rolls, flips, spatial concatenation, matmuls over or between positions): refused, with
  the module path, the op and why;
- an op it does not know, applied to a tensor that carries positions: refused (never silently passed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .layers import match_global_pool

__all__ = ["TracedOp", "OpTrace", "OpRecorder"]

# A layout has one entry per tensor axis: a tuple of atoms (token, size) whose sizes multiply to the axis
# size (() for size 1). Tokens: "B" batch, "C" features, None constant along the axis, an int k the
# k-th spatial axis, "P" positions no longer laid out on the mask grid (a split or rearranged axis).
Layout = tuple


def _pos(token: Any) -> bool:
    return token == "P" or (isinstance(token, int) and not isinstance(token, bool))


def _has_pos(axis: tuple) -> bool:
    return any(_pos(tok) for tok, _ in axis)


def _fit(layout: Layout, shape: Sequence[int]) -> Layout:
    """``layout`` with its atoms made consistent with ``shape`` (same number of axes)."""
    out = []
    for axis, n in zip(layout, shape):
        if n == 1:
            out.append(())
        elif axis and _prod(s for _, s in axis) == n:
            out.append(axis)
        elif len(axis) == 1:
            out.append(((axis[0][0], n),))
        else:
            out.append((("P" if _has_pos(axis) else (axis[0][0] if axis else None), n),))
    return tuple(out)


def _prod(values: Iterable[int]) -> int:
    p = 1
    for v in values:
        p *= v
    return p


def _generic(shape: Sequence[int], positional: bool) -> Layout:
    return _fit(tuple(((("P" if positional else "C"), n),) for n in shape), shape)


def _reshape(layout: Layout, shape: Sequence[int]) -> Layout | None:
    """Follow atoms through a view/reshape; a spatial atom split across axes becomes "P". None if it cannot."""
    queue = [a for axis in layout for a in axis]
    out = []
    for n in shape:
        got, prod = [], 1
        while prod < n:
            if not queue:
                return None
            tok, s = queue.pop(0)
            if n % (prod * s) == 0:
                got.append((tok, s))
                prod *= s
                continue
            need = n // prod
            if n % prod or s % need:
                return None
            tok = "P" if _pos(tok) else tok
            got.append((tok, need))
            queue.insert(0, (tok, s // need))
            prod *= need
        out.append(tuple(got))
    return None if queue else tuple(out)


def channels_first_problem(layout: Layout | None, spatial_dims: int) -> str | None:
    """Why a ``(B, C, *S)`` layer cannot take this input under a mask, or None when it can."""
    if layout is None or not any(_has_pos(a) for a in layout):
        return None
    if len(layout) != 2 + spatial_dims:
        return f"it expects (B, C, *S) with {spatial_dims} spatial axes, and its input's positions are laid out on {len(layout)} axes"
    if _has_pos(layout[0]) or _has_pos(layout[1]):
        return "its input has positions folded into the batch or channel axis"
    for k, axis in enumerate(layout[2:]):
        if axis and not (len(axis) == 1 and axis[0][0] in (k, None)):
            return "its input's spatial axes are rearranged (not on the mask grid any more)"
    return None


@dataclass(frozen=True)
class TracedOp:
    """One judged operation: where it ran, what it was, and the verdict (``"refused"`` or ``"exact"``)."""

    path: str
    module_type: str
    op: str
    verdict: str
    why: str
    enclosing: tuple[str, ...] = ()  # paths of the running modules, outermost first (for ``trusted=``)

    def line(self) -> str:
        return f"{self.path or '<root>'} ({self.module_type}): {self.op} — {self.why}"


@dataclass
class OpTrace:
    """The judged operations of one probe pass and the module paths that ran."""

    ops: list[TracedOp] = field(default_factory=list)
    ran: set[str] = field(default_factory=set)

    def select(self, verdict: str, only: Iterable[str] | None = None, skip: Callable[[TracedOp], bool] | None = None
               ) -> list[TracedOp]:
        """Ops with this verdict, one per (path, op, why), inside ``only`` and not ``skip``-ped."""
        only = None if only is None else set(only)
        seen, out = set(), []
        for op in self.ops:
            key = (op.path, op.op, op.why)
            if op.verdict != verdict or key in seen or (only is not None and op.path not in only):
                continue
            if skip is not None and skip(op):
                continue
            seen.add(key)
            out.append(op)
        return out

    def merge(self, other: "OpTrace") -> "OpTrace":
        return OpTrace(self.ops + other.ops, self.ran | other.ran)


# --------------------------------------------------------------------------------------------
# op tables (names after dropping ``__`` dunders and a trailing in-place ``_``)
# --------------------------------------------------------------------------------------------

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
_IGNORED = set("""size dim numel stride is_contiguous is_floating_point is_complex element_size data_ptr storage_offset
get_device len bool format repr hash index nelement ndimension has_names is_nonzero is_same_size""".split())
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


def _display(func: Any) -> str:
    name = getattr(func, "__name__", "?")
    if name == "__get__":
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    if getattr(func, "__objclass__", None) is not None or getattr(func, "__qualname__", "").startswith("Tensor."):
        return f"Tensor.{name}"
    if getattr(nn.functional, name, None) is func or getattr(func, "__module__", "") in ("torch.nn.functional", "torch._C._nn"):
        return f"F.{name}"
    if name.startswith("linalg_"):
        return f"torch.linalg.{name[len('linalg_'):]}"
    return f"torch.{name}"


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    return []


def _dims(value: Any, ndim: int) -> list[int]:
    if value == "all" or value is None:
        return list(range(ndim))
    values = (value,) if isinstance(value, int) else tuple(value)
    return [int(v) % max(ndim, 1) for v in values]


def _subsamples(name: str, args: tuple, kwargs: dict) -> bool:
    """A pooling with a window of one site and no padding: a strided subsampling, per position like a 1x1 conv."""
    if not name.startswith(("avg_pool", "max_pool")):
        return False
    kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
    padding = args[3] if len(args) > 3 else kwargs.get("padding", 0)
    ones = all(k == 1 for k in ((kernel,) if isinstance(kernel, int) else kernel))
    return ones and all(p == 0 for p in ((padding,) if isinstance(padding, int) else padding))


_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19)


def _on_meta(func: Any, args: tuple, kwargs: dict, ndim: int) -> tuple[int, ...] | None:
    """The result shape of ``func`` on a stand-in input whose axes have distinct prime sizes (None if it fails)."""
    if ndim > len(_PRIMES):
        return None
    meta = torch.empty(_PRIMES[:ndim], device="meta")
    try:
        out = func(meta, *args[1:], **kwargs)
    except Exception:
        return None
    first = _tensors(out)
    return tuple(first[0].shape) if first else None


_ALONG_WHY = {
    **dict.fromkeys(("softmax", "log_softmax", "softmin", "normalize"), "normalises along a spatial axis (over positions)"),
    **dict.fromkeys(("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "diff"), "accumulates or differences neighbouring positions"),
    **dict.fromkeys(("sort", "argsort", "topk", "kthvalue"), "ranks positions against each other"),
    **dict.fromkeys(("flip", "roll", "rot90", "fliplr", "flipud"), "flips, rotates or rolls positions"),
    **dict.fromkeys(("chunk", "split", "split_with_sizes", "tensor_split", "unbind", "narrow", "select", "glu"),
                    "splits or crops a spatial axis"),
    **dict.fromkeys(("index_select", "gather", "take_along_dim", "scatter", "scatter_add", "index_add", "index_copy",
                     "index_fill", "repeat_interleave"), "gathers, scatters or repeats positions by index"),
    "unfold": "takes sliding windows of positions",
}


class OpRecorder(TorchFunctionMode):
    """Records and judges the ops ``network`` runs outside covered layers: enter it, run a probe, read ``.trace``.

    Args:
        network: the module whose forward is probed (module paths are relative to it, after ``prefix``).
        spatial_dims: spatial axes of the feature maps.
        covered: ``module -> "first" | "last" | None``: a covered layer taking ``(B, C, *S)`` input
            ("first") or channels-last input ("last"), or not a covered layer.
        prefix: module path of ``network`` inside the network the paths should be relative to.
    """

    def __init__(self, network: nn.Module, spatial_dims: int, covered: Callable[[nn.Module], str | None],
                 prefix: str = "") -> None:
        super().__init__()
        self.network, self.spatial_dims, self.covered, self.prefix = network, int(spatial_dims), covered, prefix
        self.trace = OpTrace()
        self._layouts = WeakIdKeyDictionary()
        self._stack: list[tuple[str, nn.Module, str | None, Any]] = []  # (path, module, covered kind, input layout)
        self._covered_depth = 0
        self._busy = 0
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ entering, inputs, hooks
    def __enter__(self) -> "OpRecorder":
        for name, module in self.network.named_modules():
            path = ".".join(p for p in (self.prefix, name) if p)
            kind = self.covered(module)
            self._handles.append(module.register_forward_pre_hook(
                lambda m, a, k, path=path, kind=kind: self._enter_module(path, kind, m, a, k), with_kwargs=True))
            self._handles.append(module.register_forward_hook(
                lambda m, a, k, out, kind=kind: self._leave_module(kind, m, out), with_kwargs=True))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return super().__exit__(*exc)

    def input(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """Mark ``x`` as the network input: ``(B, C, *S)`` (or ``(B, *S, C)``); returns it."""
        self._layouts[x] = self._canonical(x, channels_last)
        return x

    @staticmethod
    def _canonical(x: torch.Tensor, channels_last: bool = False) -> Layout:
        spatial = tuple(((k, 0),) for k in range(x.ndim - 2))
        batch, channels = (("B", 0),), (("C", 0),)
        return _fit((batch, *spatial, channels) if channels_last else (batch, channels, *spatial), x.shape)

    def _enter_module(self, path: str, kind: str | None, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._busy += 1
        try:
            self.trace.ran.add(path)
            x = next(iter(_tensors(args) + _tensors(list(kwargs.values()))), None)
            layout = None if x is None else self._layouts.get(x)
            if kind is not None and self._covered_depth == 0 and layout is not None:
                if kind == "first":
                    problem = channels_first_problem(layout, self.spatial_dims)
                else:
                    problem = "it normalises its last axis, which holds positions" if _has_pos(layout[-1]) else None
                if problem:  # judged here; its output starts afresh, so one cause gives one refusal
                    self._record(path, module, f"{type(module).__name__} (input)", "refused", problem)
                    layout = self._canonical(x)
            self._stack.append((path, module, kind, (layout, None if x is None else tuple(x.shape))))
            self._covered_depth += kind is not None
        finally:
            self._busy -= 1

    def _leave_module(self, kind: str | None, module: nn.Module, output: Any) -> None:
        self._busy += 1
        try:
            while self._stack:
                path, frame_module, frame_kind, (layout, shape) = self._stack.pop()
                self._covered_depth -= frame_kind is not None
                if frame_module is module:
                    break
            else:
                return
            outs = _tensors(output)
            if kind is None or self._covered_depth or layout is None or not outs:
                return
            out = outs[0]
            if tuple(out.shape) == shape:
                self._set(out, layout)
            elif kind == "first" and out.ndim == len(layout):
                self._set(out, (layout[0], (("C", out.shape[1]),), *layout[2:]))
            else:
                self._set(out, _generic(out.shape, any(_has_pos(a) for a in layout)))
        finally:
            self._busy -= 1

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, path: str, module: nn.Module, op: str, verdict: str, why: str) -> None:
        typ = f"{type(module).__module__}.{type(module).__qualname__}"
        self.trace.ops.append(TracedOp(path, typ, op, verdict, why, tuple(f[0] for f in self._stack)))

    def _judge(self, func: Any, verdict: str, why: str) -> None:
        path, module = (self._stack[-1][0], self._stack[-1][1]) if self._stack else (self.prefix, self.network)
        self._record(path, module, _display(func), verdict, why)

    def _set(self, t: torch.Tensor, layout: Layout | None) -> None:
        if layout is None:
            self._layouts.pop(t, None)
        else:
            self._layouts[t] = _fit(layout, t.shape) if len(layout) == t.ndim else _generic(
                t.shape, any(_has_pos(a) for a in layout))

    def _positional(self, layout: Layout | None) -> bool:
        return layout is not None and any(_has_pos(a) for a in layout)

    # ------------------------------------------------------------------ the function mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._busy or self._covered_depth:
            return out
        self._busy += 1
        try:
            self._observe(func, args, kwargs, out)
        except Exception as err:  # never let a gap in the analysis pass silently
            ins = [self._layouts.get(t) for t in _tensors(args)]
            if any(self._positional(lay) for lay in ins):
                self._judge(func, "refused", f"spark3d could not follow this operation ({type(err).__name__}: {err})")
        finally:
            self._busy -= 1
        return out

    def _observe(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = _name(func)
        ins = _tensors(args) + _tensors(list(kwargs.values()))
        layouts = [self._layouts.get(t) for t in ins]
        outs = _tensors(out)
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
            lx = _generic(x.shape, False)
        if name in _REDUCTIONS:
            return self._reduction(func, args, kwargs, x, lx, outs)
        if name == "unfold" and _display(func).startswith("F."):
            name = "fold"
        if name in _ALONG:
            return self._along(func, name, args, kwargs, x, lx, outs)
        if name in _RESHAPES:
            return self._set(outs[0], _reshape(lx, outs[0].shape) or _generic(outs[0].shape, self._positional(lx)))
        if name in _PERMUTES:
            shape = _on_meta(func, args, kwargs, x.ndim)
            perm = None if shape is None else [_PRIMES.index(s) for s in shape]
            return self._set(outs[0], _generic(outs[0].shape, self._positional(lx)) if perm is None
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
            if _has_pos(lx[-1]) or self._positional(layouts[1] if len(layouts) > 1 else None):
                self._judge(func, "refused", "applies a linear map across positions (its input's last axis holds positions)")
            return self._set(outs[0], (*lx[:-1], (("C", outs[0].shape[-1]),)))
        if name in ("layer_norm", "rms_norm"):
            k = len(args[1]) if len(args) > 1 and not isinstance(args[1], int) else 1
            if any(_has_pos(a) for a in lx[-k:]):
                self._judge(func, "refused", "normalises over axes that hold positions")
            return self._set(outs[0], lx)
        if name in _MIXER_WHY:
            return self._mixer(func, name, args, kwargs, lx, outs[0])
        if self._positional(lx) or any(self._positional(lay) for lay in layouts):
            self._judge(func, "refused", "an operation spark3d does not know; it may mix positions")
        for t in outs:
            self._set(t, lx if tuple(t.shape) == tuple(x.shape) else _generic(t.shape, self._positional(lx)))

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
                mine, theirs = [tok for tok, _ in axis if _pos(tok)], [tok for tok, _ in (chosen or ()) if _pos(tok)]
                if chosen is None or (mine and not theirs):
                    chosen = axis
                elif mine and theirs and mine != theirs:
                    conflict = True
            result.append(chosen if chosen is not None else ((None, shape[i]),))
        if conflict:
            self._judge(func, "refused", "combines values of different positions (its inputs' spatial axes disagree)")
        for t in outs:
            self._set(t, tuple(result) if t.shape == shape else _generic(t.shape, any(_has_pos(a) for a in result)))

    def _reduction(self, func: Any, args: tuple, kwargs: dict, x: torch.Tensor, lx: Layout, outs: list) -> None:
        shape = _on_meta(func, args, kwargs, x.ndim)
        if shape is None:
            reduced = list(range(x.ndim))
        else:
            reduced = [i for i, p in enumerate(_PRIMES[: x.ndim]) if p not in shape]
        positional = [i for i in reduced if _has_pos(lx[i])]
        if positional:
            every = all(i in reduced for i, a in enumerate(lx) if _has_pos(a))
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
        dims = _dims(value, x.ndim)
        if any(_has_pos(lx[d]) for d in dims):
            self._judge(func, "refused", _ALONG_WHY.get(name, "works along a spatial axis"))
        for t in outs:
            if t.ndim == x.ndim:
                self._set(t, lx)
            elif t.ndim == x.ndim - 1 and len(dims) == 1:
                self._set(t, tuple(a for i, a in enumerate(lx) if i != dims[0]))
            else:
                self._set(t, _generic(t.shape, self._positional(lx)))

    def _tile(self, func: Any, name: str, x: torch.Tensor, lx: Layout, out: torch.Tensor) -> None:
        new = out.ndim - x.ndim
        layout = [((None, n),) for n in out.shape[:new]]
        for i, axis in enumerate(lx):
            n_in, n_out = x.shape[i], out.shape[new + i]
            if n_in == 1 or not axis:
                layout.append(((None, n_out),))
            elif n_out != n_in and _has_pos(axis):
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
        if any(_has_pos(lay[dim]) for _, lay in labelled):
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

        total, d, layout, advanced, why = sum(consumed(i) for i in items), 0, [], False, None
        for item in items:
            if item is Ellipsis:
                layout.extend(lx[d: d + x.ndim - total])
                d += x.ndim - total
            elif item is None:
                layout.append(())
            elif isinstance(item, slice):
                if len(range(x.shape[d])[item]) != x.shape[d] and _has_pos(lx[d]):
                    why = "crops or strides positions along a spatial axis"
                layout.append(lx[d])
                d += 1
            elif isinstance(item, int):
                if _has_pos(lx[d]):
                    why = "picks single positions along a spatial axis"
                d += 1
            else:
                k = consumed(item)
                if any(_has_pos(a) for a in lx[d: d + k]):
                    why = "gathers positions by index"
                layout.append((("C", 0),))
                advanced, d = True, d + k
        layout.extend(lx[d:])
        if why:
            self._judge(func, "refused", ("writes at chosen positions: " if writes else "") + why)
        if out is not None:
            self._set(out, tuple(layout) if len(layout) == out.ndim else _generic(out.shape, self._positional(lx)))

    def _matmul(self, func: Any, name: str, args: tuple, out: torch.Tensor) -> None:
        a, b = (args[1], args[0]) if name == "rmatmul" else (args[1], args[2]) if name in ("addmm", "baddbmm", "addbmm") \
            else (args[0], args[1])
        la = self._layouts.get(a) or _generic(a.shape, False)
        lb = self._layouts.get(b) or _generic(b.shape, False)
        la = la if a.ndim > 1 else ((), *la)
        lb = lb if b.ndim > 1 else (*lb, ())
        if _has_pos(la[-1]) or _has_pos(lb[-2]):
            self._judge(func, "refused", "a matmul that sums over positions (positions flattened into its contracted axis)")
        elif _has_pos(la[-2]) and _has_pos(lb[-1]):
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
            return self._set(out, _generic(out.shape, any(self._positional(self._layouts.get(t)) for t in operands)))
        letters: dict[str, list[tuple[int, tuple]]] = {}
        for k, (term, t) in enumerate(zip(terms, operands)):
            lay = self._layouts.get(t) or _generic(t.shape, False)
            for j, letter in enumerate(term):
                letters.setdefault(letter, []).append((k, lay[j]))
        if any(_has_pos(axis) for c in letters if c not in rhs for _, axis in letters[c]):
            self._judge(func, "refused", "an einsum that sums over positions")
        sources = [{k for k, axis in letters[c] if _has_pos(axis)} for c in rhs]
        sources = [s for s in sources if s]
        if any(not (s & r) for s in sources for r in sources):
            self._judge(func, "refused", "an einsum that pairs positions of different operands (attention-like)")
        layout = tuple(next((ax for _, ax in letters[c] if _has_pos(ax)), next((ax for _, ax in letters[c] if ax), ()))
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
            self._set(out, _generic(out.shape, self._positional(lx)))

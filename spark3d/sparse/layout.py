"""Where a tensor's positions are: a layout per axis, followed through views, permutes and reshapes.

A layout has one entry per tensor axis: a tuple of atoms ``(token, size)`` whose sizes multiply to the
axis size (``()`` for size 1). Tokens: ``"B"`` batch, ``"C"`` features, ``None`` constant along the axis,
an int ``k`` the k-th spatial axis, ``"P"`` positions no longer laid out on the mask grid (a split or
rearranged spatial axis). :mod:`spark3d.sparse.judge` uses them to tell which ops mix positions.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = ["Layout", "is_position", "has_positions", "fit", "generic", "reshape_layout", "channels_first_problem",
           "display_name", "tensors_in", "dims_of", "PRIMES", "shape_on_meta"]

Layout = tuple  # one tuple of (token, size) atoms per tensor axis


def is_position(token: Any) -> bool:
    """Whether an atom's token stands for positions (a spatial axis, or rearranged positions)."""
    return token == "P" or (isinstance(token, int) and not isinstance(token, bool))


def has_positions(axis: tuple) -> bool:
    """Whether a tensor axis (its atoms) carries positions."""
    return any(is_position(tok) for tok, _ in axis)


def fit(layout: Layout, shape: Sequence[int]) -> Layout:
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
            out.append((("P" if has_positions(axis) else (axis[0][0] if axis else None), n),))
    return tuple(out)


def _prod(values: Iterable[int]) -> int:
    p = 1
    for v in values:
        p *= v
    return p


def generic(shape: Sequence[int], positional: bool) -> Layout:
    """A layout that only says whether positions are somewhere in the tensor (when an op's mapping is unknown)."""
    return fit(tuple(((("P" if positional else "C"), n),) for n in shape), shape)


def reshape_layout(layout: Layout, shape: Sequence[int]) -> Layout | None:
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
            tok = "P" if is_position(tok) else tok
            got.append((tok, need))
            queue.insert(0, (tok, s // need))
            prod *= need
        out.append(tuple(got))
    return None if queue else tuple(out)


def channels_first_problem(layout: Layout | None, spatial_dims: int) -> str | None:
    """Why a ``(B, C, *S)`` layer cannot take this input under a mask, or None when it can."""
    if layout is None or not any(has_positions(a) for a in layout):
        return None
    if len(layout) != 2 + spatial_dims:
        return (f"it expects (B, C, *S) with {spatial_dims} spatial axes, and its input's positions are laid out "
                f"on {len(layout)} axes")
    if has_positions(layout[0]) or has_positions(layout[1]):
        return "its input has positions folded into the batch or channel axis"
    for k, axis in enumerate(layout[2:]):
        if axis and not (len(axis) == 1 and axis[0][0] in (k, None)):
            return "its input's spatial axes are rearranged (not on the mask grid any more)"
    return None


def display_name(func: Any) -> str:
    """How an op reads in messages: ``F.conv3d``, ``Tensor.mean``, ``torch.norm``."""
    name = getattr(func, "__name__", "?")
    if name == "__get__":
        return f"Tensor.{getattr(getattr(func, '__self__', None), '__name__', '?')}"
    if getattr(func, "__objclass__", None) is not None or getattr(func, "__qualname__", "").startswith("Tensor."):
        return f"Tensor.{name}"
    module = getattr(func, "__module__", "") or ""
    if getattr(nn.functional, name, None) is func or module in ("torch.nn.functional", "torch._C._nn"):
        return f"F.{name}"
    if name.startswith("linalg_"):
        return f"torch.linalg.{name[len('linalg_'):]}"
    return f"torch.{name}"


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors in an argument, a list or a tuple (nested)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_in(item)]
    return []


def dims_of(value: Any, ndim: int) -> list[int]:
    """A dim argument (an int, a sequence, ``None`` / ``"all"`` for every axis) as non-negative axes."""
    if value == "all" or value is None:
        return list(range(ndim))
    values = (value,) if isinstance(value, int) else tuple(value)
    return [int(v) % max(ndim, 1) for v in values]


PRIMES = (2, 3, 5, 7, 11, 13, 17, 19)


def shape_on_meta(func: Any, args: tuple, kwargs: dict, ndim: int) -> tuple[int, ...] | None:
    """The result shape of ``func`` on a stand-in input whose axes have distinct prime sizes (None if it fails)."""
    if ndim > len(PRIMES):
        return None
    meta = torch.empty(PRIMES[:ndim], device="meta")
    try:
        out = func(meta, *args[1:], **kwargs)
    except Exception:
        return None
    first = tensors_in(out)
    return tuple(first[0].shape) if first else None

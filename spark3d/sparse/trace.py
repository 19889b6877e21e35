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
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .judge import OpJudge
from .layout import Layout, channels_first_problem, display_name, fit, generic, has_positions, tensors_in

__all__ = ["TracedOp", "OpTrace", "OpRecorder"]

_UNTRACED = ("takes a tensor made by an operation the probe cannot record (TorchScript, torch.vmap / torch.func, "
             "a C++ extension), so what it does to positions is unknown")


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


class OpRecorder(OpJudge, TorchFunctionMode):
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
        self._known = WeakIdKeyDictionary()  # tensors whose origin the probe saw (op outputs, weights, the input)
        self._stack: list[tuple[str, nn.Module, str | None, Any]] = []  # (path, module, covered kind, input layout)
        self._covered_depth = 0
        self._busy = 0
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ entering, inputs, hooks
    def __enter__(self) -> "OpRecorder":
        for module in self.network.modules():  # tensors that exist before the probe: weights, buffers, attributes
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False),
                      *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]:
                self._known[t] = True
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
        self._known[x] = True
        return x

    @staticmethod
    def _canonical(x: torch.Tensor, channels_last: bool = False) -> Layout:
        spatial = tuple(((k, 0),) for k in range(x.ndim - 2))
        batch, channels = (("B", 0),), (("C", 0),)
        return fit((batch, *spatial, channels) if channels_last else (batch, channels, *spatial), x.shape)

    def _enter_module(self, path: str, kind: str | None, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._busy += 1
        try:
            self.trace.ran.add(path)
            x = next(iter(tensors_in(args) + tensors_in(list(kwargs.values()))), None)
            layout = None if x is None else self._layouts.get(x)
            if kind is not None and self._covered_depth == 0 and layout is not None:
                if kind == "first":
                    problem = channels_first_problem(layout, self.spatial_dims)
                else:
                    problem = "it normalises its last axis, which holds positions" if has_positions(layout[-1]) \
                        else None
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
            outs = tensors_in(output)
            if kind is None and not self._covered_depth:
                self._untraced(path, module, outs, "its output")
            for t in outs:
                self._known[t] = True
            if kind is None or self._covered_depth or layout is None or not outs:
                return
            out = outs[0]
            if tuple(out.shape) == shape:
                self._set(out, layout)
            elif kind == "first" and out.ndim == len(layout):
                self._set(out, (layout[0], (("C", out.shape[1]),), *layout[2:]))
            else:
                self._set(out, generic(out.shape, any(has_positions(a) for a in layout)))
        finally:
            self._busy -= 1

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, path: str, module: nn.Module, op: str, verdict: str, why: str) -> None:
        typ = f"{type(module).__module__}.{type(module).__qualname__}"
        self.trace.ops.append(TracedOp(path, typ, op, verdict, why, tuple(f[0] for f in self._stack)))

    def _judge(self, func: Any, verdict: str, why: str) -> None:
        path, module = (self._stack[-1][0], self._stack[-1][1]) if self._stack else (self.prefix, self.network)
        self._record(path, module, display_name(func), verdict, why)

    def _set(self, t: torch.Tensor, layout: Layout | None) -> None:
        if layout is None:
            self._layouts.pop(t, None)
        else:
            self._layouts[t] = fit(layout, t.shape) if len(layout) == t.ndim else generic(
                t.shape, any(has_positions(a) for a in layout))

    def _untraced(self, path: str, module: nn.Module, tensors: list, what: str) -> None:
        """Refuse where a tensor comes from an operation the probe could not record (it cannot follow positions)."""
        if any(t not in self._known and t not in self._layouts and t.numel() > 1 for t in tensors):
            self._record(path, module, what, "refused", _UNTRACED)
            for t in tensors:
                self._known[t] = True  # one refusal per cause

    def _positional(self, layout: Layout | None) -> bool:
        return layout is not None and any(has_positions(a) for a in layout)

    # ------------------------------------------------------------------ the function mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._busy or self._covered_depth:
            for t in tensors_in(out):
                self._known[t] = True
            return out
        self._busy += 1
        try:
            if self._stack:
                self._untraced(self._stack[-1][0], self._stack[-1][1],
                               tensors_in(args) + tensors_in(list(kwargs.values())), display_name(func))
            for t in tensors_in(out):
                self._known[t] = True
            self._observe(func, args, kwargs, out)
        except Exception as err:  # never let a gap in the analysis pass silently
            ins = [self._layouts.get(t) for t in tensors_in(args)]
            if any(self._positional(lay) for lay in ins):
                self._judge(func, "refused", f"spark3d could not follow this operation ({type(err).__name__}: {err})")
        finally:
            self._busy -= 1
        return out

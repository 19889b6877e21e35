"""Sparsify and desparsify: swap each covered layer's class for a sparse subclass of it, or refuse.

A converted layer stays an instance of its own class (``SparseBatchNorm2d(BatchNorm2d)`` …), so
parameter names, ``isinstance`` checks and extra behaviour (timm's ``BatchNormAct2d`` activation,
MONAI's ``Convolution`` blocks) stay. Safety comes from what runs, not from where a class comes from:
the ops a probe pass executes outside covered layers (:mod:`spark3d.sparse.trace`) decide. A block of
any package that only composes covered layers and per-position ops converts; a block that pools
globally itself (squeeze-excitation) is made exact; anything that mixes positions makes
:func:`sparsify` raise :class:`UnsafeLayerError` naming the module path, the op and why, before
anything is changed. ``trusted=`` overrides the judgement for the classes it lists.
"""

from __future__ import annotations

import importlib
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import Spark3dError
from .context import MaskContext
from .layers import (
    SparseAvgPoolMixin, SparseConvMixin, SparseGlobalPoolMixin, SparseLayer, SparseLayerNormMixin, SparseMaxPoolMixin,
    SparseNormMixin,
)
from .sync import SYNC_FLAG
from .trace import OpRecorder, OpTrace, TracedOp

__all__ = ["UnsafeLayerError", "sparsify", "desparsify", "is_sparse", "find_unsafe_layers", "set_batchnorm_sync",
           "trace_ops", "probe_trace", "refusal_lines"]


class UnsafeLayerError(Spark3dError, RuntimeError):
    """Operations that mix positions and have no sparse version; ``refusals`` holds one :class:`TracedOp` each.

    A user error (the CLI shows it without a traceback) and, as before, a ``RuntimeError``.
    """

    def __init__(self, message: str, refusals: Sequence[TracedOp] = ()) -> None:
        super().__init__(message)
        self.refusals = list(refusals)

    @classmethod
    def from_refusals(cls, refusals: Sequence[TracedOp]) -> "UnsafeLayerError":
        lines = "\n".join(f"  - {line}" for line in refusal_lines(refusals))
        return cls("cannot make this network sparse-safe; these operations mix positions and have no sparse version:\n"
                   f"{lines}\nReplace them, or pass the block classes in `trusted=` if you know they are safe.", refusals)


def refusal_lines(ops: Sequence[TracedOp], max_paths: int = 4) -> list[str]:
    """One line per (block class, op, why): ``paths (Class): op — why``, the same op of many blocks grouped."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for op in ops:
        groups.setdefault((op.module_type, op.op, op.why), []).append(op.path or "<root>")
    lines = []
    for (typ, name, why), paths in groups.items():
        shown = ", ".join(paths[:max_paths]) + (f" and {len(paths) - max_paths} more" if len(paths) > max_paths else "")
        lines.append(f"{shown} ({typ}): {name} — {why}")
    return lines


_CONV_TYPES = (nn.modules.conv._ConvNd,)
_MAXPOOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVGPOOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)


def _kind_of_class(cls: type) -> type | None:
    """The sparse behaviour (mixin) layers of this class need, by class alone."""
    if issubclass(cls, SparseLayer):
        return cls.__mro__[1]
    for types, mixin in (
        (_CONV_TYPES, SparseConvMixin),
        (_MAXPOOL_TYPES, SparseMaxPoolMixin),
        (_AVGPOOL_TYPES, SparseAvgPoolMixin),
        (_NORM_TYPES, SparseNormMixin),
        ((nn.LayerNorm,), SparseLayerNormMixin),
    ):
        if issubclass(cls, types):
            return mixin
    return None


def _kind_of(module: nn.Module) -> type | None:
    """The sparse behaviour a covered layer needs, or None when it is not a covered layer."""
    mixin = _kind_of_class(type(module))
    if mixin is SparseGlobalPoolMixin:
        return None  # a traced block, not a covered layer
    if mixin is SparseLayerNormMixin and len(module.normalized_shape) != 1:
        return None  # LayerNorm over several axes: judged by what it runs
    return mixin


def _covered(module: nn.Module) -> str | None:
    """How a covered layer takes its input, for the tracer: ``"first"`` (B, C, *S), ``"last"`` (channels-last)."""
    mixin = _kind_of(module)
    if mixin is None:
        return None
    if mixin is SparseLayerNormMixin:
        return "first" if _is_channels_first_layernorm(module) else "last"
    return "first"


_PREFIXES = {SparseGlobalPoolMixin: "SparseGlobalPool"}  # other mixins: "Sparse"


def _sparse_class(cls: type, mixin: type) -> type:
    """The generated ``Sparse<Name>(mixin, cls)`` class, created once per dense class and mixin.

    Its ``__qualname__`` encodes the mixin and the dense class's import path, and this module's
    ``__getattr__`` rebuilds it from that name, so converted networks pickle (``torch.save``, spawned processes).
    """
    cached = _SPARSE_CLASSES.get((cls, mixin))
    if cached is None:
        prefix = _PREFIXES.get(mixin, "Sparse")
        qualname = f"{prefix}__{cls.__module__.replace('.', '__')}___{cls.__qualname__}"
        cached = type(f"{prefix}{cls.__name__}", (mixin, cls),
                      {"_dense_class": cls, "__module__": __name__, "__qualname__": qualname})
        _SPARSE_CLASSES[(cls, mixin)] = cached
    return cached


def __getattr__(name: str) -> type:
    """Rebuild a generated sparse class from its pickled name (see :func:`_sparse_class`)."""
    prefix = next((p for p in ("SparseGlobalPool__", "Sparse__") if name.startswith(p)), None)
    if prefix is None or "___" not in name:
        raise AttributeError(name)
    module_part, cls_name = name[len(prefix):].rsplit("___", 1)
    dense = getattr(importlib.import_module(module_part.replace("__", ".")), cls_name)
    mixin = SparseGlobalPoolMixin if prefix == "SparseGlobalPool__" else _kind_of_class(dense)
    if mixin is None:
        raise AttributeError(name)
    return _sparse_class(dense, mixin)


_SPARSE_CLASSES: dict[tuple[type, type], type] = {}  # a cache of generated classes, one per dense class and mixin


def _is_channels_first_layernorm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return name.endswith(("1d", "2d", "3d")) or getattr(module, "data_format", "") == "channels_first"


# --------------------------------------------------------------------------------------------
# what runs: traces of probe passes
# --------------------------------------------------------------------------------------------


def trace_ops(network: nn.Module, spatial_dims: int, prefix: str = "") -> OpRecorder:
    """A recorder of the ops ``network`` runs outside covered layers: enter it, run a probe, read ``.trace``."""
    return OpRecorder(network, spatial_dims, _covered, prefix)


def _example_input(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """A small input a bare block accepts, from its first layer: ``(x, channels_last)``."""
    for m in module.modules():
        channels, dims, last = None, 2, False
        if isinstance(m, nn.modules.conv._ConvNd):
            channels, dims = m.in_channels, len(m.kernel_size)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            channels = m.num_features
            dims = next((d for d, names in ((1, "1d"), (3, "3d")) if type(m).__name__.lower().endswith(names)), 2)
        elif isinstance(m, nn.GroupNorm):
            channels = m.num_channels
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            channels, last = m.normalized_shape[0], not _is_channels_first_layernorm(m)
        elif isinstance(m, nn.Linear):
            channels, last = m.in_features, True
        if channels is not None:
            break
    else:
        channels, dims, last = 4, 2, False
    size = (32,) * dims if dims >= 3 else (64,) * dims
    device = next(module.parameters(), torch.empty(0)).device
    shape = (1, *size, channels) if last else (1, channels, *size)
    return torch.zeros(shape, device=device), last


def _probe_roots(module: nn.Module, path: str, only: set[str] | None, trusted: tuple[type, ...]):
    """The top-most blocks with a forward of their own that need judging (covered layers need none)."""
    if _kind_of(module) is not None or (trusted and isinstance(module, trusted)):
        return []
    if type(module).forward is not nn.Module.forward and (only is None or path in only):
        return [(path, module)]
    return [root for name, child in module.named_children()
            for root in _probe_roots(child, f"{path}.{name}" if path else name, only, trusted)]


def probe_trace(network: nn.Module, example_input: torch.Tensor | None = None, only: Iterable[str] | None = None,
                trusted: Sequence[type] = ()) -> OpTrace:
    """Run each block of a bare network that needs judging once (eval mode, no grad) and trace what it runs.

    The input is ``example_input`` for the network itself, else a small zero tensor shaped for the
    block's first layer. Raises :class:`UnsafeLayerError` when a block cannot be run that way.
    """
    only = None if only is None else set(only)
    trace = OpTrace()
    for path, block in _probe_roots(network, "", only, tuple(trusted)):
        if example_input is not None and block is network:
            x, last = example_input, False
        else:
            x, last = _example_input(block)
        recorder = trace_ops(block, x.ndim - 2, prefix=path)
        was_training = {m: m.training for m in block.modules()}
        block.eval()
        try:
            with torch.no_grad(), recorder:
                block(recorder.input(x, channels_last=last))
        except Exception as err:
            cls = type(block).__name__
            raise UnsafeLayerError(
                f"cannot tell what {path or '<root>'} ({cls}) runs: a probe pass on an input of shape "
                f"{tuple(x.shape)} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                f"pass example_input= (an input it accepts), or trusted=[{cls}]") from None
        finally:
            for m, flag in was_training.items():
                m.training = flag
        trace = trace.merge(recorder.trace)
    return trace


def find_unsafe_layers(
    network: nn.Module, only: Iterable[str] | None = None, trusted: Sequence[type] = (),
    trace: OpTrace | None = None, example_input: torch.Tensor | None = None,
) -> list[TracedOp]:
    """Every refused operation (module path, op, why) of ``network``, from ``trace`` or a probe pass of its own."""
    only = None if only is None else set(only)
    trusted = tuple(trusted)
    if trace is None:
        trace = probe_trace(network, example_input, only, trusted)
    modules = dict(network.named_modules())

    def vouched(op: TracedOp) -> bool:
        return bool(trusted) and any(isinstance(modules.get(p), trusted) for p in (*op.enclosing, op.path))

    return trace.select("refused", only, skip=vouched)


def sparsify(
    network: nn.Module,
    ctx: MaskContext,
    only: Iterable[str] | None = None,
    trusted: Sequence[type] = (),
    trace: OpTrace | None = None,
    example_input: torch.Tensor | None = None,
    check: bool = True,
) -> list[str]:
    """Convert ``network`` in place to read its mask from ``ctx``; returns the converted module paths.

    Args:
        only: limit conversion and checks to these module paths (the modules that take part in encoding).
        trusted: block classes whose operations are not judged (an override: you vouch they keep positions apart).
        trace: what ``network`` runs (an encoder's probe pass: ``encoder.op_trace``); without one,
            :func:`probe_trace` runs each block that needs judging once (on ``example_input`` if given).
        check: ``False`` converts covered layers without judging anything (for parts that never run under a mask).

    Raises :class:`UnsafeLayerError` naming every refused operation, before changing anything.
    """
    only = None if only is None else set(only)
    if check:
        if trace is None:
            trace = probe_trace(network, example_input, only, trusted)
        refusals = find_unsafe_layers(network, only, trusted, trace)
        if refusals:
            raise UnsafeLayerError.from_refusals(refusals)
    converted = []
    for path, module in network.named_modules():
        if only is not None and path not in only:
            continue
        mixin = _kind_of(module)
        if mixin is None:
            continue
        if not isinstance(module, SparseLayer):
            dense_cls = type(module)
            module.__class__ = _sparse_class(dense_cls, mixin)
            if mixin is SparseLayerNormMixin:
                module._channels_first = _is_channels_first_layernorm(module)
        module._sparse_ctx = ctx
        converted.append(path)
    if trace is not None:  # blocks that pool globally themselves: exact under a mask
        modules = dict(network.named_modules())
        for op in trace.select("exact", only):
            module = modules.get(op.path)
            if module is None or op.path in converted:
                continue
            if not isinstance(module, SparseLayer):
                module.__class__ = _sparse_class(type(module), SparseGlobalPoolMixin)
            module._sparse_ctx = ctx
            converted.append(op.path)
    return converted


def desparsify(network: nn.Module) -> nn.Module:
    """Restore every converted layer of ``network`` to its dense class, in place."""
    for module in network.modules():
        if isinstance(module, SparseLayer):
            module.__class__ = module._dense_class
            for attr in ("_sparse_ctx", "_channels_first", SYNC_FLAG):
                module.__dict__.pop(attr, None)
    return network


def is_sparse(module: nn.Module) -> bool:
    """Whether ``module`` is a converted (sparse) layer."""
    return isinstance(module, SparseLayer)


def set_batchnorm_sync(network: nn.Module, enabled: bool = True) -> int:
    """Mark every converted BatchNorm of ``network`` to sum its statistics over DDP processes.

    Works on CPU (gloo) and GPU alike, unlike ``torch.nn.SyncBatchNorm`` which DDP accepts on GPUs only.
    Returns the number of layers marked.
    """
    count = 0
    for module in network.modules():
        if isinstance(module, SparseLayer) and isinstance(module, nn.modules.batchnorm._BatchNorm):
            setattr(module, SYNC_FLAG, enabled)
            count += 1
    return count

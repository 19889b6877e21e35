"""Making a dense network act as a submanifold sparse one under a mask (context, layers, sync, op traces, conversion)."""

from .context import MaskContext
from .convert import (
    UnsafeLayerError, desparsify, find_unsafe_layers, is_sparse, probe_trace, refusal_lines, set_batchnorm_sync, sparsify,
    trace_ops,
)
from .trace import OpTrace, TracedOp

__all__ = ["MaskContext", "UnsafeLayerError", "sparsify", "desparsify", "is_sparse", "find_unsafe_layers",
           "set_batchnorm_sync", "trace_ops", "probe_trace", "refusal_lines", "OpTrace", "TracedOp"]

"""Making a dense network act as a submanifold sparse one under a mask (context, layers, sync, conversion)."""

from .context import MaskContext
from .convert import UnsafeLayerError, desparsify, find_unsafe_layers, is_sparse, set_batchnorm_sync, sparsify

__all__ = ["MaskContext", "UnsafeLayerError", "sparsify", "desparsify", "is_sparse", "find_unsafe_layers",
           "set_batchnorm_sync"]

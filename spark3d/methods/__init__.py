"""Pretraining methods, one file each, and the method table the configs and the Lightning module read."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from ..backbones import BackboneSpec
from ..errors import ConfigError
from .common import MaskedModelingMethod, MaskedModelOutput, patchify, unpatchify
from .convmae import ConvMAE
from .spark import SparK, SparKOutput

__all__ = ["METHODS", "build_method", "MaskedModelingMethod", "MaskedModelOutput", "SparK", "SparKOutput", "ConvMAE",
           "patchify", "unpatchify"]

METHODS: dict[str, type[MaskedModelingMethod]] = {
    "spark": SparK,
    "convmae": ConvMAE,
}


def build_method(name: str, spec: BackboneSpec, input_size: Sequence[int], mask_ratio: float,
                 **method_args: Any) -> MaskedModelingMethod:
    """The method ``name`` over the network ``spec`` describes; unknown methods or options are a ConfigError."""
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(METHODS)}")
    cls = METHODS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "encoder", "input_size",
                                                                                   "mask_ratio")]
    unknown = sorted(set(method_args) - set(accepted))
    if unknown:
        raise ConfigError(f"method '{name}' has no option(s) {unknown}; its options: {', '.join(accepted)}")
    return cls.from_backbone(spec, input_size, mask_ratio, **method_args)

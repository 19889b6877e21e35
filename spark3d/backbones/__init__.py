"""The backbone table: one entry per network family (builder, taps, fine-tuning network), read by every consumer."""

from . import monai, timm  # noqa: F401  (each registers its families)
from .registry import (
    Backbone, BackboneSpec, Example, build_network, build_segmentation_network, encoder_children, encoder_module_of,
    examples, find, lookup, register, registered, segmentation_network_definition,
)
from .timm import register_timm_unet_backbone, timm_taps

__all__ = ["Backbone", "BackboneSpec", "Example", "register", "registered", "examples", "lookup", "find",
           "build_network", "build_segmentation_network", "segmentation_network_definition", "encoder_module_of", "encoder_children", "timm_taps",
           "register_timm_unet_backbone"]

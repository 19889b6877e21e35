"""The backbone table: one entry per network family (builder, taps, fine-tuning network), read by every consumer."""

from . import monai, nnunet, timm  # noqa: F401  (each registers its families)
from . import hybrid  # noqa: F401,E402  (ConvMAE's conv + ViT network; after the SparK families)
from .registry import (
    Backbone, BackboneSpec, Example, build_network, build_segmentation_network, encoder_children, encoder_module_of,
    examples, find, lookup, register, registered, segmentation_network_definition, unregister,
)
from .nnunet import RESENC_PRESETS, nnunet_kwargs, nnunet_topology, plan_out_channels
from .nnunet_plans import build_plan_network, plan_architecture, plan_configuration, plan_probe_size, plan_strides, read_plans
from .timm import register_timm_unet_backbone, timm_taps

__all__ = ["Backbone", "BackboneSpec", "Example", "register", "unregister", "registered", "examples", "lookup", "find",
           "build_network", "build_segmentation_network", "segmentation_network_definition", "encoder_module_of",
           "encoder_children", "timm_taps", "register_timm_unet_backbone", "RESENC_PRESETS", "nnunet_kwargs",
           "nnunet_topology", "plan_out_channels", "build_plan_network", "plan_architecture", "plan_configuration",
           "plan_probe_size", "plan_strides", "read_plans"]

"""Handing models to other tools: MONAI bundles (fine-tuned), nnU-Net weights files (pretrained encoders)."""

from .bundle import SCHEMA_URL, bundle_metadata, export_bundle, inference_config, preprocessing_config
from .nnunet import NNUNET_WEIGHTS_FORMAT, adaptation_plan, export_nnunet

__all__ = ["export_nnunet", "adaptation_plan", "NNUNET_WEIGHTS_FORMAT", "export_bundle", "inference_config", "bundle_metadata", "preprocessing_config", "SCHEMA_URL"]

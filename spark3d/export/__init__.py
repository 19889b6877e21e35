"""Handing a fine-tuned model to other tools: MONAI bundles."""

from .bundle import SCHEMA_URL, bundle_metadata, export_bundle, inference_config, preprocessing_config

__all__ = ["export_bundle", "inference_config", "bundle_metadata", "preprocessing_config", "SCHEMA_URL"]

"""Lightning modules for pretraining (and, later, segmentation fine-tuning)."""

from .pretrain import ENCODER_FILE, SparKPretrain

__all__ = ["SparKPretrain", "ENCODER_FILE"]

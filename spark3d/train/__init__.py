"""Lightning modules for pretraining (and, later, segmentation fine-tuning)."""

from .pretrain import ENCODER_FILE, SparKPretrain
from .segment import SegmentationModule

__all__ = ["SparKPretrain", "SegmentationModule", "ENCODER_FILE"]

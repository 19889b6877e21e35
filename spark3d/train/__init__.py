"""Lightning only: the pretraining and segmentation modules, the optimiser recipes and the callbacks."""

from .callbacks import DDPConsistencyCheck, EncoderExport, ReconstructionFigures
from .pretrain import ENCODER_FILE, PretrainModule, SparKPretrain
from .segment import SegmentationModule

__all__ = ["PretrainModule", "SparKPretrain", "SegmentationModule", "ENCODER_FILE", "EncoderExport",
           "ReconstructionFigures", "DDPConsistencyCheck"]

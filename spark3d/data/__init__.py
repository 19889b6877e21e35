"""Data: datalists, CT and natural-image data modules, and synthetic CT phantoms."""

from .ct import CTPretrainData
from .datalist import DataError, load_datalist
from .images import ImageFolderData
from .segmentation import SegmentationData
from .phantoms import BTCV_LABELS, make_phantom, write_btcv_phantoms

__all__ = ["CTPretrainData", "SegmentationData", "ImageFolderData", "DataError", "load_datalist", "BTCV_LABELS", "make_phantom",
           "write_btcv_phantoms"]

"""Data: datalists, the data-module contract, CT and natural-image data modules, dataset facts, phantoms."""

from .contract import Spark3dDataModule
from .ct import CTPretrainData
from .datalist import DataError, load_datalist
from .datasets import BTCV_LABELS
from .images import ImageFolderData
from .phantoms import make_phantom, write_btcv_phantoms
from .segmentation import SegmentationData

__all__ = ["Spark3dDataModule", "CTPretrainData", "SegmentationData", "ImageFolderData", "DataError", "load_datalist",
           "BTCV_LABELS", "make_phantom", "write_btcv_phantoms"]

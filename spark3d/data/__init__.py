"""Data: datalists, the data-module contract, CT and natural-image data modules, nnU-Net plan-style preprocessing,
dataset facts, phantoms."""

from .contract import Spark3dDataModule
from .ct import CTPretrainData
from .datalist import DataError, load_datalist
from .datasets import BTCV_LABELS
from .images import ImageFolderData
from .nnunet_prep import PlanPreprocessing, nnunet_raw_datalist, preprocess_case
from .phantoms import make_phantom, write_btcv_phantoms
from .segmentation import SegmentationData

__all__ = ["Spark3dDataModule", "CTPretrainData", "SegmentationData", "ImageFolderData", "DataError", "load_datalist",
           "BTCV_LABELS", "make_phantom", "write_btcv_phantoms", "PlanPreprocessing", "nnunet_raw_datalist",
           "preprocess_case"]

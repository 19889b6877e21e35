"""Lightning data module over a folder of natural images (``root/<class>/<img>`` or flat), SparK recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .contract import Spark3dDataModule
from .caching import shard_for_rank
from .datalist import DataError
from .sampling import eval_loader

__all__ = ["ImageFolderData", "ImageFiles", "IMAGE_SUFFIXES", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFiles(Dataset):
    """Images found below a folder; returns ``{"image": tensor}`` after ``transform``."""

    def __init__(self, files: Sequence[Path], transform: Any) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        try:
            with Image.open(self.files[i]) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read image {self.files[i]}: {err}") from None
        return {"image": self.transform(img)}


class ImageFolderData(Spark3dDataModule):
    """Natural images for 2D SparK pretraining: RandomResizedCrop(scale 0.67–1) + flip + ImageNet norm.

    Args:
        root: folder of images, flat or with one sub-folder per class (labels are not used).
        roi_size: crop size ``(H, W)`` fed to the network.
        val_root: optional folder of validation images (centre crop).
    """

    def __init__(
        self,
        root: str,
        roi_size: int | Sequence[int] = (224, 224),
        batch_size: int = 32,
        num_workers: int = 4,
        scale: Sequence[float] = (0.67, 1.0),
        val_root: str | None = None,
    ) -> None:
        super().__init__()
        self.root = root
        self.roi_size = tuple(int(s) for s in ([roi_size] * 2 if isinstance(roi_size, int) else roi_size))
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.scale = tuple(scale)
        self.val_root = val_root
        self.train_files: list[Path] | None = None
        self.val_files: list[Path] = []

    @property
    def crops_per_batch(self) -> int:
        return self.batch_size

    def metadata(self) -> dict[str, Any]:
        return {"roi_size": self.roi_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    @staticmethod
    def find_images(root: str | Path) -> list[Path]:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files

    def validate(self) -> None:
        if self.in_channels not in (None, 3):
            raise DataError(f"{self.root}: images are read as RGB (3 channels); the network takes {self.in_channels}")
        if self.train_files is None:
            self.train_files = self.find_images(self.root)
            self.val_files = self.find_images(self.val_root) if self.val_root else []

    def train_transform(self) -> T.Compose:
        return T.Compose([
            T.RandomResizedCrop(self.roi_size, scale=self.scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def val_transform(self) -> T.Compose:
        return T.Compose([
            T.Resize(self.roi_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(self.roi_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def setup(self, stage: str | None = None) -> None:
        self.validate()
        self.train_ds = ImageFiles(shard_for_rank(self.train_files, self.trainer), self.train_transform())
        self.val_ds = ImageFiles(shard_for_rank(self.val_files, self.trainer, even=False), self.val_transform()) if self.val_files else None

    def train_dataloader(self) -> DataLoader:
        return self.train_order.loader(self.train_ds, self.batch_size, self.num_workers,
                                       drop_last=len(self.train_ds) > self.batch_size, loader_class=DataLoader)

    def val_dataloader(self):
        if self.val_ds is None:
            return []
        return eval_loader(self.val_ds, self.batch_size, self.num_workers, loader_class=DataLoader)

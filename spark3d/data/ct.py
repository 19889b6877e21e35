"""Lightning data module for CT pretraining: a datalist or a folder of NIfTI volumes → random ROI crops."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from monai import data as md
from monai import transforms as mt

from .contract import Spark3dDataModule
from .caching import cached_dataset, shard_for_rank
from .datalist import CHECKS, DataError, check_volume, folder_datalist, load_datalist
from .sampling import eval_loader
from .transforms import ct_pretrain_augment, ct_preprocess

__all__ = ["CTPretrainData"]


class CTPretrainData(Spark3dDataModule):
    """CT volumes for SparK pretraining, through MONAI transforms and a cache of the deterministic part.

    Args:
        datalist: a decathlon-style JSON (``training`` list; ``validation`` used when present) or a
            folder of ``.nii/.nii.gz`` files. Relative paths resolve against the JSON's folder.
        roi_size: size of the random crops fed to the network.
        num_samples: crops per volume per step (MONAI flattens them into the batch).
        batch_size: volumes per batch (each gives ``num_samples`` crops).
        spacing: target voxel spacing in mm (None keeps the native spacing).
        intensity_range: HU window mapped to [0, 1] (pretraining default −1000..1000).
        cache: ``"ram"`` (MONAI CacheDataset), ``"disk"`` (PersistentDataset in ``cache_dir``) or ``"none"``.
        num_workers: data loader workers.
        check: what the up-front check reads: ``"full"`` (every voxel: readable, finite, not constant) or
            ``"header"`` (shape and channels only, for corpora where a full read is expensive; volumes are
            still checked when training reads them).
    """

    def __init__(
        self,
        datalist: str,
        roi_size: Sequence[int] = (96, 96, 96),
        num_samples: int = 2,
        batch_size: int = 1,
        spacing: Sequence[float] | None = (1.5, 1.5, 2.0),
        intensity_range: Sequence[float] = (-1000.0, 1000.0),
        cache: str = "ram",
        cache_dir: str | None = None,
        num_workers: int = 2,
        train_key: str = "training",
        val_key: str | None = "validation",
        flip_prob: float = 0.5,
        check: Literal["full", "header"] = "full",
    ) -> None:
        super().__init__()
        if check not in CHECKS:
            raise DataError(f"data.check must be one of {CHECKS}, got '{check}'")
        self.check = check
        if cache not in ("ram", "disk", "none"):
            raise DataError(f"data.cache must be 'ram', 'disk' or 'none', got '{cache}'")
        if cache == "disk" and not cache_dir:
            raise DataError("data.cache 'disk' needs data.cache_dir")
        self.datalist = datalist
        self.roi_size = tuple(int(s) for s in roi_size)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.intensity_range = tuple(float(v) for v in intensity_range)
        self.cache = cache
        self.cache_dir = cache_dir
        self.num_workers = int(num_workers)
        self.train_key = train_key
        self.val_key = val_key
        self.flip_prob = flip_prob
        self.train_files: list[dict] | None = None
        self.val_files: list[dict] = []

    # ------------------------------------------------------------------------------ checks
    @property
    def crops_per_batch(self) -> int:
        return self.batch_size * self.num_samples

    def metadata(self) -> dict[str, Any]:
        """What a downstream user must know to feed the pretrained encoder the same way."""
        return {"spacing": self.spacing, "intensity_range": self.intensity_range, "roi_size": self.roi_size,
                "orientation": "RAS"}

    def validate(self) -> None:
        """Resolve and check every file (exists, 3D, channels; with ``check="full"`` every voxel) before anything
        is written."""
        if self.train_files is not None:
            return
        source = Path(self.datalist)
        if source.is_dir():
            train, val = folder_datalist(source), []
        else:
            train = load_datalist(source, self.train_key)
            val = load_datalist(source, self.val_key, required=False) if self.val_key else []
        for entry in train + val:
            check_volume(entry["image"], spatial_dims=3, channels=self.in_channels, full=self.check == "full")
        self.train_files, self.val_files = train, val

    # ------------------------------------------------------------------------------ datasets
    def preprocess(self) -> mt.Compose:
        return ct_preprocess(("image",), self.spacing, self.intensity_range, self.roi_size, channels=self.in_channels)

    def setup(self, stage: str | None = None) -> None:
        self.validate()
        pre = self.preprocess()
        # flattened: caching datasets cache up to the first random transform, and a nested Compose counts as one
        train_tf = mt.Compose([pre, ct_pretrain_augment(self.roi_size, self.num_samples, self.flip_prob)]).flatten()
        self.train_ds = cached_dataset(shard_for_rank(self.train_files, self.trainer), train_tf, self.cache, self.cache_dir)
        self.val_ds = None
        if self.val_files:
            val_tf = mt.Compose([pre, mt.CenterSpatialCropd("image", roi_size=self.roi_size)]).flatten()
            self.val_ds = cached_dataset(shard_for_rank(self.val_files, self.trainer, even=False), val_tf, self.cache,
                                         self.cache_dir)

    def train_dataloader(self) -> md.DataLoader:
        return self.train_order.loader(self.train_ds, self.batch_size, self.num_workers,
                                       drop_last=len(self.train_ds) > self.batch_size)

    def val_dataloader(self):
        if self.val_ds is None:
            return []
        return eval_loader(self.val_ds, self.batch_size * self.num_samples, self.num_workers)

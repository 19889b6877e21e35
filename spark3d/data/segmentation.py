"""Lightning data module for segmentation fine-tuning (BTCV, MSD, phantoms): checked datalists,
cached preprocessing, the standard augmentation, whole-volume validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

from monai import data as md
from monai import transforms as mt

from .contract import Spark3dDataModule, check_data_values, per_axis
from .caching import cached_dataset, shard_for_rank
from .datalist import CHECKS, DataError, check_volume, load_datalist
from .prep import check_pair
from .sampling import eval_loader
from .transforms import crop_indices, ct_preprocess, segmentation_augment

__all__ = ["SegmentationData"]


class SegmentationData(Spark3dDataModule):
    """Labelled volumes from a decathlon-style datalist (``training``, ``validation``; ``labels`` names).

    Args:
        datalist: JSON written by ``data_prep/btcv.py`` / ``data_prep/msd.py`` (or any such list).
        num_classes: classes including background; labels above it are an error.
        intensity: ``"ct"`` (HU window ``intensity_range`` → [0, 1]) or ``"mri"`` (z-score per channel).
        roi_size, num_samples: training crops (positive/negative sampling) per volume.
        check_labels: read every label once at start to check its values (and shapes/affines).
        crop_sampling: ``"posneg"`` (foreground/background, the BTCV recipe) or ``"classes"`` (every class equally).
        max_train_cases: use only the first N training cases (label-efficiency studies).
        check: what the up-front check reads of each image: ``"full"`` (every voxel: readable, finite, not
            constant) or ``"header"`` (shape and channels; volumes are still checked when training reads them).
    """

    def __init__(
        self,
        datalist: str,
        num_classes: int = 14,
        roi_size: int | Sequence[int] = (96, 96, 96),
        num_samples: int = 4,
        batch_size: int = 1,
        spacing: float | Sequence[float] | None = (1.5, 1.5, 2.0),
        intensity: Literal["ct", "mri"] = "ct",
        intensity_range: Sequence[float] = (-175.0, 250.0),
        cache: Literal["ram", "disk", "none"] = "ram",
        cache_dir: str | None = None,
        num_workers: int = 2,
        train_key: str = "training",
        val_key: str | None = "validation",
        check_labels: bool = True,
        max_train_cases: int | None = None,
        crop_sampling: Literal["posneg", "classes"] = "posneg",
        check: Literal["full", "header"] = "full",
    ) -> None:
        super().__init__()
        check_data_values({"batch_size": batch_size, "num_samples": num_samples, "num_workers": num_workers,
                           "roi_size": roi_size, "spacing": spacing, "intensity_range": intensity_range,
                           "intensity": intensity})
        roi_size, spacing = per_axis(roi_size), per_axis(spacing)
        if check not in CHECKS:
            raise DataError(f"data.check must be one of {CHECKS}, got '{check}'")
        self.check = check
        if cache == "disk" and not cache_dir:
            raise DataError("data.cache 'disk' needs data.cache_dir")
        self.datalist = datalist
        self.num_classes = int(num_classes)
        self.roi_size = tuple(int(s) for s in roi_size)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.intensity = intensity
        self.intensity_range = tuple(float(v) for v in intensity_range)
        self.cache, self.cache_dir = cache, cache_dir
        self.num_workers = int(num_workers)
        self.train_key, self.val_key = train_key, val_key
        self.check_labels = check_labels
        self.max_train_cases = max_train_cases
        self.crop_sampling = crop_sampling
        self.train_files: list[dict] | None = None
        self.val_files: list[dict] = []
        self.label_names: list[str] = []

    @property
    def crops_per_batch(self) -> int:
        return self.batch_size * self.num_samples

    def metadata(self) -> dict[str, Any]:
        return {"spacing": self.spacing, "intensity": self.intensity, "roi_size": self.roi_size,
                "intensity_range": self.intensity_range if self.intensity == "ct" else None}

    def validate(self, need_validation: bool = True) -> None:
        """Resolve the datalist and check every pair before anything runs or is written."""
        if self.train_files is not None:
            return
        path = Path(self.datalist)
        train = load_datalist(path, self.train_key, keys=("image", "label"))
        val = []
        if self.val_key:
            val = load_datalist(path, self.val_key, keys=("image", "label"), required=False)
            if need_validation and not val:
                raise DataError(
                    f"datalist {path} has no '{self.val_key}' cases, but fine-tuning validates on them: make a split "
                    "(data_prep/msd.py --val-fraction …) or set --data.init_args.val_key null and "
                    "--trainer.limit_val_batches 0"
                )
        if self.max_train_cases is not None:
            train = train[: self.max_train_cases]
        for entry in train + val:
            self.check_case(entry)
        self.read_label_names()
        self.train_files, self.val_files = train, val

    def read_label_names(self) -> list[str]:
        """Class names from the datalist's ``labels`` (``class<i>`` where it names none)."""
        try:
            labels = json.loads(Path(self.datalist).read_text()).get("labels", {})
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read datalist {self.datalist}: {err}") from None
        self.label_names = [str(labels.get(str(i), f"class{i}")) for i in range(self.num_classes)]
        return self.label_names

    @staticmethod
    def _first(image: str | list[str]) -> str:
        return image[0] if isinstance(image, list) else image

    def check_case(self, entry: dict) -> None:
        """One case before it is used: the image (channels, and every voxel with ``check="full"``) and, with
        ``check_labels``, its label against it."""
        full = self.check == "full"
        images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        channels = self.in_channels if len(images) == 1 else None
        for image in images:
            check_volume(image, channels=channels, full=full, spacing=self.spacing)
        if len(images) > 1 and self.in_channels is not None and len(images) != self.in_channels:
            raise DataError(f"case {images[0]} lists {len(images)} channel files; the network takes {self.in_channels}")
        if self.check_labels and "label" in entry:
            check_pair(Path(images[0]), Path(entry["label"]), self.num_classes, full=False)

    def preprocess(self, keys: Sequence[str] = ("image", "label"), track_meta: bool = False, pad: bool = True) -> mt.Compose:
        window = self.intensity_range if self.intensity == "ct" else None
        return ct_preprocess(keys, self.spacing, window, self.roi_size if pad else None, True, track_meta,
                             channels=self.in_channels)

    def setup(self, stage: str | None = None) -> None:
        need_val = self.trainer is None or bool(getattr(self.trainer, "limit_val_batches", 1))
        self.validate(need_validation=need_val and bool(self.val_key))
        train_tf = mt.Compose([self.preprocess(), crop_indices(self.crop_sampling, self.num_classes), segmentation_augment(self.roi_size, self.num_samples, sampling=self.crop_sampling,
                                                                num_classes=self.num_classes)]).flatten()
        self.train_ds = cached_dataset(shard_for_rank(self.train_files, self.trainer), train_tf, self.cache,
                                       self.cache_dir)
        self.val_ds = cached_dataset(shard_for_rank(self.val_files, self.trainer, even=False), self.preprocess(pad=True),
                                     self.cache, self.cache_dir) if self.val_files else None

    def train_dataloader(self) -> md.DataLoader:
        return self.train_order.loader(self.train_ds, self.batch_size, self.num_workers)

    def val_dataloader(self):
        if self.val_ds is None:
            return []
        return eval_loader(self.val_ds, 1, self.num_workers)

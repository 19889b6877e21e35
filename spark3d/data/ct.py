"""Lightning data module for CT pretraining: a datalist, a folder of NIfTI volumes or a CT store → random ROI crops."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from monai import data as md
from monai import transforms as mt

from .contract import Spark3dDataModule, check_data_values, per_axis
from .caching import cached_dataset, shard_for_rank
from .datalist import CHECKS, DataError, check_entry, folder_entries, load_datalist
from .nnunet_prep import PlanPreprocessd, PlanPreprocessing
from .sampling import eval_loader
from .store import StoreSettings, open_store
from .store_dataset import StoreCropDataset
from .store_verify import refuse_problems, verify_store
from .transforms import ct_pretrain_augment, ct_preprocess

__all__ = ["CTPretrainData"]


class CTPretrainData(Spark3dDataModule):
    """CT volumes for SparK pretraining: MONAI transforms with a cache of the deterministic part, or crops read
    from a preprocessed CT store (``store``), each rank reading its own shard with its own random stream.

    Args:
        datalist: a decathlon-style JSON (``training`` list; ``validation`` used when present), a folder of
            ``.nii/.nii.gz`` files, or an nnU-Net raw dataset folder (``dataset.json``, ``imagesTr``, ``imagesTs``:
            every case, channel files stacked, labels ignored). Relative paths resolve against the JSON's folder.
        roi_size: size of the random crops fed to the network.
        num_samples: crops per volume per step (MONAI flattens them into the batch).
        batch_size: volumes per batch (each gives ``num_samples`` crops).
        spacing: target voxel spacing in mm (None keeps the native spacing).
        intensity_range: HU window mapped to [0, 1] (pretraining default −1000..1000).
        cache: ``"ram"`` (MONAI CacheDataset), ``"disk"`` (PersistentDataset in ``cache_dir``) or ``"none"``.
        num_workers: data loader workers.
        flip_prob: probability of a random flip along each axis.
        intensity_jitter: scale and shift each crop's intensities by up to ± this (0: off).
        channels: image channels of every volume (checked against a store).
        store: a preprocessed CT store (``spark3d preprocess --config CFG --out STORE``): crops are read from its
            memory-mapped volumes, nothing is cached, ``cache`` does not apply; its settings must match these.
            ``datalist`` may then be null (when given it must be the one the store was made from).
        check: what the up-front check reads: ``"full"`` (every voxel: readable, finite, not constant) or
            ``"header"`` (shape and channels only, for corpora where a full read is expensive; volumes are
            still checked when training reads them).
        verify_store: with a store, compare every volume's sha256 with its record before training (a full read
            of the store; without it each volume's size and header are checked).
        plans: an nnU-Net plans JSON: crops follow its ``configuration`` as nnU-Net will show the data when
            fine-tuning (SimpleITK axes + ``transpose_forward``, the configuration's ``spacing``, CTNormalization
            with the plan's foreground statistics; ``spark3d.data.nnunet_prep``). ``spacing`` and
            ``intensity_range`` must then be null (the plan decides them); a plan whose normalisation is not CT is
            refused.
        configuration: the plan's configuration (``3d_fullres``).
    """

    def __init__(
        self,
        datalist: str | None = None,
        roi_size: int | Sequence[int] = (96, 96, 96),
        num_samples: int = 2,
        batch_size: int = 1,
        spacing: float | Sequence[float] | None = (1.5, 1.5, 2.0),
        intensity_range: Sequence[float] = (-1000.0, 1000.0),
        cache: str = "ram",
        cache_dir: str | None = None,
        num_workers: int = 2,
        train_key: str = "training",
        val_key: str | None = "validation",
        flip_prob: float = 0.5,
        intensity_jitter: float = 0.0,
        channels: int = 1,
        store: str | None = None,
        check: Literal["full", "header"] = "full",
        verify_store: bool = False,
        plans: str | None = None,
        configuration: str = "3d_fullres",
    ) -> None:
        super().__init__()
        check_data_values({"batch_size": batch_size, "num_samples": num_samples, "num_workers": num_workers,
                           "roi_size": roi_size, "spacing": spacing, "intensity_range": intensity_range,
                           "intensity": "ct"})
        roi_size, spacing = per_axis(roi_size), per_axis(spacing)
        self.plan = None if plans is None else PlanPreprocessing.from_plans(plans, configuration)
        if self.plan is not None:
            given = [k for k, v in (("spacing", spacing), ("intensity_range", intensity_range)) if v is not None]
            if given:
                raise DataError(f"data.init_args.{given[0]} is set, but data.init_args.plans decides it (spacing "
                                f"{list(self.plan.spacing)}, {self.plan.normalization_schemes[0]}): set "
                                f"{' and '.join(given)} to null")
            if tuple(int(s) for s in roi_size) != self.plan.patch_size:
                print(f"spark3d: data.roi_size {list(roi_size)} differs from the plan's patch_size "
                      f"{list(self.plan.patch_size)}: crops follow roi_size", file=sys.stderr)
        if datalist is None and store is None:
            raise DataError("data.datalist or data.store must be given")
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
        self.intensity_range = None if intensity_range is None else tuple(float(v) for v in intensity_range)
        self.cache = cache
        self.cache_dir = cache_dir
        self.num_workers = int(num_workers)
        self.train_key = train_key
        self.val_key = val_key
        self.flip_prob = flip_prob
        self.intensity_jitter = float(intensity_jitter)
        self.channels = int(channels)
        self.store = store
        self.verify_store = bool(verify_store)
        self.train_files: list | None = None  # datalist entries, or StoreVolume records with a store
        self.val_files: list = []

    # ------------------------------------------------------------------------------ checks
    @property
    def crops_per_batch(self) -> int:
        return self.batch_size * self.num_samples

    def metadata(self) -> dict[str, Any]:
        """What a downstream user must know to feed the pretrained encoder the same way."""
        if self.plan is not None:
            return {"spacing": self.plan.spacing, "intensity_range": None, "roi_size": self.roi_size,
                    "orientation": self.plan.axes(), "normalization": list(self.plan.normalization_schemes),
                    "nnunet_plan": self.plan.as_dict()}
        return {"spacing": self.spacing, "intensity_range": self.intensity_range, "roi_size": self.roi_size,
                "orientation": "RAS"}

    def validate(self) -> None:
        """Resolve and check every file (exists, 3D, channels; with ``check="full"`` every voxel), or the store
        (settings as configured, every volume a whole array of the recorded shape), before anything is written."""
        if self.train_files is not None:
            return
        if self.store is not None:
            store = open_store(self.store)
            store.check_agrees(self.store_settings(), self.datalist)
            store.check_files()
            if self.verify_store:
                refuse_problems(verify_store(self.store), self.store)
            train, val = store.volumes("training"), store.volumes("validation")
            if not train:
                raise DataError(f"store {self.store} holds no training volumes")
        else:
            train, val = self.source_files()
        self.train_files, self.val_files = train, val

    def source_files(self) -> tuple[list[dict], list[dict]]:
        """The datalist's training and validation entries, each file checked (exists, readable header, 3D)."""
        if self.datalist is None:
            raise DataError("data.datalist is not set")
        source = Path(self.datalist)
        if source.is_dir():
            train, val = folder_entries(source), []
        else:
            train = load_datalist(source, self.train_key)
            val = load_datalist(source, self.val_key, required=False) if self.val_key else []
        for entry in train + val:
            check_entry(entry["image"], spatial_dims=3, channels=self.expected_channels, full=self.check == "full",
                        spacing=self.spacing)
        return train, val

    @property
    def expected_channels(self) -> int:
        """The channels every volume must have: the network's (set by the CLI), else ``channels``."""
        return self.channels if self.in_channels is None else int(self.in_channels)

    def store_settings(self) -> StoreSettings:
        """The preprocessing settings a store for this data module is made with (and must have)."""
        if self.plan is not None:
            return StoreSettings(self.plan.spacing, None, self.expected_channels, orientation=self.plan.axes(),
                                 plan=self.plan.as_dict())
        return StoreSettings(self.spacing, self.intensity_range, self.expected_channels)

    # ------------------------------------------------------------------------------ datasets
    def preprocess(self) -> mt.Compose:
        """The deterministic part (cached): the plan's preprocessing when there is one, else ``ct_preprocess``."""
        if self.plan is not None:
            return mt.Compose([PlanPreprocessd(self.plan), mt.SpatialPadd("image", spatial_size=self.roi_size),
                               mt.EnsureTyped("image", track_meta=False)])
        return ct_preprocess(("image",), self.spacing, self.intensity_range, self.roi_size, channels=self.expected_channels)

    def jitter(self) -> list[mt.MapTransform]:
        """Random intensity scale and shift of the crops (none when ``intensity_jitter`` is 0)."""
        if self.intensity_jitter <= 0:
            return []
        return [mt.RandScaleIntensityd("image", factors=self.intensity_jitter, prob=1.0),
                mt.RandShiftIntensityd("image", offsets=self.intensity_jitter, prob=1.0)]

    def setup(self, stage: str | None = None) -> None:
        self.validate()
        if self.store is not None:
            self.setup_store()
            return
        pre = self.preprocess()
        # flattened: caching datasets cache up to the first random transform, and a nested Compose counts as one
        augment = [ct_pretrain_augment(self.roi_size, self.num_samples, self.flip_prob), *self.jitter()]
        train_tf = mt.Compose([pre, *augment]).flatten()
        self.train_ds = cached_dataset(shard_for_rank(self.train_files, self.trainer), train_tf, self.cache, self.cache_dir)
        self.val_ds = None
        if self.val_files:
            val_tf = mt.Compose([pre, mt.CenterSpatialCropd("image", roi_size=self.roi_size)]).flatten()
            self.val_ds = cached_dataset(shard_for_rank(self.val_files, self.trainer, even=False), val_tf, self.cache,
                                         self.cache_dir)

    def setup_store(self) -> None:
        """Datasets reading crops from the store: this rank's shard of the volumes, its own random stream."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        seed = torch.initial_seed()  # what seed_everything set: the same on every rank and on resume
        common = {"roi_size": self.roi_size, "seed": seed, "stream": rank}
        self.train_ds = StoreCropDataset(shard_for_rank(self.train_files, self.trainer), num_samples=self.num_samples,
                                         flip_prob=self.flip_prob, intensity_jitter=self.intensity_jitter, **common)
        self.val_ds = None
        if self.val_files:
            self.val_ds = StoreCropDataset(shard_for_rank(self.val_files, self.trainer, even=False), center=True, **common)

    def train_dataloader(self) -> md.DataLoader:
        return self.train_order.loader(self.train_ds, self.batch_size, self.num_workers,
                                       drop_last=len(self.train_ds) > self.batch_size)

    def val_dataloader(self):
        if self.val_ds is None:
            return []
        return eval_loader(self.val_ds, self.batch_size * self.num_samples, self.num_workers)

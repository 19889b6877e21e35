"""MONAI dictionary transforms for CT: deterministic preprocessing (cacheable) and random augmentation."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from monai import transforms as mt

from .datalist import DataError, check_values

__all__ = ["LoadVolumed", "ct_preprocess", "ct_pretrain_augment", "crop_indices", "segmentation_augment"]


class LoadVolumed(mt.MapTransform):
    """``LoadImaged`` + channel first, with one clear error naming the file when it cannot be read, is not a
    ``spatial_dims`` volume, holds non-finite values, has another channel count than ``channels`` (first key,
    the image) or, for the image, is constant."""

    def __init__(self, keys: Sequence[str], spatial_dims: int = 3, channels: int | None = None) -> None:
        super().__init__(keys)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.load = mt.LoadImaged(keys, reader="NibabelReader", image_only=True)
        self.channel = mt.EnsureChannelFirstd(keys)

    def __call__(self, data):
        try:
            out = self.load(data)
        except Exception as err:
            names = ", ".join(str(data.get(k)) for k in self.keys)
            cause = err.__cause__ or err
            raise DataError(f"cannot read {names}: {type(cause).__name__}: {cause}") from None
        for k in self.keys:
            shape = tuple(out[k].shape)
            if len(shape) < self.spatial_dims or any(s <= 1 for s in shape[: self.spatial_dims]):
                raise DataError(f"{data[k]} has shape {shape}; expected a {self.spatial_dims}D volume")
        out = self.channel(out)
        for i, k in enumerate(self.keys):
            check_values(out[k], data[k], constant_ok=i > 0)
        found = int(out[self.keys[0]].shape[0])
        if self.channels is not None and found != self.channels:
            raise DataError(f"{data[self.keys[0]]} has {found} channel(s) (shape {tuple(out[self.keys[0]].shape)}, "
                            f"channel first); the network takes {self.channels}")
        return out


def ct_preprocess(
    keys: Sequence[str] = ("image",),
    spacing: Sequence[float] | None = (1.5, 1.5, 2.0),
    intensity_range: Sequence[float] | None = (-1000.0, 1000.0),
    roi_size: Sequence[int] | None = None,
    crop_foreground: bool = True,
    track_meta: bool = False,
    channels: int | None = None,
) -> mt.Compose:
    """Load (checked: finite, ``channels`` when given), RAS, resample, intensity → [0, 1] (HU window; ``None``:
    MRI z-score over non-zero voxels), crop to foreground, pad to the ROI. Deterministic. ``track_meta`` keeps
    what is needed to invert it."""
    keys = list(keys)
    image_key = keys[0]
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    steps = [LoadVolumed(keys, channels=channels), mt.Orientationd(keys, axcodes="RAS", labels=None)]
    if spacing is not None:
        steps.append(mt.Spacingd(keys, pixdim=tuple(spacing), mode=modes))
    if intensity_range is not None:
        lo, hi = intensity_range
        steps.append(mt.ScaleIntensityRanged(image_key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    else:
        steps.append(mt.NormalizeIntensityd(image_key, nonzero=True, channel_wise=True))
    if crop_foreground:
        select = (lambda x: x > 0) if intensity_range is not None else (lambda x: x != 0)
        steps.append(mt.CropForegroundd(keys, source_key=image_key, select_fn=select, allow_smaller=True, margin=2))
    if roi_size is not None:
        steps.append(mt.SpatialPadd(keys, spatial_size=tuple(roi_size)))
    if not track_meta:
        steps.append(mt.EnsureTyped(keys, dtype=[np.float32] + [np.uint8] * (len(keys) - 1), track_meta=False))
    return mt.Compose(steps)


def crop_indices(sampling: str = "posneg", num_classes: int | None = None) -> mt.MapTransform:
    """Voxel indices the random crops sample from, computed once (deterministic, so it is cached)."""
    if sampling == "classes":
        return mt.ClassesToIndicesd("label", num_classes=num_classes)
    return mt.FgBgToIndicesd("label", image_key="image", image_threshold=0)


def segmentation_augment(roi_size: Sequence[int], num_samples: int = 4, intensity: bool = True,
                         sampling: str = "posneg", num_classes: int | None = None) -> mt.Compose:
    """The Swin UNETR / MONAI BTCV recipe: positive/negative crops, flips, rot90, intensity jitter.

    ``sampling="classes"`` centres crops on every class equally often instead (helps small organs).
    """
    keys = ["image", "label"]
    if sampling == "classes":
        crop = mt.RandCropByLabelClassesd(keys, label_key="label", spatial_size=tuple(roi_size), num_classes=num_classes,
                                          num_samples=num_samples, allow_smaller=True, warn=False,
                                          indices_key="label_cls_indices")
    elif sampling == "posneg":
        crop = mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=tuple(roi_size), pos=1, neg=1,
                                         num_samples=num_samples, image_key="image", image_threshold=0, allow_smaller=True,
                                         fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices")
    else:
        raise ValueError(f"crop sampling must be 'posneg' or 'classes', got '{sampling}'")
    steps = [
        crop,
        mt.SpatialPadd(["image", "label"], spatial_size=tuple(roi_size)),
        *[mt.RandFlipd(["image", "label"], prob=0.1, spatial_axis=a) for a in range(len(roi_size))],
        mt.RandRotate90d(["image", "label"], prob=0.1, max_k=3),
    ]
    if intensity:
        steps += [mt.RandScaleIntensityd("image", factors=0.1, prob=0.1),
                  mt.RandShiftIntensityd("image", offsets=0.1, prob=0.1)]
    steps.append(mt.EnsureTyped(["image", "label"], track_meta=False))
    return mt.Compose(steps)


def ct_pretrain_augment(roi_size: Sequence[int], num_samples: int = 2, flip_prob: float = 0.5) -> mt.Compose:
    """Several random ROI crops per volume, random flips along each axis."""
    return mt.Compose(
        [
            mt.RandSpatialCropSamplesd("image", roi_size=tuple(roi_size), num_samples=num_samples, random_size=False),
            *[mt.RandFlipd("image", prob=flip_prob, spatial_axis=a) for a in range(len(roi_size))],
            mt.EnsureTyped("image", track_meta=False),
        ]
    )

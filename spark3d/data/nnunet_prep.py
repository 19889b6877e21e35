"""Data as nnU-Net shows it: a plan's preprocessing of one case, and nnU-Net raw dataset folders as datalists.

nnU-Net's ``DefaultPreprocessor`` reads each channel file with SimpleITK (arrays in (z, y, x), spacing
reversed to match), stacks the channels, applies the plan's ``transpose_forward`` to the axes and the
spacing, crops to the bounding box of the non-zero voxels, normalises each channel (``CTNormalization``:
clip to the dataset's foreground ``percentile_00_5`` / ``percentile_99_5``, subtract its foreground
``mean``, divide by its ``std``, all from ``foreground_intensity_properties_per_channel``), then resamples
to the configuration's ``spacing`` with the plan's ``resampling_fn_data``. :func:`preprocess_case` does the
same steps in the same order; the resampling itself is nnU-Net's own function named by the plan (so it
needs ``nnunetv2``), everything else is here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai import transforms as mt

from ..backbones import plan_configuration, read_plans
from ..errors import ConfigError, DataError

__all__ = ["PlanPreprocessing", "is_nnunet_raw", "nnunet_raw_datalist", "read_case", "preprocess_case",
           "PlanPreprocessd", "CT_SCHEME"]

CT_SCHEME = "CTNormalization"
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class PlanPreprocessing:
    """What one configuration of a plan does to a case (everything plain JSON, recorded by the CT store)."""

    plans: str
    configuration: str
    plans_name: str
    dataset_name: str
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...]
    transpose_forward: tuple[int, ...]
    normalization_schemes: tuple[str, ...]
    intensity_properties: tuple[dict, ...]  # per channel: mean, std, percentile_00_5, percentile_99_5
    resampling_fn_data: str
    resampling_fn_data_kwargs: dict

    @classmethod
    def from_plans(cls, plans: str | Path, configuration: str = "3d_fullres") -> "PlanPreprocessing":
        """Read a plans file; ConfigError (one line) when a field is missing or a channel is not CT-normalised."""
        content = read_plans(plans)
        conf = plan_configuration(content, configuration, str(plans))
        missing = [k for k in ("patch_size", "spacing", "normalization_schemes", "resampling_fn_data") if k not in conf]
        if missing or "transpose_forward" not in content:
            raise ConfigError(f"{plans}: configuration '{configuration}' lacks {missing or ['transpose_forward']}")
        schemes = tuple(str(s) for s in conf["normalization_schemes"])
        props = content.get("foreground_intensity_properties_per_channel") or {}
        for channel, scheme in enumerate(schemes):
            if scheme != CT_SCHEME:
                raise ConfigError(f"{plans}: configuration '{configuration}' normalises channel {channel} with {scheme}; "
                                  f"spark3d pretrains for plans whose channels all use {CT_SCHEME}")
            if str(channel) not in props:
                raise ConfigError(f"{plans}: foreground_intensity_properties_per_channel has no channel {channel}")
        keys = ("mean", "std", "percentile_00_5", "percentile_99_5")
        intensity = tuple({k: float(props[str(c)][k]) for k in keys} for c in range(len(schemes)))
        return cls(str(Path(plans).absolute()), configuration, str(content.get("plans_name", Path(plans).stem)),
                   str(content.get("dataset_name", "")), tuple(int(s) for s in conf["patch_size"]),
                   tuple(float(s) for s in conf["spacing"]), tuple(int(a) for a in content["transpose_forward"]),
                   schemes, intensity, str(conf["resampling_fn_data"]), dict(conf.get("resampling_fn_data_kwargs") or {}))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlanPreprocessing":
        """Inverse of :meth:`as_dict` (what a CT store recorded)."""
        tup = {"patch_size", "spacing", "transpose_forward", "normalization_schemes", "intensity_properties"}
        return cls(**{k: tuple(v) if k in tup else v for k, v in d.items()})

    @property
    def channels(self) -> int:
        return len(self.normalization_schemes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))

    def axes(self) -> str:
        """The axis order of the arrays it makes, in words (for metadata and messages)."""
        return f"SimpleITK (z, y, x) then transpose_forward {list(self.transpose_forward)}"


# ---------------------------------------------------------------------------------------------- raw dataset folders
def is_nnunet_raw(folder: str | Path) -> bool:
    """Whether a folder looks like an nnU-Net raw dataset (``dataset.json`` with ``channel_names`` + ``imagesTr``)."""
    folder = Path(folder)
    if not (folder / "dataset.json").is_file() or not (folder / "imagesTr").is_dir():
        return False
    try:
        meta = json.loads((folder / "dataset.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and "channel_names" in meta


def nnunet_raw_datalist(folder: str | Path) -> list[dict]:
    """Every case of ``imagesTr`` and ``imagesTs`` as ``{"image": [channel files, in channel order]}``; labels ignored.
    DataError naming the case when a channel file is missing."""
    folder = Path(folder)
    path = folder / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or "channel_names" not in meta or "file_ending" not in meta:
        raise DataError(f"{path} needs 'channel_names' and 'file_ending' (an nnU-Net v2 raw dataset)")
    channels, ending = len(meta["channel_names"]), str(meta["file_ending"])
    entries = []
    for sub in ("imagesTr", "imagesTs"):
        cases: dict[str, dict[int, Path]] = {}
        for file in sorted((folder / sub).glob(f"*{ending}")) if (folder / sub).is_dir() else []:
            match = _CHANNEL.match(file.name[: -len(ending)])
            if match is None:
                raise DataError(f"{file}: nnU-Net image files are named CASE_XXXX{ending} (XXXX: the channel)")
            cases.setdefault(match["case"], {})[int(match["channel"])] = file
        for case, files in cases.items():
            absent = [c for c in range(channels) if c not in files]
            if absent:
                raise DataError(f"{folder / sub}: case {case} has no channel file(s) "
                                f"{', '.join(f'{case}_{c:04d}{ending}' for c in absent)} ({channels} in dataset.json)")
            entries.append({"image": [str(files[c]) for c in range(channels)]})
    if not entries:
        raise DataError(f"nnU-Net raw dataset {folder} holds no *{ending} images in imagesTr or imagesTs")
    return entries


# ---------------------------------------------------------------------------------------------- one case
def read_case(files: Sequence[str] | str) -> tuple[np.ndarray, tuple[float, ...]]:
    """Channel files read as nnU-Net's SimpleITKIO reads them: ``(C, z, y, x)`` float32 and the (z, y, x) spacing."""
    import SimpleITK as sitk

    files = [files] if isinstance(files, (str, Path)) else list(files)
    arrays, spacings = [], []
    for f in files:
        try:
            image = sitk.ReadImage(str(f))
        except RuntimeError as err:
            raise DataError(f"cannot read {f} with SimpleITK: {str(err).strip().splitlines()[-1]}") from None
        array = sitk.GetArrayFromImage(image)
        if array.ndim != 3:
            raise DataError(f"{f} has {array.ndim} axes (shape {array.shape}); expected one 3D channel per file")
        arrays.append(array.astype(np.float32))
        spacings.append(tuple(abs(float(s)) for s in image.GetSpacing()[::-1]))
    if len({a.shape for a in arrays}) > 1 or len(set(spacings)) > 1:
        raise DataError(f"the channel files {[str(f) for f in files]} differ in shape or spacing")
    return np.stack(arrays), spacings[0]


def _resampler(name: str):
    try:
        from nnunetv2.preprocessing.resampling import default_resampling
    except ImportError:
        raise ConfigError(f"resampling as the plan says ({name}) uses nnU-Net's own function: pip install nnunetv2"
                          ) from None
    fn = getattr(default_resampling, name, None)
    if fn is None:
        raise ConfigError(f"the plan's resampling_fn_data '{name}' is not in nnunetv2.preprocessing.resampling")
    return fn


def preprocess_case(files: Sequence[str] | str, plan: PlanPreprocessing) -> tuple[np.ndarray, tuple[float, ...]]:
    """One case through the plan: read (SimpleITK), transpose, crop to non-zero, CTNormalization, resample.
    Returns the float32 array ``(C, *axes)`` in nnU-Net's axis order and its spacing."""
    data, spacing = read_case(files)
    name = files if isinstance(files, (str, Path)) else files[0]
    if data.shape[0] != plan.channels:
        raise DataError(f"{name}: {data.shape[0]} channel(s); the plan {plan.plans} has {plan.channels}")
    order = list(plan.transpose_forward)
    data = data.transpose([0, *[a + 1 for a in order]])
    spacing = tuple(spacing[a] for a in order)
    nonzero = np.any(data != 0, axis=0)
    if not nonzero.any():
        raise DataError(f"{name}: every voxel is 0 (nothing to crop to)")
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(nonzero))
    data = np.ascontiguousarray(data[(slice(None), *box)])
    for c, props in enumerate(plan.intensity_properties):
        channel = data[c]
        np.clip(channel, props["percentile_00_5"], props["percentile_99_5"], out=channel)
        channel -= props["mean"]
        channel /= max(props["std"], 1e-8)
    shape = np.array([int(round(old / new * n)) for old, new, n in zip(spacing, plan.spacing, data.shape[1:])])
    data = _resampler(plan.resampling_fn_data)(data, shape, spacing, plan.spacing, **plan.resampling_fn_data_kwargs)
    return np.asarray(data, dtype=np.float32), plan.spacing


class PlanPreprocessd(mt.Transform):
    """``{"image": files}`` → ``{"image": tensor (C, *axes)}`` through :func:`preprocess_case` (deterministic)."""

    def __init__(self, plan: PlanPreprocessing, key: str = "image") -> None:
        self.plan = plan
        self.key = key

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        array, _ = preprocess_case(data[self.key], self.plan)
        out[self.key] = torch.from_numpy(array)
        return out

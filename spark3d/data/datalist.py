"""Datalists (MONAI decathlon-style JSON) and folders of volumes, checked before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..errors import DataError

__all__ = ["DataError", "load_datalist", "folder_datalist", "folder_entries", "check_entry", "check_volume",
           "check_values", "check_preprocessed_volume", "check_resampled_size", "CHECKS", "NIFTI_SUFFIXES", "MAX_RESAMPLED_VOXELS"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_RESAMPLED_VOXELS = 2**31  # one volume after resampling (8 GiB in float32): beyond it a header is wrong
CHECKS = ("full", "header")  # what the up-front check reads: every voxel, or the header only


def load_datalist(path: str | Path, key: str = "training", keys: Sequence[str] = ("image",),
                  required: bool = True) -> list[dict]:
    """Entries of ``key`` in a decathlon-style JSON, with paths made absolute (relative to the JSON's folder).

    Raises :class:`DataError` for a missing or malformed file, a missing or empty list (when ``required``),
    entries without the wanted ``keys``, and entries whose files do not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"datalist {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"datalist {path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise DataError(f"datalist {path} must hold a JSON object with a '{key}' list")
    entries = content.get(key)
    if entries is None or entries == []:
        if required:
            raise DataError(f"datalist {path} has no '{key}' cases (keys present: {', '.join(content) or 'none'})")
        return []
    if not isinstance(entries, list):
        raise DataError(f"datalist {path}: '{key}' must be a list of objects")
    base = path.parent
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise DataError(f"datalist {path}: {key}[{i}] must be an object like {{\"image\": \"a.nii.gz\"}}")
        missing_keys = [k for k in keys if k not in entry]
        if missing_keys:
            raise DataError(f"datalist {path}: {key}[{i}] has no {missing_keys} entry")
        resolved = dict(entry)
        for k in keys:
            values = entry[k] if isinstance(entry[k], list) else [entry[k]]
            files = [str(v if Path(v).is_absolute() else (base / v)) for v in values]
            for f in files:
                if not Path(f).is_file():
                    raise DataError(f"datalist {path}: {key}[{i}] '{k}' file {f} does not exist")
            resolved[k] = files if isinstance(entry[k], list) else files[0]
        out.append(resolved)
    return out


def folder_datalist(folder: str | Path) -> list[dict]:
    """Every ``.nii``/``.nii.gz`` file below a folder, sorted, as ``[{"image": path}, …]``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise DataError(f"data folder {folder} holds no .nii or .nii.gz files")
    return [{"image": str(p)} for p in files]


def folder_entries(folder: str | Path) -> list[dict]:
    """A folder as a datalist: an nnU-Net raw dataset (``dataset.json`` with ``channel_names``, ``imagesTr``,
    ``imagesTs``) gives every case with its channel files stacked (labels ignored), any other folder every
    NIfTI file below it."""
    from .nnunet_prep import is_nnunet_raw, nnunet_raw_datalist

    return nnunet_raw_datalist(folder) if is_nnunet_raw(folder) else folder_datalist(folder)


def check_entry(image: str | list[str], spatial_dims: int = 3, channels: int | None = None, full: bool = False,
                spacing: Sequence[float] | None = None) -> None:
    """:func:`check_volume` for a datalist ``image``: one file, or a list of one-channel files stacked as channels."""
    if not isinstance(image, (list, tuple)):
        check_volume(image, spatial_dims, channels, full, spacing=spacing)
        return
    if channels is not None and len(image) != channels:
        raise DataError(f"{image[0]}: {len(image)} channel file(s); the network takes {channels}")
    for file in image:
        check_volume(file, spatial_dims, 1, full, spacing=spacing)


def check_values(x, name: str | Path, constant_ok: bool = False) -> None:
    """Every value finite and, unless ``constant_ok``, not all equal (a numpy array or a tensor); DataError naming ``name``."""
    import numpy as np
    import torch

    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            what = "every voxel is" if bad == t.numel() else f"{bad} of {t.numel()} voxels are"
            raise DataError(f"{name}: {what} NaN or infinite; fix or drop this file")
    if not constant_ok and t.numel() and bool(t.min() == t.max()):
        raise DataError(f"{name} is constant (every voxel {t.flatten()[0].item():g}): nothing to learn from or segment")


def check_resampled_size(path: str | Path, img, spacing: Sequence[float]) -> tuple[int, ...]:
    """The size (RAS axes) a volume has once resampled to ``spacing`` mm, from its header; DataError when an axis
    would be a single voxel (e.g. a 0.01 mm header) or the whole more than :data:`MAX_RESAMPLED_VOXELS` voxels
    (e.g. 1e5 mm): a wrong header, or a wrong spacing."""
    import nibabel as nib
    import numpy as np

    affine = np.asarray(img.affine, dtype=np.float64)
    voxel_mm = np.sqrt((affine[:3, :3] ** 2).sum(0))
    extent = [0.0, 0.0, 0.0]
    for axis, (world, _) in enumerate(nib.orientations.io_orientation(affine)[:3]):
        extent[int(world)] = float(img.shape[axis] * voxel_mm[axis])
    size = tuple(int(round(e / float(s))) for e, s in zip(extent, spacing))
    shown = tuple(float(f"{v:.3g}") for v in voxel_mm)
    if any(v <= 1 for v in size):
        axis = next(i for i, v in enumerate(size) if v <= 1)
        raise DataError(f"{path}: resampled to spacing {tuple(spacing)} mm it would be {size} voxels, a single voxel on "
                        f"axis {axis} (its header's voxels are {shown} mm): check the header or data.init_args.spacing")
    if float(np.prod(np.array(size, dtype=np.float64))) > MAX_RESAMPLED_VOXELS:
        raise DataError(f"{path}: resampled to spacing {tuple(spacing)} mm it would be {size} voxels, more than "
                        f"{MAX_RESAMPLED_VOXELS} (its header's voxels are {shown} mm): check the header or "
                        "data.init_args.spacing")
    return size


def check_volume(path: str | Path, spatial_dims: int = 3, channels: int | None = None, full: bool = False,
                 constant_ok: bool = False, spacing: Sequence[float] | None = None):
    """Check a NIfTI file holds a volume of ``spatial_dims`` axes (and ``channels`` channels when given) from its
    header; ``full`` also decompresses every voxel and checks them (finite; not constant unless ``constant_ok``);
    ``spacing`` (3D): its resampled size is checked (:func:`check_resampled_size`). Returns the (lazy) nibabel image."""
    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as err:  # nibabel raises several types for unreadable files
        raise DataError(f"cannot read {path} as NIfTI: {err}") from None
    if len(shape) < spatial_dims or any(s <= 1 for s in shape[:spatial_dims]):
        raise DataError(f"{path} has shape {shape}; expected a {spatial_dims}D volume (every spatial axis > 1)")
    found = int(np.prod(shape[spatial_dims:], dtype=np.int64)) if len(shape) > spatial_dims else 1
    if channels is not None and found != channels:
        raise DataError(f"{path} has {found} channel(s) (shape {shape}); the network takes {channels}")
    if spacing is not None and spatial_dims == 3:
        check_resampled_size(path, img, spacing)
    if full:
        try:
            data = np.asanyarray(img.dataobj)
        except Exception as err:  # truncated gzip (EOFError), bad zlib stream, short file (OSError, ValueError)
            raise DataError(f"cannot read {path}: truncated or corrupt data ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
        check_values(data, path, constant_ok)
    return img


def check_preprocessed_volume(array, name: str, spatial_dims: int = 3, channels: int | None = None) -> None:
    """Refuse a preprocessed volume (channels first) that cannot train anything: wrong number of axes or
    channels, an empty or flat axis, a non-finite voxel, or one value everywhere. Raises :class:`DataError`
    naming ``name``."""
    import numpy as np

    shape = tuple(int(s) for s in array.shape)
    if len(shape) != spatial_dims + 1:
        raise DataError(f"{name}: preprocessed shape {shape}; expected (channels, {spatial_dims} spatial axes)")
    if channels is not None and shape[0] != channels:
        raise DataError(f"{name}: {shape[0]} channels; expected {channels}")
    if array.size == 0:
        raise DataError(f"{name}: empty after preprocessing (shape {shape}: no foreground inside the intensity window)")
    if any(s <= 1 for s in shape[1:]):
        raise DataError(f"{name}: preprocessed shape {shape} has a single-voxel spatial axis")
    finite = np.isfinite(array)
    if not finite.all():
        raise DataError(f"{name}: {int(finite.size - finite.sum())} non-finite voxels (NaN/inf) after preprocessing")
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise DataError(f"{name}: every voxel is {lo} after preprocessing (an empty or constant volume)")

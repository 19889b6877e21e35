"""Turn raw BTCV and Medical Segmentation Decathlon folders into checked, split datalists.

Raw data is only read. Every image/label pair is checked, every voxel decompressed (readable to the
end, finite, the image not constant, same spatial shape and affine, label values within the declared
classes); the first bad case is named in a :class:`DataError`, and nothing is written unless every
check passes.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np

from .datalist import DataError, check_volume
from .datasets import BTCV_LABELS, BTCV_TRAIN_IDS, BTCV_VAL_IDS

__all__ = ["check_pair", "prepare_btcv", "prepare_msd", "write_json_atomic"]


def write_json_atomic(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


def check_pair(image: Path, label: Path, num_classes: int, channels: int | None = None, full: bool = True) -> None:
    """Image and label exist, share spatial shape and affine, labels lie in ``0..num_classes-1``, the image has
    ``channels`` channels (when given); ``full`` also reads every image voxel (finite, not constant)."""
    for path, what in ((image, "image"), (label, "label")):
        if not path.is_file():
            raise DataError(f"{what} file {path} does not exist")
    img, lab = check_volume(image, channels=channels, full=full), check_volume(label, channels=1)
    if tuple(img.shape[:3]) != tuple(lab.shape[:3]):
        raise DataError(f"label {label} has shape {tuple(lab.shape[:3])} but its image {image} has {tuple(img.shape[:3])}")
    if not np.allclose(img.affine, lab.affine, atol=1e-3):
        raise DataError(f"label {label} and image {image} have different affines (voxel-to-world mappings)")
    try:
        values = np.unique(np.asanyarray(lab.dataobj))
    except Exception as err:
        raise DataError(f"cannot read label {label}: truncated or corrupt data ({type(err).__name__}: {err})") from None
    if not np.isfinite(values).all():
        raise DataError(f"label {label} holds NaN or infinite values; expected integers 0..{num_classes - 1}")
    if values.min() < 0 or values.max() > num_classes - 1 or not np.allclose(values, np.round(values)):
        raise DataError(f"label {label} holds values {values.tolist()[:20]}; expected integers 0..{num_classes - 1}")


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def prepare_btcv(raw: str | Path, out: str | Path) -> Path:
    """``RawData/Training/{img,label}``, ``RawData/Testing/img`` → ``out/dataset_0.json`` (24 train / 6 val)."""
    raw, out = Path(raw), Path(out)
    img_dir, lab_dir = raw / "Training" / "img", raw / "Training" / "label"
    if not img_dir.is_dir():
        raise DataError(f"{raw} does not look like BTCV RawData: {img_dir} is missing")
    if not lab_dir.is_dir():
        raise DataError(f"{raw} does not look like BTCV RawData: {lab_dir} is missing")
    cases = {}
    for path in sorted(img_dir.glob("img*.nii*")):
        match = re.fullmatch(r"img(\d{4})\.nii(\.gz)?", path.name)
        if match:
            cases[int(match.group(1))] = path
    if not cases:
        raise DataError(f"no imgNNNN.nii.gz files in {img_dir}")
    out = out.resolve()
    split: dict[str, list] = {"training": [], "validation": []}
    for key, ids in (("training", BTCV_TRAIN_IDS), ("validation", BTCV_VAL_IDS)):
        for case in ids:
            if case not in cases:
                continue
            image = cases[case]
            label = lab_dir / image.name.replace("img", "label", 1)
            check_pair(image, label, num_classes=14, channels=1)  # BTCV is single-channel CT
            split[key].append({"image": _rel(image.resolve(), out), "label": _rel(label.resolve(), out)})
    unused = sorted(set(cases) - set(BTCV_TRAIN_IDS) - set(BTCV_VAL_IDS))
    tests = []
    test_dir = raw / "Testing" / "img"
    for image in sorted(test_dir.glob("img*.nii*")) if test_dir.is_dir() else []:
        check_volume(image, channels=1, full=True)
        tests.append({"image": _rel(image.resolve(), out)})
    if not split["training"]:
        raise DataError(f"none of the standard BTCV training cases (img0001-0010, img0021-0034) are in {img_dir}")
    datalist = {
        "name": "BTCV", "description": "Multi-Atlas Labeling Beyond the Cranial Vault, standard split (dataset_0.json)",
        "modality": {"0": "CT"}, "labels": {str(k): v for k, v in BTCV_LABELS.items()},
        "numTraining": len(split["training"]), "numValidation": len(split["validation"]),
        **split, "test": tests, "unused_training_cases": unused,
    }
    path = out / "dataset_0.json"
    write_json_atomic(path, datalist)
    return path


def prepare_msd(task: str | Path, out: str | Path, val_fraction: float = 0.2, seed: int = 0,
                folds: int | None = None, fold: int | None = None) -> Path:
    """A Decathlon task folder → ``out/<task>_datalist.json`` with a seeded, recorded train/validation split."""
    task, out = Path(task), Path(out).resolve()
    meta_path = task / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"{task} is not a Decathlon task folder: {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path} is not valid JSON: {err}") from None
    for key in ("labels", "training"):
        if key not in meta:
            raise DataError(f"{meta_path} has no '{key}' key")
    labels = {str(k): v for k, v in meta["labels"].items()}
    num_classes = max(int(k) for k in labels) + 1
    entries = []
    for i, item in enumerate(meta["training"]):
        if "image" not in item or "label" not in item:
            raise DataError(f"{meta_path}: training[{i}] needs 'image' and 'label'")
        image, label = (task / item["image"]).resolve(), (task / item["label"]).resolve()
        check_pair(image, label, num_classes)
        entries.append({"image": _rel(image, out), "label": _rel(label, out)})
    if len(entries) < 2:
        raise DataError(f"{meta_path} lists {len(entries)} training case(s); a split needs at least 2")
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    if folds is not None:
        if fold is None or not 0 <= fold < folds:
            raise DataError(f"--fold must be in 0..{folds - 1} with --folds {folds}")
        val_idx = set(order[fold::folds])
        split_info = {"method": "k-fold", "folds": folds, "fold": fold, "seed": seed}
    else:
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
        n_val = max(1, round(len(entries) * val_fraction))
        val_idx = set(order[:n_val])
        split_info = {"method": "holdout", "val_fraction": val_fraction, "seed": seed}
    tests = []
    for item in meta.get("test", []):
        path = (task / (item if isinstance(item, str) else item["image"])).resolve()
        if not path.is_file():
            raise DataError(f"{meta_path}: test image {path} does not exist")
        check_volume(path, full=True)
        tests.append({"image": _rel(path, out)})
    split_info["validation_cases"] = sorted(Path(entries[i]["image"]).name for i in val_idx)
    datalist = {
        "name": meta.get("name", task.name), "description": meta.get("description", ""),
        "modality": meta.get("modality", {}), "labels": labels,
        "training": [e for i, e in enumerate(entries) if i not in val_idx],
        "validation": [e for i, e in enumerate(entries) if i in val_idx],
        "test": tests, "split": split_info,
    }
    suffix = f"_fold{fold}" if folds is not None else ""
    path = out / f"{task.name}_datalist{suffix}.json"
    write_json_atomic(path, datalist)
    return path

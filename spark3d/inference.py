"""Whole-volume inference in the original image space: evaluate (Dice per case and organ) and predict."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from .checkpoint import LABEL_NAMES_KEY, read_lightning_checkpoint
from .data.datalist import NIFTI_SUFFIXES, check_volume, load_datalist
from .data.segmentation import SegmentationData
from .errors import CheckpointError, DataError

__all__ = ["load_checkpoint", "label_names", "predict_volume", "evaluate", "predict", "dice_per_class"]


def load_checkpoint(module: torch.nn.Module, ckpt_path: str | None) -> None:
    """Load a Lightning checkpoint's weights into ``module``, read weights-only (an error names a missing, unsafe,
    non-finite or foreign file)."""
    state = read_lightning_checkpoint(ckpt_path)
    path = Path(ckpt_path)
    own = module.state_dict()
    wrong = [k for k, v in state["state_dict"].items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not fit this config's network ({len(wrong)} tensors of other "
                              f"shapes, e.g. '{wrong[0]}' {tuple(state['state_dict'][wrong[0]].shape)} vs "
                              f"{tuple(own[wrong[0]].shape)})")
    missing, unexpected = module.load_state_dict(state["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this config's network "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[:2]})")
    names = state.get(LABEL_NAMES_KEY)
    if isinstance(names, list) and hasattr(module, "label_names") and len(names) == len(module.label_names):
        module.label_names = [str(n) for n in names]
        module.label_names_from_checkpoint = True
    module.eval()


def label_names(module, data_module: SegmentationData, datalist: str | None = None) -> list[str]:
    """The class names: the checkpoint's, else the ``labels`` of ``datalist`` (or the config's) when that file
    exists, else ``class<i>`` — said in one line then."""
    if getattr(module, "label_names_from_checkpoint", False):
        return list(module.label_names)
    source = datalist or data_module.datalist
    if source and Path(source).is_file():
        try:
            labels = json.loads(Path(source).read_text()).get("labels", {})
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise DataError(f"cannot read datalist {source}: {err}") from None
        return [str(labels.get(str(i), f"class{i}")) for i in range(module.hparams.num_classes)]
    print(f"spark3d: the checkpoint names no classes and datalist {source} is absent: classes are named class0.."
          f"class{module.hparams.num_classes - 1}", file=sys.stderr)
    return [f"class{i}" for i in range(module.hparams.num_classes)]


def _case_name(path: str | list[str]) -> str:
    name = Path(path[0] if isinstance(path, list) else path).name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@torch.no_grad()
def predict_volume(module, data_module: SegmentationData, image: str | list[str]) -> np.ndarray:
    """Label map (uint8) of one image, in the image's own voxel grid (preprocessing inverted)."""
    pre = data_module.preprocess(keys=("image",), track_meta=True, pad=False)
    item = pre({"image": image})
    x = item["image"]
    logits = module.sliding_window(x.as_tensor()[None].to(module.device).float())
    prob = torch.softmax(logits[0].float(), 0).cpu()
    item["pred"] = MetaTensor(prob, meta=x.meta, applied_operations=x.applied_operations)
    inverted = mt.Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(item)
    return inverted["pred"].argmax(0).numpy().astype(np.uint8)


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..num_classes-1; NaN where the class is absent from the label."""
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        if not g.any():
            out.append(math.nan)
        else:
            out.append(2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum()))
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(module, data_module: SegmentationData, ckpt_path: str | None, out: str, split: str = "validation",
             datalist: str | None = None) -> dict[str, Any]:
    """Per-case, per-organ Dice at the original resolution → ``out/dice_per_case.csv`` and ``out/summary.json``.
    The checkpoint is read (weights-only) first, then every case of ``split`` of ``datalist`` (default: the
    config's) is checked, before anything runs; no other list (the training one) needs to exist."""
    load_checkpoint(module, ckpt_path)
    cases = load_datalist(datalist or data_module.datalist, split, keys=("image", "label"))
    for case in cases:
        data_module.check_case(case)
    names = label_names(module, data_module, datalist)
    rows = []
    for case in cases:
        pred = predict_volume(module, data_module, case["image"])
        label = np.asanyarray(nib.load(case["label"]).dataobj).astype(np.int64)
        if pred.shape != label.shape:
            raise DataError(f"prediction for {case['image']} has shape {pred.shape}, label {label.shape}")
        scores = dice_per_class(pred, label, module.hparams.num_classes)
        rows.append((_case_name(case["image"]), scores))
    organs = names[1:]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case", *organs, "mean"])
    for case, scores in rows:
        writer.writerow([case, *[("" if math.isnan(s) else f"{s:.4f}") for s in scores], f"{np.nanmean(scores):.4f}"])
    table = np.array([scores for _, scores in rows], dtype=float)
    per_organ = {o: {"mean": float(np.nanmean(table[:, i])) if (~np.isnan(table[:, i])).any() else None,
                     "std": float(np.nanstd(table[:, i])) if (~np.isnan(table[:, i])).any() else None,
                     "cases": int((~np.isnan(table[:, i])).sum())} for i, o in enumerate(organs)}
    means = [v["mean"] for v in per_organ.values() if v["mean"] is not None]
    summary = {"split": split, "cases": len(rows), "checkpoint": str(ckpt_path), "per_organ": per_organ,
               "mean_dice": float(np.mean(means)) if means else None}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "dice_per_case.csv", buf.getvalue())
    _atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2))
    lines = [f"{'organ':<26} {'Dice':>6}  cases"]
    for organ, v in per_organ.items():
        lines.append(f"{organ:<26} {('%.3f' % v['mean']) if v['mean'] is not None else '   -  ':>6}  {v['cases']}")
    lines.append(f"{'mean':<26} {summary['mean_dice'] if summary['mean_dice'] is None else round(summary['mean_dice'], 3):>6}")
    summary["table"] = "\n".join(lines)
    return summary


def _inputs(source: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise DataError(f"input folder {path} holds no .nii/.nii.gz files")
        return files
    if not path.is_file():
        raise DataError(f"input {path} does not exist")
    return [str(path)]


def check_predict_plan(source: str, out: str, files: list[str]) -> None:
    """The output folder is not the input folder nor inside it, and no two inputs share an output name."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if src.is_dir() and (dst == src or src in dst.parents):
        raise DataError(f"--out {out} is {'the input folder' if dst == src else 'inside the input folder'} {source}: "
                        "predictions would mix with (and be read back as) inputs; choose another folder")
    seen: dict[str, str] = {}
    for f in files:
        case = _case_name(f)
        if case in seen:
            raise DataError(f"{seen[case]} and {f} would both be written to {case}_seg.nii.gz; rename one of them")
        seen[case] = f


def predict(module, data_module: SegmentationData, ckpt_path: str | None, source: str, out: str) -> list[Path]:
    """Write ``<case>_seg.nii.gz`` (input's shape and affine) and ``<case>_overlay.png`` per input. The checkpoint
    (weights-only), the output plan and every input (every voxel, channels) are checked before anything is written."""
    from .viz import save_overlay

    load_checkpoint(module, ckpt_path)
    files = _inputs(source)
    check_predict_plan(source, out, files)
    for f in files:
        check_volume(f, channels=data_module.in_channels, full=True, spacing=data_module.spacing)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = label_names(module, data_module)
    window = data_module.metadata()["intensity_range"]  # None for MRI: the overlay uses percentiles
    written = []
    for f in files:
        original = nib.load(f)
        label = predict_volume(module, data_module, f)
        spatial = tuple(original.shape[:3])
        if label.shape != spatial:
            raise DataError(f"prediction for {f} has shape {label.shape}, expected {spatial}")
        case = _case_name(f)
        seg_path = out_dir / f"{case}_seg.nii.gz"
        img = nib.Nifti1Image(label, original.affine)
        img.set_qform(original.affine, code=1)
        img.set_sform(original.affine, code=1)
        nib.save(img, str(seg_path))
        image = np.asanyarray(original.dataobj).astype(np.float32)
        image = image[..., 0] if image.ndim == 4 else image
        png = save_overlay(out_dir / f"{case}_overlay.png", image, label, original.affine, names,
                           window=window, title=case)
        written += [seg_path, png]
    return written

"""Synthetic abdominal CT phantoms with the 13 BTCV organ labels, written in the BTCV raw layout.

Each case is a body (skin/subcutaneous fat, muscle wall, visceral fat and soft tissue), a spine and
ribs, and 13 organ-like structures with the BTCV label ids and HU values of contrast-enhanced CT,
jittered per case (position, size, intensity), with noise and anisotropic spacing. Deterministic
for a given seed. The demo and the tests use them as their embedded data.

``variation="wide"`` draws much more per case: body size, organ shape (rotated, lobulated ellipsoids), size,
position and HU, vessel calibre, noise level and spacing, so that many volumes hold something to learn that a few
do not. ``"context"`` is ``"wide"`` with the solid organs (liver, spleen, kidneys, pancreas, adrenal glands) drawn
from one HU band per case, as in real portal-venous CT where they overlap: telling them apart takes their shape
and place, not their intensity. ``"standard"`` is the demo's, unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import nibabel as nib
import numpy as np

from .datasets import BTCV_LABELS

__all__ = ["make_phantom", "write_btcv_phantoms", "btcv_case_ids"]


@dataclass(frozen=True)
class _Organ:
    label: int
    centre: tuple[float, float, float]  # mm; x towards the patient's left, y anterior, z superior
    radii: tuple[float, float, float]  # semi-axes in mm
    hu: float


# Ellipsoids (x = towards the patient's left, so the liver sits at x < 0; y anterior; z superior), in mm, and
# portal-venous-phase HU. Small structures are drawn larger than in real abdomens (adrenals, oesophagus, veins)
# and each organ has its own HU band (bile below the bowel, adrenals between liver and veins), so that a short
# CPU demo at 6 mm can find all 13.
_ORGANS = (
    _Organ(6, (-60.0, 5.0, 45.0), (70.0, 65.0, 60.0), 65.0),  # liver
    _Organ(1, (85.0, -35.0, 55.0), (30.0, 25.0, 42.0), 100.0),  # spleen
    _Organ(7, (45.0, 35.0, 45.0), (38.0, 28.0, 40.0), 0.0),  # stomach (water-filled)
    _Organ(2, (-62.0, -55.0, -15.0), (24.0, 22.0, 45.0), 160.0),  # right kidney
    _Organ(3, (62.0, -55.0, -15.0), (24.0, 22.0, 45.0), 160.0),  # left kidney
    _Organ(4, (-45.0, 30.0, 0.0), (18.0, 18.0, 30.0), -60.0),  # gallbladder (bile)
    _Organ(11, (5.0, -5.0, 15.0), (55.0, 15.0, 16.0), 95.0),  # pancreas
    _Organ(12, (-30.0, -58.0, 40.0), (15.0, 9.0, 20.0), 120.0),  # right adrenal
    _Organ(13, (30.0, -58.0, 40.0), (15.0, 9.0, 20.0), 120.0),  # left adrenal
)
_TUBES = (  # (label, x, y, radius, hu, z range) vertical vessels
    (8, 15.0, -40.0, 11.0, 210.0, (-200.0, 200.0)),  # aorta
    (9, -22.0, -35.0, 10.0, 145.0, (-200.0, 200.0)),  # inferior vena cava
    (5, 0.0, -18.0, 12.0, 55.0, (40.0, 200.0)),  # esophagus (upper abdomen only; an air lumen inside)
)
_ESOPHAGUS_LUMEN_MM = 4.5
_SOLID = (6, 1, 2, 3, 11, 12, 13)  # liver, spleen, kidneys, pancreas, adrenal glands: one HU band under "context"
_SOLID_BAND_HU = (70.0, 130.0)
VARIATIONS = ("standard", "wide", "context")


_MAX_CASES = 999  # case numbers stay below 1000: ``seed * 1000 + case`` never repeats across seeds


def btcv_case_ids(n_train: int, n_test: int) -> tuple[list[int], list[int]]:
    """BTCV-style case numbers: training 1–10 then 21–60, then from 101 (large pools), testing from 61."""
    train_pool = list(range(1, 11)) + list(range(21, 41)) + list(range(41, 61)) + list(range(101, _MAX_CASES + 1))
    if n_train > len(train_pool):
        raise ValueError(f"at most {len(train_pool)} training phantoms")
    return train_pool[:n_train], list(range(61, 61 + n_test))


def make_phantom(
    seed: int,
    shape: Sequence[int] = (96, 96, 48),
    spacing: Sequence[float] | None = None,
    noise_hu: float | None = None,
    variation: Literal["standard", "wide", "context"] = "standard",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom: ``(hu_int16, label_uint8, affine)``; voxel axes run to the left, posterior, superior (LPS storage).

    ``noise_hu`` None: 12 HU (``"standard"``) or drawn per case in 6–25 HU (``"wide"``)."""
    if variation not in VARIATIONS:
        raise ValueError(f"variation must be one of {VARIATIONS}, got '{variation}'")
    wide = variation in ("wide", "context")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    if spacing is None:
        in_plane = rng.uniform(3.0, 4.2) if wide else rng.uniform(3.3, 3.8)
        spacing = (in_plane, in_plane, rng.uniform(4.0, 6.0) if wide else rng.uniform(4.5, 5.5))
    spacing = tuple(float(s) for s in spacing)
    # RAS world coordinates (mm) of voxel centres, stored as DICOM-converted CT usually is (LPS):
    # x_ras = -(i - c) * sx, y_ras = -(j - c) * sy, z_ras = (k - c) * sz
    idx = [np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in shape]
    x = (-idx[0] * spacing[0])[:, None, None]
    y = (-idx[1] * spacing[1])[None, :, None]
    z = (idx[2] * spacing[2])[None, None, :]
    scale = rng.uniform(0.8, 1.2) if wide else rng.uniform(0.9, 1.1)
    shift = rng.uniform(-15, 15, size=3) if wide else rng.uniform(-6, 6, size=3)
    # xs grows towards the patient's left (RAS x points to the right), ys anterior, zs superior
    xs, ys, zs = -(x - shift[0]) / scale, (y - shift[1]) / scale, z - shift[2]

    hu = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body_jitter = (0.85, 1.15) if wide else (0.95, 1.05)
    body_a, body_b = 150.0 * rng.uniform(*body_jitter), 110.0 * rng.uniform(*body_jitter)
    r_body = (xs / body_a) ** 2 + ((ys - 10.0) / body_b) ** 2
    body = np.broadcast_to(r_body <= 1.0, shape)
    hu[body] = -100.0  # subcutaneous fat
    muscle = np.broadcast_to(r_body <= 0.88**2, shape)
    hu[muscle] = 45.0  # abdominal wall muscle
    inner = np.broadcast_to(r_body <= 0.8**2, shape)
    hu[inner] = -90.0  # visceral fat, organs drawn on top
    phase = rng.uniform(0, 2 * np.pi, size=3) if wide else np.zeros(3)
    bowel = inner & (np.sin(xs / 9.0 + phase[0]) * np.sin(ys / 11.0 + phase[1]) * np.cos(zs / 13.0 + phase[2]) > 0.35)
    hu[bowel] = 30.0  # bowel loops: soft tissue texture
    # spine and ribs
    vertebra = ((xs / 20.0) ** 2 + ((ys + 80.0) / 18.0) ** 2 <= 1.0) & np.ones_like(zs, dtype=bool)
    hu[vertebra] = 350.0
    cortex = vertebra & ~(((xs / 15.0) ** 2 + ((ys + 80.0) / 13.0) ** 2) <= 1.0)
    hu[cortex] = 800.0
    rib_ring = (np.abs(np.sqrt(r_body) - 0.84) < 0.035) & (np.cos(zs / 9.0) > 0.6) & (ys < 40.0) & (zs > 0)
    hu[rib_ring] = 700.0

    band = rng.uniform(*_SOLID_BAND_HU) if variation == "context" else None  # one band for the solid organs
    for organ in _ORGANS:
        c = np.array(organ.centre) + rng.normal(0.0, 8.0 if wide else 4.0, size=3)
        r = np.array(organ.radii) * rng.uniform(*((0.7, 1.3) if wide else (0.85, 1.15)), size=3)
        inside = _organ_shape(xs - c[0], ys - c[1], zs - c[2], r, rng if wide else None)
        inside = np.broadcast_to(inside, shape) & inner
        centre_hu = band if band is not None and organ.label in _SOLID else organ.hu
        hu[inside] = centre_hu + rng.normal(0.0, 15.0 if wide else 8.0)
        label[inside] = organ.label
    for lab, cx, cy, radius, value, (z0, z1) in _TUBES:
        cx, cy = cx + rng.normal(0, 2.0), cy + rng.normal(0, 2.0)
        if wide:
            radius, value = radius * rng.uniform(0.8, 1.2), value + rng.normal(0.0, 15.0)
        inside = ((xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2) & (zs >= z0) & (zs <= z1)
        inside = np.broadcast_to(inside, shape) & inner
        hu[inside] = value + rng.normal(0.0, 10.0)
        label[inside] = lab
        if lab == 5:
            lumen = inside & ((xs - cx) ** 2 + (ys - cy) ** 2 <= _ESOPHAGUS_LUMEN_MM**2)
            hu[lumen] = -700.0
    # portal / splenic vein: a tube running from the liver hilum towards the spleen
    t = np.clip((xs + 35.0) / 120.0, 0.0, 1.0)
    vy, vz = -5.0 - 25.0 * t, 20.0 + 15.0 * t
    vein = ((ys - vy) ** 2 + (zs - vz) ** 2 <= 8.0**2) & (xs > -35.0) & (xs < 85.0)
    vein = np.broadcast_to(vein, shape) & inner
    hu[vein] = 180.0
    label[vein] = 10
    # air in the stomach fundus
    air = (label == 7) & np.broadcast_to(ys > 35.0 + 12.0, shape) & np.broadcast_to(zs > 60.0, shape)
    hu[air] = -850.0

    if noise_hu is None:
        noise_hu = rng.uniform(6.0, 25.0) if wide else 12.0
    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [(shape[0] - 1) / 2 * spacing[0], (shape[1] - 1) / 2 * spacing[1], -(shape[2] - 1) / 2 * spacing[2]]
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), label, affine


def _organ_shape(dx: np.ndarray, dy: np.ndarray, dz: np.ndarray, r: np.ndarray,
                 rng: np.random.Generator | None) -> np.ndarray:
    """Inside of an ellipsoid of semi-axes ``r`` around the offsets ``(dx, dy, dz)`` (mm); with ``rng``, rotated
    (up to 30° about z, 12° about x) and lobulated (a smooth radial bump of up to 30 %), drawn per organ."""
    if rng is None:
        return (dx / r[0]) ** 2 + (dy / r[1]) ** 2 + (dz / r[2]) ** 2 <= 1.0
    a, b = np.deg2rad(rng.uniform(-30, 30)), np.deg2rad(rng.uniform(-12, 12))
    u = np.cos(a) * dx - np.sin(a) * dy
    v = np.sin(a) * dx + np.cos(a) * dy
    v, w = np.cos(b) * v - np.sin(b) * dz, np.sin(b) * v + np.cos(b) * dz
    u, v, w = u / r[0], v / r[1], w / r[2]
    amp, freq, ph = rng.uniform(0.0, 0.3), rng.uniform(1.5, 3.5), rng.uniform(0, 2 * np.pi, size=2)
    bump = 1.0 + amp * np.sin(freq * np.pi * u + ph[0]) * np.cos(freq * np.pi * w + ph[1])
    return u**2 + v**2 + w**2 <= bump


def write_btcv_phantoms(
    out_dir: str | Path,
    n_train: int = 8,
    n_val: int = 2,
    n_test: int = 2,
    shape: Sequence[int] = (96, 96, 48),
    seed: int = 0,
    variation: Literal["standard", "wide", "context"] = "standard",
) -> Path:
    """Write phantoms as ``RawData/Training/{img,label}`` and ``RawData/Testing/img`` plus ``dataset.json``.

    The first ``n_train`` training cases form the training list, the next ``n_val`` the validation
    list; case ``k`` is drawn from seed ``seed * 1000 + k`` (so two ``seed`` values never share a case).
    Returns the datalist path.
    """
    out = Path(out_dir)
    train_ids, test_ids = btcv_case_ids(n_train + n_val, n_test)
    img_dir, lab_dir, test_dir = (out / "RawData" / "Training" / "img", out / "RawData" / "Training" / "label",
                                  out / "RawData" / "Testing" / "img")
    for d in (img_dir, lab_dir, test_dir):
        d.mkdir(parents=True, exist_ok=True)
    entries = []
    for case in train_ids:
        hu, lab, affine = make_phantom(seed * 1000 + case, shape, variation=variation)
        img_path, lab_path = img_dir / f"img{case:04d}.nii.gz", lab_dir / f"label{case:04d}.nii.gz"
        nib.save(nib.Nifti1Image(hu, affine), img_path)
        nib.save(nib.Nifti1Image(lab, affine), lab_path)
        entries.append({"image": str(img_path.relative_to(out)), "label": str(lab_path.relative_to(out))})
    tests = []
    for case in test_ids:
        hu, _, affine = make_phantom(seed * 1000 + case, shape, variation=variation)
        path = test_dir / f"img{case:04d}.nii.gz"
        nib.save(nib.Nifti1Image(hu, affine), path)
        tests.append({"image": str(path.relative_to(out))})
    datalist = {
        "name": "spark3d BTCV-layout phantoms",
        "description": f"synthetic abdominal CT phantoms, seed {seed}, variation {variation}",
        "labels": {str(k): v for k, v in BTCV_LABELS.items()},
        "training": entries[:n_train],
        "validation": entries[n_train:],
        "test": tests,
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path

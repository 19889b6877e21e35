"""Figures: masked input and reconstruction (2D images, 3D orthogonal mid-slices)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["orthogonal_slices", "save_reconstruction_figure", "to_display"]


def orthogonal_slices(vol_xyz: np.ndarray, centre: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal slices of a RAS volume, oriented for radiological display."""
    c = [s // 2 for s in vol_xyz.shape] if centre is None else list(centre)
    return {
        "axial": vol_xyz[:, :, c[2]].T[::-1, ::-1],  # anterior up, patient right on the left
        "coronal": vol_xyz[:, c[1], :].T[::-1, ::-1],  # superior up
        "sagittal": vol_xyz[c[0], :, :].T[::-1, ::-1],  # superior up, anterior on the left
    }


def to_display(img_chw: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """A 2D ``(C, H, W)`` tensor as an ``(H, W[, 3])`` array in [0, 1] (undoing a channel normalisation)."""
    img = img_chw.detach().float().cpu()
    if mean is not None and std is not None and img.shape[0] == len(mean):
        img = img * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    img = img.clamp(0, 1).numpy()
    return img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)


def save_reconstruction_figure(
    path: str | Path,
    image: torch.Tensor,
    masked: torch.Tensor,
    recon: torch.Tensor,
    title: str = "",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Input | masked input | reconstruction for one sample ``(C, *S)``; 3D gets three orthogonal rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {"input": image, "masked input": masked, "reconstruction (visible pasted)": recon}
    if image.ndim == 4:  # (C, X, Y, Z): first channel, three orthogonal mid-slices
        views = {name: orthogonal_slices(t[0].detach().float().cpu().numpy()) for name, t in columns.items()}
        rows = ["axial", "coronal", "sagittal"]
        fig, axes = plt.subplots(len(rows), 3, figsize=(9, 9), squeeze=False)
        for r, row in enumerate(rows):
            for c, name in enumerate(columns):
                axes[r, c].imshow(views[name][row], cmap="gray", vmin=0.0, vmax=1.0, aspect="auto")
                axes[r, c].set_title(f"{name}" if r == 0 else "", fontsize=9)
                axes[r, c].set_ylabel(row if c == 0 else "")
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
    else:
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), squeeze=False)
        for c, (name, t) in enumerate(columns.items()):
            axes[0, c].imshow(to_display(t, mean, std), cmap="gray", vmin=0.0, vmax=1.0)
            axes[0, c].set_title(name, fontsize=9)
            axes[0, c].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def save_overlay(
    path: str | Path,
    image_xyz: np.ndarray,
    label_xyz: np.ndarray,
    affine: np.ndarray,
    label_names: Sequence[str] | None = None,
    window: Sequence[float] | None = None,
    title: str = "",
) -> Path:
    """Three orthogonal slices through the labelled region, label colours over the image (RAS display)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))
    img = nib.orientations.apply_orientation(image_xyz, ornt)
    lab = nib.orientations.apply_orientation(label_xyz, ornt).astype(np.int64)
    lo, hi = window if window is not None else np.percentile(img, [1, 99])
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    centre = [int(round(c)) for c in np.argwhere(lab > 0).mean(0)] if (lab > 0).any() else None
    views_img, views_lab = orthogonal_slices(img, centre), orthogonal_slices(lab, centre)
    n_classes = max(int(lab.max()) + 1, len(label_names or []), 2)
    cmap = plt.get_cmap("tab20", max(n_classes, 20))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, view in zip(axes, ("axial", "coronal", "sagittal")):
        ax.imshow(views_img[view], cmap="gray", vmin=0, vmax=1, aspect="auto")
        overlay = np.ma.masked_where(views_lab[view] == 0, views_lab[view])
        ax.imshow(overlay, cmap=cmap, vmin=0, vmax=cmap.N - 1, alpha=0.55, interpolation="nearest", aspect="auto")
        ax.set_title(view, fontsize=9)
        ax.axis("off")
    present = [c for c in np.unique(lab) if c > 0]
    if label_names:
        handles = [matplotlib.patches.Patch(color=cmap(c), label=label_names[c] if c < len(label_names) else str(c))
                   for c in present]
        fig.legend(handles=handles, loc="lower center", ncol=min(7, max(1, len(handles))), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path

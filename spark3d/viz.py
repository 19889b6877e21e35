"""Figures: masked input and reconstruction (2D images, 3D orthogonal mid-slices)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

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

"""What every masked-modeling method shares: the output type, patches, the norm-pix target and the masked loss.

A method (SparK, ConvMAE) is a :class:`MaskedModelingMethod`: the Lightning pretraining module and
the callbacks talk to that contract only, never to a method's internals.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..masking import upsample_mask

__all__ = ["MaskedModelOutput", "MaskedModelingMethod", "patchify", "unpatchify", "norm_pix_target",
           "masked_patch_loss", "reconstruct_from_patches", "mask_input"]


@dataclass
class MaskedModelOutput:
    """``loss``: mean MSE over masked patches; ``pred``: raw decoder output ``(B, C, *S)``; ``mask``: ``(B, 1, *grid)``."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


def patchify(x_bcs: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """``(B, C, *S)`` → ``(B, L, prod(patch) * C)`` with patches in raster order of the grid."""
    b, c, *size = x_bcs.shape
    grid = [s // p for s, p in zip(size, patch)]
    nd = len(size)
    shape = [b, c]
    for g, p in zip(grid, patch):
        shape += [g, p]
    x = x_bcs.reshape(shape)
    perm = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    return x.permute(perm).reshape(b, math.prod(grid), math.prod(patch) * c)


def unpatchify(x_blp: torch.Tensor, patch: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = x_blp.shape[0]
    nd = len(grid)
    x = x_blp.reshape(b, *grid, *patch, channels)
    perm = [0, 2 * nd + 1]
    for i in range(nd):
        perm += [1 + i, 1 + nd + i]
    x = x.permute(perm)
    return x.reshape(b, channels, *[g * p for g, p in zip(grid, patch)])


def norm_pix_target(target_blp: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch normalised by its own mean and variance over all its voxels and channels (norm-pix)."""
    mean = target_blp.mean(dim=-1, keepdim=True)
    var = target_blp.var(dim=-1, keepdim=True)
    return (target_blp - mean) / (var + eps).sqrt()


def masked_patch_loss(pred_blp: torch.Tensor, target_blp: torch.Tensor, mask_bl: torch.Tensor) -> torch.Tensor:
    """MSE per patch, averaged over masked patches only (``mask_bl`` True = visible)."""
    per_patch_bl = (pred_blp - target_blp).pow(2).mean(dim=-1)
    masked_bl = (~mask_bl).to(per_patch_bl.dtype)
    return (per_patch_bl * masked_bl).sum() / masked_bl.sum().clamp_min(1.0)


def reconstruct_from_patches(
    x: torch.Tensor, pred_blp: torch.Tensor, mask_b1g: torch.Tensor, patch: Sequence[int], norm_pix: bool
) -> torch.Tensor:
    """A prediction in input units (norm-pix undone with each patch's own statistics), visible cells pasted back."""
    pred_blp = pred_blp.float()
    if norm_pix:
        target = patchify(x.float(), patch)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        pred_blp = pred_blp * std + mean
    pred = unpatchify(pred_blp, patch, mask_b1g.shape[2:], x.shape[1])
    return torch.where(upsample_mask(mask_b1g, x.shape[2:]), x.float(), pred)


def mask_input(x: torch.Tensor, mask_b1g: torch.Tensor) -> torch.Tensor:
    """``x`` with its masked cells zeroed (what the encoder is allowed to see)."""
    return x * upsample_mask(mask_b1g, x.shape[2:]).to(x.dtype)


class MaskedModelingMethod(nn.Module):
    """The contract of a pretraining method, read by the Lightning module, the callbacks and the exporter.

    Subclasses set ``input_size``, ``mask_ratio`` and ``mask_grid`` and implement the methods below.
    """

    input_size: tuple[int, ...]
    mask_ratio: float
    mask_grid: tuple[int, ...]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MaskedModelOutput:
        raise NotImplementedError

    def random_mask(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh mask ``(B, 1, *mask_grid)``, True = visible."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor, out: MaskedModelOutput) -> torch.Tensor:
        """The prediction in input units with the visible cells pasted back (for figures)."""
        raise NotImplementedError

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, in the key names of the network they load into for fine-tuning."""
        raise NotImplementedError

    def encoder_meta(self) -> dict[str, Any]:
        """What the exported encoder is (levels, channels, strides), stored in ``encoder.pt``."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (norms, biases, tokens)."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1}

    def prepare_for_fit(self) -> None:
        """Called once before training starts (a method may repair converted layers here)."""

    def set_batchnorm_sync(self, enabled: bool = True) -> int:
        """Sum BatchNorm statistics over DDP processes; returns how many layers do (0: none to sync)."""
        return 0

    # the parts ``spark3d benchmark`` times and counts separately (see :mod:`spark3d.bench`)
    def compute_modes(self) -> tuple[str, ...]:
        """The ways this method can compute a masked step, the reference first (each one is benchmarked)."""
        return ("masked",)

    @contextlib.contextmanager
    def computing(self, mode: str) -> Iterator[None]:
        """Masked steps inside the block compute the ``mode`` way (one of :meth:`compute_modes`)."""
        if mode not in self.compute_modes():
            raise ValueError(f"{type(self).__name__} computes {self.compute_modes()}, not '{mode}'")
        yield

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor | None) -> Any:
        """The encoder's output for ``x`` under ``mask``; ``mask=None``: the dense network with nothing masked."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_encoder (needed by benchmark)")

    def forward_decoder(self, latent: Any, mask: torch.Tensor | None) -> torch.Tensor:
        """The prediction ``(B, C, *S)`` from :meth:`forward_encoder`'s output (``mask=None``: dense)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward_decoder (needed by benchmark)")

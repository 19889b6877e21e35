"""Lightning module for SparK pretraining: the official recipe, logs, figures and the encoder export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from .. import __version__
from ..encoders import make_encoder
from ..masking import upsample_mask
from ..spark import SparK
from .schedules import cosine_ramp, warmup_cosine

__all__ = ["SparKPretrain", "ENCODER_FILE"]

ENCODER_FILE = "encoder.pt"


class SparKPretrain(pl.LightningModule):
    """SparK pretraining of a MONAI or timm backbone.

    Args:
        backbone: network name (MONAI: ``resnet10/18/34/50``, ``segresnet``, ``dynunet``, ``mednext``; timm: any convnet).
        source: ``"monai"`` or ``"timm"``.
        backbone_kwargs: extra constructor arguments of the network (e.g. ``init_filters``).
        input_size: crop size the model sees (linked to ``data.roi_size`` on the command line).
        optimizer: ``"lamb"`` (SparK) or ``"adamw"``.
        base_lr: lr per 256 samples; the lr is ``base_lr * global_batch / 256`` unless ``lr`` is given.
        weight_decay, weight_decay_end: weight decay rises on a cosine from the first to the second.
        warmup_epochs: linear warm-up length (epochs, may be fractional); then cosine decay to ``min_lr_ratio``.
        figure_every_n_epochs: how often to write a reconstruction figure to ``figures/``.
    """

    def __init__(
        self,
        backbone: str = "segresnet",
        source: Literal["monai", "timm"] = "monai",
        spatial_dims: int = 3,
        in_channels: int = 1,
        backbone_kwargs: dict[str, Any] | None = None,
        input_size: Sequence[int] = (96, 96, 96),
        mask_ratio: float = 0.75,
        decoder_width: int | None = None,
        densify_norm: Literal["auto", "batch", "instance", "group", "layer", "none"] = "auto",
        decoder_norm: Literal["batch", "instance", "group", "layer"] = "batch",
        fusion: Literal["add", "concat"] = "add",
        norm_pix_loss: bool = True,
        optimizer: Literal["lamb", "adamw"] = "lamb",
        base_lr: float = 2e-4,
        lr: float | None = None,
        betas: Sequence[float] = (0.9, 0.95),
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.2,
        warmup_epochs: float = 40.0,
        min_lr_ratio: float = 0.0,
        figure_every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        if optimizer not in ("lamb", "adamw"):
            raise ValueError(f"model.optimizer must be 'lamb' or 'adamw', got '{optimizer}'")
        self.save_hyperparameters()
        encoder = make_encoder(source, backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
        self.model = SparK(encoder, input_size, mask_ratio=mask_ratio, decoder_width=decoder_width,
                           densify_norm=densify_norm, decoder_norm=decoder_norm, fusion=fusion,
                           norm_pix_loss=norm_pix_loss)
        self._figure_batch: torch.Tensor | None = None
        self._figure_from_validation = False
        self._decay_groups: list[int] = []

    # ------------------------------------------------------------------------------ steps
    @staticmethod
    def _images(batch: Any) -> torch.Tensor:
        x = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        return x.as_tensor() if hasattr(x, "as_tensor") else x

    def on_fit_start(self) -> None:
        # if anything swapped layers (e.g. a SyncBatchNorm conversion by hand), make them sparse again
        self.model.resparsify()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self._images(batch)
        if batch_idx == 0 and not self._figure_from_validation:
            self._figure_batch = x[:1].detach()  # a random, flipped crop: only when there is no validation data
        out = self.model(x)
        self.log("train/loss", out.loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("train/loss_epoch", out.loss, on_step=False, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=x.shape[0])
        return out.loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._images(batch)
        if batch_idx == 0:
            self._figure_batch, self._figure_from_validation = x[:1].detach(), True  # centre crop, not flipped
        gen = torch.Generator().manual_seed(batch_idx)  # the same masks every validation
        mask = self.model.random_mask(x.shape[0], generator=gen).to(x.device)
        out = self.model(x, mask=mask)
        self.log("val/loss", out.loss, prog_bar=True, on_epoch=True, batch_size=x.shape[0], sync_dist=True)

    # ------------------------------------------------------------------------------ optimisation
    def global_batch_size(self) -> int:
        dm = getattr(self.trainer, "datamodule", None)
        per_step = getattr(dm, "crops_per_batch", None) or getattr(dm, "batch_size", 1)
        return int(per_step) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr if hp.lr is not None else hp.base_lr * self.global_batch_size() / 256
        no_decay = self.model.no_weight_decay()
        decay, plain = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (plain if name in no_decay else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": plain, "weight_decay": 0.0}]
        self._decay_groups = [0]
        if hp.optimizer == "lamb":
            from timm.optim import Lamb

            opt = Lamb(groups, lr=lr, betas=tuple(hp.betas))
        else:
            opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, self.trainer.num_training_batches // max(1, self.trainer.accumulate_grad_batches))
        warmup = min(int(round(hp.warmup_epochs * per_epoch)), total // 2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, hp.min_lr_ratio))
        self._total_steps = total
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        wd = cosine_ramp(self.global_step, self._total_steps, self.hparams.weight_decay, self.hparams.weight_decay_end)
        opt = self.optimizers()
        for i in self._decay_groups:
            opt.param_groups[i]["weight_decay"] = wd

    # ------------------------------------------------------------------------------ outputs
    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def on_train_epoch_end(self) -> None:
        last = self.trainer.max_epochs is not None and self.current_epoch + 1 >= self.trainer.max_epochs
        every = max(1, self.hparams.figure_every_n_epochs)
        if self._figure_batch is not None and ((self.current_epoch + 1) % every == 0 or last):
            self.save_figure(self.run_dir / "figures" / f"reconstruction_epoch{self.current_epoch + 1:03d}.png")

    @rank_zero_only
    def save_figure(self, path: Path) -> Path:
        from ..viz import save_reconstruction_figure

        x = self._figure_batch
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            mask = self.model.random_mask(1, generator=torch.Generator().manual_seed(0)).to(x.device)
            out = self.model(x, mask=mask)
            recon = self.model.reconstruct(x, out)
        self.model.train(was_training)
        masked = x * upsample_mask(mask, x.shape[2:])
        dm = getattr(self.trainer, "datamodule", None)
        meta = dm.metadata() if hasattr(dm, "metadata") else {}
        title = f"{self.hparams.backbone} epoch {self.current_epoch + 1}, step {self.global_step}, masked-patch loss {out.loss.item():.3f}"
        return save_reconstruction_figure(path, x[0], masked[0], recon[0], title, meta.get("mean"), meta.get("std"))

    def encoder_export(self) -> dict[str, Any]:
        """The encoder's dense state dict and what is needed to rebuild and feed it."""
        enc = self.model.encoder
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_meta = dm.metadata() if hasattr(dm, "metadata") else {}
        hp = self.hparams
        meta = {
            "format": "spark3d-encoder-v1",
            "spark3d_version": __version__,
            "backbone": hp.backbone,
            "source": hp.source,
            "backbone_kwargs": dict(hp.backbone_kwargs or {}),
            "spatial_dims": int(hp.spatial_dims),
            "in_channels": int(hp.in_channels),
            "taps": list(enc.taps),
            "channels": [int(c) for c in enc.channels],
            "strides": [list(s) for s in enc.strides],
            "input_size": list(self.model.input_size),
            "mask_ratio": float(hp.mask_ratio),
            "global_step": int(self.global_step) if self._trainer is not None else 0,
            "spacing": None if data_meta.get("spacing") is None else list(data_meta["spacing"]),
            "intensity_range": None if data_meta.get("intensity_range") is None else list(data_meta["intensity_range"]),
        }
        return {"state_dict": {k: v.cpu() for k, v in self.model.encoder_state_dict().items()}, "meta": meta}

    @rank_zero_only
    def save_encoder(self, path: Path | None = None) -> Path:
        """Write ``encoder.pt`` atomically (loadable with ``torch.load(..., weights_only=True)``)."""
        path = Path(path) if path is not None else self.run_dir / ENCODER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.encoder_export(), tmp)
        os.replace(tmp, path)
        return path

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.save_encoder()

    def on_train_end(self) -> None:
        self.save_encoder()

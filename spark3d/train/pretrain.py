"""Lightning module for masked pretraining, method-agnostic: the method comes by name from the method table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import pytorch_lightning as pl
import torch

from ..backbones import BackboneSpec
from ..checkpoint import ENCODER_FILE, write_encoder
from ..data.contract import Spark3dDataModule
from ..methods import build_method
from ..version import __version__
from .callbacks import EncoderExport, ReconstructionFigures
from ..masking import check_mask_ratio
from .optim import check_optim_values, cosine_ramp, decay_groups, warmup_cosine_scheduler

__all__ = ["PretrainModule", "SparKPretrain", "ENCODER_FILE"]


class PretrainModule(pl.LightningModule):
    """Masked pretraining of a backbone-table network with a method of the method table (SparK, …).

    Args:
        method: name in :data:`spark3d.methods.METHODS` (``"spark"``).
        backbone, source, spatial_dims, in_channels, backbone_kwargs: the network, as the backbone table names it.
        input_size: crop size the model sees (linked to ``data.roi_size`` on the command line).
        mask_ratio: fraction of masked cells.
        method_args: the method's own options (SparK: ``decoder_width``, ``densify_norm``, ``fusion``, …).
        optimizer: ``"lamb"`` (SparK) or ``"adamw"``.
        base_lr: lr per 256 samples; the lr is ``base_lr * global_batch / 256`` unless ``lr`` is given.
        weight_decay, weight_decay_end: weight decay rises on a cosine from the first to the second.
        warmup_epochs: linear warm-up length (epochs, may be fractional); then cosine decay to ``min_lr_ratio``.
        figure_every_n_epochs: how often to write a reconstruction figure to ``figures/``.
    """

    def __init__(
        self,
        method: str = "spark",
        backbone: str = "segresnet",
        source: str = "monai",
        spatial_dims: int = 3,
        in_channels: int = 1,
        backbone_kwargs: dict[str, Any] | None = None,
        input_size: int | Sequence[int] = (96, 96, 96),
        mask_ratio: float = 0.75,
        method_args: dict[str, Any] | None = None,
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
        check_mask_ratio(mask_ratio, "model.init_args.mask_ratio")
        check_optim_values({"lr": lr, "base_lr": base_lr, "weight_decay": weight_decay,
                            "weight_decay_end": weight_decay_end, "warmup_epochs": warmup_epochs})
        input_size = [input_size] * int(spatial_dims) if isinstance(input_size, int) else input_size
        if optimizer not in ("lamb", "adamw"):
            raise ValueError(f"model.optimizer must be 'lamb' or 'adamw', got '{optimizer}'")
        self.save_hyperparameters()  # (a subclass's own arguments when it is one: SparKPretrain's configs stay flat)
        self.method = method
        self.spec = BackboneSpec(backbone, source, spatial_dims, in_channels, dict(backbone_kwargs or {}))
        self.model = build_method(method, self.spec, input_size, mask_ratio, **dict(method_args or {}))
        self._decay_groups: list[int] = []
        self._total_steps = 1

    def configure_callbacks(self) -> list[pl.Callback]:
        return [EncoderExport(), ReconstructionFigures(self.hparams.figure_every_n_epochs)]

    # ------------------------------------------------------------------------------ steps
    @staticmethod
    def images(batch: Any) -> torch.Tensor:
        """The image tensor of a batch (a dict with ``image``, a tuple, or a tensor), as a plain tensor."""
        x = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        return x.as_tensor() if hasattr(x, "as_tensor") else x

    def on_fit_start(self) -> None:
        self.model.prepare_for_fit()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self.images(batch)
        out = self.model(x)
        self.log("train/loss", out.loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("train/loss_epoch", out.loss, on_step=False, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=x.shape[0])
        return out.loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self.images(batch)
        gen = torch.Generator().manual_seed(batch_idx)  # the same masks every validation
        mask = self.model.random_mask(x.shape[0], generator=gen).to(x.device)
        out = self.model(x, mask=mask)
        self.log("val/loss", out.loss, prog_bar=True, on_epoch=True, batch_size=x.shape[0], sync_dist=True)

    # ------------------------------------------------------------------------------ optimisation
    def data_module(self) -> Spark3dDataModule | None:
        """The run's data module when it follows spark3d's contract (None outside a Trainer or for plain loaders)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return dm if isinstance(dm, Spark3dDataModule) else None

    def data_metadata(self) -> dict[str, Any]:
        dm = self.data_module()
        return dm.metadata() if dm is not None else {}

    def global_batch_size(self) -> int:
        dm = self.data_module()
        per_step = dm.crops_per_batch if dm is not None else 1
        return int(per_step) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr if hp.lr is not None else hp.base_lr * self.global_batch_size() / 256
        groups = decay_groups(self.model.named_parameters(), self.model.no_weight_decay(), hp.weight_decay)
        self._decay_groups = [0]
        if hp.optimizer == "lamb":
            from timm.optim import Lamb

            opt = Lamb(groups, lr=lr, betas=tuple(hp.betas))
        else:
            opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))
        scheduler, self._total_steps = warmup_cosine_scheduler(opt, self.trainer, hp.warmup_epochs, hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": scheduler}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        wd = cosine_ramp(self.global_step, self._total_steps, self.hparams.weight_decay, self.hparams.weight_decay_end)
        opt = self.optimizers()
        for i in self._decay_groups:
            opt.param_groups[i]["weight_decay"] = wd

    # ------------------------------------------------------------------------------ export
    def encoder_export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The encoder's weights (fine-tuning key names) and what is needed to rebuild and feed it."""
        data_meta = self.data_metadata()
        hp = self.hparams
        meta = {
            "spark3d_version": __version__,
            "method": self.method,
            "backbone": self.spec.name,
            "source": self.spec.source,
            "backbone_kwargs": dict(self.spec.kwargs),
            "spatial_dims": int(self.spec.spatial_dims),
            "in_channels": int(self.spec.in_channels),
            **self.model.encoder_meta(),
            "input_size": list(self.model.input_size),
            "mask_ratio": float(hp.mask_ratio),
            "global_step": int(self.global_step) if self._trainer is not None else 0,
            "spacing": None if data_meta.get("spacing") is None else list(data_meta["spacing"]),
            "intensity_range": None if data_meta.get("intensity_range") is None else list(data_meta["intensity_range"]),
        }
        return self.model.encoder_state_dict(), meta

    def save_encoder(self, path: str | Path | None = None) -> Path | None:
        """Write ``encoder.pt`` (on the global-zero process only; loadable with ``weights_only=True``)."""
        if self._trainer is not None and not self.trainer.is_global_zero:
            return None
        if path is None:
            path = Path(self.trainer.default_root_dir) / ENCODER_FILE
        state, meta = self.encoder_export()
        return write_encoder(path, state, meta)


class SparKPretrain(PretrainModule):
    """SparK pretraining with SparK's options as direct arguments (the configs written before the method table).

    ``decoder``: ``"spark"`` (faithful light decoder) or ``"efficient"``; ``compute``: how the encoder computes
    under the mask (``"auto"``: the sparse path where it is exact and faster, ``"sparse"``, ``"masked-dense"``).
    """

    def __init__(
        self,
        backbone: str = "segresnet",
        source: str = "monai",
        spatial_dims: int = 3,
        in_channels: int = 1,
        backbone_kwargs: dict[str, Any] | None = None,
        input_size: int | Sequence[int] = (96, 96, 96),
        mask_ratio: float = 0.75,
        decoder_width: int | None = None,
        densify_norm: Literal["auto", "batch", "instance", "group", "layer", "none"] = "auto",
        decoder_norm: Literal["batch", "instance", "group", "layer"] = "batch",
        fusion: Literal["add", "concat"] = "add",
        norm_pix_loss: bool = True,
        decoder: Literal["spark", "efficient"] = "spark",
        compute: Literal["auto", "sparse", "masked-dense"] = "auto",
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
        method_args = {"decoder_width": decoder_width, "densify_norm": densify_norm, "decoder_norm": decoder_norm,
                       "fusion": fusion, "norm_pix_loss": norm_pix_loss, "decoder": decoder, "compute": compute}
        super().__init__("spark", backbone, source, spatial_dims, in_channels, backbone_kwargs, input_size, mask_ratio,
                         method_args, optimizer, base_lr, lr, betas, weight_decay, weight_decay_end, warmup_epochs,
                         min_lr_ratio, figure_every_n_epochs)

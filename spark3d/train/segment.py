"""Lightning module for segmentation fine-tuning: DiceCE, AdamW, warm-up + cosine, sliding-window Dice."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import pytorch_lightning as pl
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from ..backbones import BackboneSpec
from ..checkpoint import LABEL_NAMES_KEY
from ..errors import ConfigError
from ..data.segmentation import SegmentationData
from ..networks import (build_segmentation_network, encoder_children, encoder_parameter_levels, load_pretrained_encoder,
                        pretraining_mismatches)
from .optim import check_optim_values, warmup_cosine_scheduler

__all__ = ["SegmentationModule", "RECIPE_KEYS"]

RECIPE_KEYS = ("lr", "weight_decay", "warmup_epochs", "min_lr_ratio", "layer_decay", "freeze_encoder_epochs")


class SegmentationModule(pl.LightningModule):
    """Fine-tunes a MONAI segmentation network, optionally from a SparK ``encoder.pt``.

    Args:
        backbone, source, spatial_dims, in_channels, backbone_kwargs: the same description as in pretraining.
        num_classes: output classes including background.
        pretrained: path of an ``encoder.pt`` to load into the network's encoder (by key).
        roi_size: sliding-window size (linked to ``data.roi_size`` on the command line).
        layer_decay: layer-wise lr decay for the encoder (1.0 = off): with ``K`` encoder levels, the parameters of
            level ``k`` (0 = finest, as the pretraining encoder taps them) get ``lr * layer_decay**(K - k)``;
            the decoder and head keep ``lr``.
        freeze_encoder_epochs: keep the encoder frozen for this many epochs first.
        pretrained_recipe: the optimisation settings that replace these when ``pretrained`` is set (keys among
            :data:`RECIPE_KEYS`; the shipped configs hold the one the transfer study chose); ignored from scratch.
        sw_overlap, sw_mode, sw_batch_size: sliding-window inference settings.
    """

    def __init__(
        self,
        backbone: str = "segresnet",
        source: str = "monai",
        spatial_dims: int = 3,
        in_channels: int = 1,
        num_classes: int = 14,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        roi_size: int | Sequence[int] = (96, 96, 96),
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
        layer_decay: float = 1.0,
        freeze_encoder_epochs: int = 0,
        sw_overlap: float = 0.5,
        sw_mode: Literal["constant", "gaussian"] = "gaussian",
        sw_batch_size: int = 2,
        pretrained_recipe: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        check_optim_values({"lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs})
        if isinstance(roi_size, int):
            roi_size = [roi_size] * int(spatial_dims)
        self.save_hyperparameters()
        unknown = sorted(set(pretrained_recipe or {}) - set(RECIPE_KEYS))
        if unknown:
            raise ConfigError(f"model.init_args.pretrained_recipe: unknown key(s) {unknown}; "
                              f"expected some of {list(RECIPE_KEYS)}")
        # the optimisation settings in force: the recipe for pretrained encoders when one is loaded
        self.recipe = {k: getattr(self.hparams, k) for k in RECIPE_KEYS}
        if pretrained:
            self.recipe.update(pretrained_recipe or {})
        self.spec = BackboneSpec(backbone, source, spatial_dims, in_channels, dict(backbone_kwargs or {}))
        self.network = build_segmentation_network(self.spec, num_classes)
        self.pretrained_report: dict[str, Any] | None = None
        self.input_mismatches: list[str] = []
        if pretrained:
            self.pretrained_report = load_pretrained_encoder(self.network, pretrained, self.spec)
            rank_zero_info(f"spark3d: loaded {self.pretrained_report['matched']} pretrained tensors from {pretrained} "
                           f"into the encoder of {type(self.network).__name__}")
        # batch=True: Dice over the whole batch, so crops without a small organ do not teach "never predict it"
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self._dice_sum = torch.zeros(num_classes - 1)
        self._dice_count = torch.zeros(num_classes - 1)
        self.label_names = [f"class{i}" for i in range(num_classes)]

    # ------------------------------------------------------------------------------ inference
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def sliding_window(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a whole volume by sliding-window inference over ``roi_size`` windows."""
        hp = self.hparams
        return sliding_window_inference(x, tuple(hp.roi_size), hp.sw_batch_size, self.network,
                                        overlap=hp.sw_overlap, mode=hp.sw_mode)

    # ------------------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(dm, SegmentationData) and len(dm.label_names) == self.hparams.num_classes:
            self.label_names = list(dm.label_names)
        if isinstance(dm, SegmentationData) and self.pretrained_report is not None:
            # the encoder learned on inputs made one way: say so (one line) when fine-tuning feeds it another
            self.input_mismatches = pretraining_mismatches(self.pretrained_report["meta"], dm.metadata())
            if self.input_mismatches:
                rank_zero_warn(f"spark3d: {self.hparams.pretrained} was pretrained on other inputs than this "
                               f"fine-tuning feeds it: {'; '.join(self.input_mismatches)} (data.init_args)")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[LABEL_NAMES_KEY] = list(self.label_names)  # inference needs no datalist to name the classes

    def on_train_epoch_start(self) -> None:
        if self.current_epoch > self.recipe["freeze_encoder_epochs"]:
            return  # only the epochs that freeze, and the one that unfreezes, change anything
        frozen = self.current_epoch < self.recipe["freeze_encoder_epochs"]
        for p in encoder_children(self.network, self.spec).parameters():
            p.requires_grad_(not frozen)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        loss = self.loss_fn(self.network(x), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._dice_sum = torch.zeros(self.hparams.num_classes - 1, device=self.device)
        self._dice_count = torch.zeros(self.hparams.num_classes - 1, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        logits = self.sliding_window(x)
        n = self.hparams.num_classes
        pred = one_hot(logits.argmax(1, keepdim=True), n)
        per_case = self.dice(pred, one_hot(y.long(), n))  # (B, C-1), NaN where the organ is absent
        self.dice.reset()
        valid = ~torch.isnan(per_case)
        self._dice_sum += torch.where(valid, per_case, 0.0).sum(0)
        self._dice_count += valid.sum(0)

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._dice_sum.clone(), reduce_op="sum")
        count = self.trainer.strategy.reduce(self._dice_count.clone(), reduce_op="sum")
        per_class = total / count.clamp_min(1)
        present = count > 0
        mean = per_class[present].mean() if present.any() else torch.tensor(0.0, device=self.device)
        self.log("val/mean_dice", mean, prog_bar=True, sync_dist=False)
        for name, value, ok in zip(self.label_names[1:], per_class, present):
            if ok:
                self.log(f"val/dice/{name}", value, sync_dist=False)

    # ------------------------------------------------------------------------------ optimisation
    def _param_groups(self) -> list[dict]:
        """Groups by (lr scale, decayed or not): encoder level ``k`` of ``K`` scaled by ``layer_decay**(K - k)``."""
        hp = self.recipe
        levels, num_levels = encoder_parameter_levels(self.network, self.spec) if hp["layer_decay"] != 1.0 else ({}, 0)
        groups: dict[tuple[float, bool], list] = {}
        for name, p in self.network.named_parameters():
            scale = hp["layer_decay"] ** (num_levels - levels[name]) if name in levels else 1.0
            groups.setdefault((scale, p.ndim > 1), []).append(p)
        return [{"params": ps, "lr": hp["lr"] * s, "lr_scale": s, "weight_decay": hp["weight_decay"] if d else 0.0}
                for (s, d), ps in groups.items()]

    def configure_optimizers(self):
        hp = self.recipe
        opt = torch.optim.AdamW(self._param_groups(), lr=hp["lr"])
        scheduler, _ = warmup_cosine_scheduler(opt, self.trainer, hp["warmup_epochs"], hp["min_lr_ratio"])
        return {"optimizer": opt, "lr_scheduler": scheduler}

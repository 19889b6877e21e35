"""Work around training, as Lightning callbacks: reconstruction figures, the encoder export, the DDP check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from ..checkpoint import ENCODER_FILE
from ..methods.common import mask_input

__all__ = ["ReconstructionFigures", "EncoderExport", "DDPConsistencyCheck", "state_fingerprint"]


class ReconstructionFigures(pl.Callback):
    """Every ``every_n_epochs`` epochs (and after the last), write input | masked input | reconstruction
    of one fixed sample to ``RUN/figures/``: the first validation crop (centre, unflipped) when there
    is validation data, else the first training crop of the epoch. The same figure goes to every attached
    TensorBoard logger as the image ``reconstruction`` at the current step."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = max(1, int(every_n_epochs))
        self._batch: torch.Tensor | None = None
        self._from_validation = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0 and not self._from_validation:
            self._batch = pl_module.images(batch)[:1].detach()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0:
            self._batch, self._from_validation = pl_module.images(batch)[:1].detach(), True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if self._batch is not None and (epoch % self.every_n_epochs == 0 or last):
            self.save(trainer, pl_module, Path(trainer.default_root_dir) / "figures" / f"reconstruction_epoch{epoch:03d}.png")

    @rank_zero_only
    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path) -> Path:
        from ..viz import save_reconstruction_figure

        model, x = pl_module.model, self._batch.to(pl_module.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            mask = model.random_mask(1, generator=torch.Generator().manual_seed(0)).to(x.device)
            out = model(x, mask=mask)
            recon = model.reconstruct(x, out)
        model.train(was_training)
        meta = pl_module.data_metadata()
        title = (f"{pl_module.hparams.backbone} epoch {trainer.current_epoch + 1}, step {trainer.global_step}, "
                 f"masked-patch loss {out.loss.item():.3f}")
        path = save_reconstruction_figure(path, x[0], mask_input(x, mask)[0], recon[0], title, meta.get("mean"),
                                          meta.get("std"))
        self.log_to_tensorboard(trainer, path)
        return path

    @staticmethod
    def log_to_tensorboard(trainer: pl.Trainer, path: Path) -> None:
        """Add the saved figure (RGB, as written) to each TensorBoard logger of the run."""
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        with Image.open(path) as img:
            rgb_hwc = np.asarray(img.convert("RGB"))
        for logger in loggers:
            logger.experiment.add_image("reconstruction", rgb_hwc, global_step=trainer.global_step, dataformats="HWC")


class EncoderExport(pl.Callback):
    """Write ``RUN/encoder.pt`` with every checkpoint and at the end of training (weights-only, with metadata)."""

    def __init__(self, filename: str = ENCODER_FILE) -> None:
        self.filename = filename

    def _path(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        pl_module.save_encoder(self._path(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.save_encoder(self._path(trainer))


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, exact bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class DDPConsistencyCheck(pl.Callback):
    """At the end of fit, compare every process's weights; write ``ddp_check.json`` and fail if they differ."""

    def __init__(self, filename: str = "ddp_check.json") -> None:
        self.filename = filename

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        norm_types = sorted({type(m).__name__ for m in pl_module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
        mine = {"rank": trainer.global_rank, "fingerprint": state_fingerprint(pl_module), "batchnorm_types": norm_types}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if trainer.is_global_zero:
            report = {"world_size": len(gathered), "ranks": gathered,
                      "identical": len({g["fingerprint"] for g in gathered}) == 1}
            path = Path(trainer.default_root_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
            if not report["identical"]:
                raise RuntimeError(f"DDP processes ended with different weights: see {path}")

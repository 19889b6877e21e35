"""Work around training, as Lightning callbacks: reconstruction figures, the encoder export, the DDP check,
the non-finite guard, periodic ``last.ckpt`` checkpoints, the resume state (data position, generators) and the
checkpoint writer (atomic, weights-only reads, never a non-finite weight)."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from ..checkpoint import ENCODER_FILE, atomic_save, load_weights_only, nonfinite_tensors, write_encoder
from ..data.contract import Spark3dDataModule
from ..data.sampling import find_sampler
from ..errors import TrainingError
from ..methods.common import mask_input

__all__ = ["ReconstructionFigures", "EncoderExport", "DDPConsistencyCheck", "state_fingerprint", "NonFiniteGuard",
           "PeriodicCheckpoint", "ResumeState", "SafeCheckpointIO", "RESUME_KEY"]

RESUME_KEY = "spark3d_resume"  # the checkpoint entry ResumeState writes


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
    """Write ``RUN/encoder.pt`` (weights-only, with metadata) with every checkpoint, marked ``meta["complete"]``
    false (a run still going, or stopped by a signal, an error or a kill), and when training has finished,
    marked true; ``meta["total_steps"]`` is the run's planned length."""

    def __init__(self, filename: str = ENCODER_FILE) -> None:
        self.filename = filename

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, complete: bool) -> None:
        if trainer.is_global_zero:
            state, meta = pl_module.encoder_export()
            total = trainer.estimated_stepping_batches
            write_encoder(Path(trainer.default_root_dir) / self.filename, state,
                          {**meta, "complete": complete, "total_steps": None if total == float("inf") else int(total)})

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._write(trainer, pl_module, complete=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, complete=True)


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


class NonFiniteGuard(pl.Callback):
    """Stop training at a non-finite loss or gradient with a TrainingError naming the step; up to
    ``max_skipped_steps`` such steps are skipped first (no update at all: every gradient dropped), each reported.
    The decision is taken right before the optimiser step, on all processes alike (a NaN loss on one rank
    reaches every rank's gradients through DDP's all-reduce). With a gradient scaler (``16-mixed``),
    overflowing gradients are the scaler's business and only the loss is checked."""

    def __init__(self, max_skipped_steps: int = 0) -> None:
        self.max_skipped_steps = int(max_skipped_steps)
        self.skipped = 0
        self._bad_loss: str | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        value = loss.detach()
        if self._bad_loss is None and not bool(torch.isfinite(value).all()):
            self._bad_loss = f"non-finite loss ({value.float().mean().item()})"

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        problem, self._bad_loss = self._bad_loss, None
        if problem is None and named and getattr(trainer.precision_plugin, "scaler", None) is None:
            total = torch.nn.utils.get_total_norm([p.grad for _, p in named], error_if_nonfinite=False)
            if not bool(torch.isfinite(total)):
                problem = f"non-finite gradient (first in '{next(n for n, p in named if not torch.isfinite(p.grad).all())}')"
        bad = problem is not None
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        what = problem or "a non-finite loss or gradient on another process"
        if self.skipped < self.max_skipped_steps:
            self.skipped += 1
            for _, p in named:
                p.grad = None  # the optimiser skips parameters without a gradient: no step, no decay
            if trainer.is_global_zero:
                print(f"spark3d: {what} at {where}: step skipped ({self.skipped} of {self.max_skipped_steps} allowed)",
                      file=sys.stderr)
            return
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        kept = f"; the checkpoints written before it are kept ({last})" if last.is_file() else ""
        raise TrainingError(f"{what} at {where}: training stopped, nothing of this step is saved{kept}. Lower the lr, "
                            "check the data, or allow a few skipped steps with --nonfinite_skip_steps N")


class PeriodicCheckpoint(Checkpoint):
    """Keep ``dirpath/last.ckpt`` the latest state: every ``every_n_steps`` optimiser steps and/or every
    ``every_n_minutes`` minutes (0 turns either off) and at every epoch end (after its validation; this includes
    the end of training). Written atomically through the trainer's checkpoint IO; loggers are flushed first."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 1000, every_n_minutes: float = 30.0,
                 filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.every_n_steps = int(every_n_steps or 0)
        self.every_n_minutes = float(every_n_minutes or 0.0)
        self._saved_step = -1
        self._saved_time = time.monotonic()

    @property
    def state_key(self) -> str:
        return f"PeriodicCheckpoint{{'filename': '{self.path.name}'}}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_step, self._saved_time = trainer.global_step, time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        ending = batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= step
        if step == self._saved_step or ending:
            return  # nothing new (accumulating), or the epoch end saves in a moment
        by_steps = self.every_n_steps > 0 and step % self.every_n_steps == 0
        by_time = self.every_n_minutes > 0 and time.monotonic() - self._saved_time >= 60.0 * self.every_n_minutes
        if by_steps or by_time:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Flush the loggers, then write the checkpoint (atomically, through the trainer's checkpoint IO)."""
        if trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step, self._saved_time = trainer.global_step, time.monotonic()


def _rng_state() -> dict[str, Any]:
    """The global generators (torch CPU and CUDA, numpy, python), as tensors and plain values (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _epoch_accumulators(trainer: pl.Trainer) -> dict[str, list]:
    """The running sums behind this epoch's ``on_epoch`` training metrics (Lightning keeps them out of checkpoints)."""
    out = {}
    for key, metric in getattr(trainer.fit_loop.epoch_loop, "_results", {}).items():
        meta = getattr(metric, "meta", None)
        if meta is not None and metric.is_tensor and meta.on_epoch and meta.is_mean_reduction:
            out[key] = [float(metric.value), int(metric.cumulated_batch_size)]
    return out


def _add_epoch_accumulators(trainer: pl.Trainer, saved: dict[str, list]) -> None:
    """Add a killed run's running sums of the current epoch to the resumed run's (so epoch means cover every batch)."""
    results = getattr(trainer.fit_loop.epoch_loop, "_results", {})
    for key, (value, count) in saved.items():
        metric = results.get(key)
        if metric is not None and metric.is_tensor and metric.meta.is_mean_reduction:
            metric.value = metric.value + value
            metric.cumulated_batch_size = metric.cumulated_batch_size + count


def _rows_to_log(trainer: pl.Trainer, at_epoch_end: bool) -> list[dict[str, Any]]:
    """The metrics row Lightning logs right after this checkpoint (the step's, or the epoch's at an epoch end):
    kept in the checkpoint, so a kill in between loses no row of ``metrics.csv``."""
    loop = trainer.fit_loop.epoch_loop
    results = getattr(loop, "_results", None)
    if results is None:
        return []
    logged = results.metrics(not at_epoch_end)["log"]
    if not logged:
        return []
    step = loop._batches_that_stepped - (1 if at_epoch_end else 0)
    return [{"epoch": trainer.current_epoch, "step": int(step), **{k: float(v) for k, v in logged.items()}}]


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(pl.Callback):
    """What Lightning does not restore: the data position (the sampler's seed and how far into the epoch
    training got), the global generators (masks are drawn from them) and the running sums of the epoch's
    metrics. Saved with every checkpoint under :data:`RESUME_KEY`, with the run's plan (training items, step
    budget) for the resume checks; restored when training restarts, the generators right before the first
    resumed step.

    The generators belong to the training steps: their state after each step is put back before the next one,
    so whatever runs in between (validation, figures, checkpointing, a new epoch's loaders) draws nothing from
    them — an uninterrupted run and a resumed one see the same random numbers at every step."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._pending_metrics: dict[str, list] | None = None
        self._between_steps: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        sampler = find_sampler(trainer.train_dataloader)
        dm = trainer.datamodule
        progress = trainer.fit_loop.epoch_progress.current
        at_epoch_end = progress.processed > progress.completed  # on_train_epoch_end (after the epoch's validation)
        loop = trainer.fit_loop.epoch_loop
        batches = trainer.num_training_batches
        checkpoint[RESUME_KEY] = {
            "at_epoch_end": at_epoch_end, "logger_step": int(loop._batches_that_stepped),
            "rows": _rows_to_log(trainer, at_epoch_end),
            # batches of this epoch trained (on_train_batch_end counts the current one; the epoch end all of them)
            "epoch": trainer.current_epoch, "batches_done": int(loop.batch_progress.current.processed),
            "rng": self._between_steps if self._between_steps is not None else _rng_state(),
            "epoch_metrics": _epoch_accumulators(trainer),
            "plan": {"train_items": None if sampler is None else sampler.length,
                     "batches_per_epoch": None if batches == float("inf") else int(batches),
                     "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                     "total_steps": int(trainer.estimated_stepping_batches),
                     "crops_per_batch": dm.crops_per_batch if isinstance(dm, Spark3dDataModule) else None,
                     "world_size": trainer.world_size, "accumulate_grad_batches": trainer.accumulate_grad_batches},
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(RESUME_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None and find_sampler(trainer.train_dataloader) is None:
            rank_zero_warn("spark3d: this training loader has no ResumableSampler: the data order is not restored")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = find_sampler(trainer.train_dataloader)
        if sampler is not None:  # the epoch training counts (Lightning's count is one ahead after some restarts)
            sampler.set_epoch(trainer.current_epoch)

    def _mark(self, trainer: pl.Trainer, batches_done: int) -> None:
        """Tell the sampler how far training got (before any checkpoint of this point is written)."""
        loader = trainer.train_dataloader
        sampler = find_sampler(loader)
        if sampler is None:
            return
        if batches_done >= trainer.num_training_batches:
            sampler.mark(trainer.current_epoch + 1, 0)
        else:
            sampler.mark(trainer.current_epoch, batches_done * int(getattr(loader, "batch_size", None) or 1))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark(trainer, int(trainer.num_training_batches))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            _set_rng_state(self._pending["rng"])
            loop = trainer.fit_loop.epoch_loop
            if self._pending.get("at_epoch_end") and loop._batches_that_stepped == self._pending["logger_step"] + 1:
                loop._batches_that_stepped -= 1  # Lightning counts the epoch end it restarts from as one more step
            mid_epoch = self._pending["epoch"] == trainer.current_epoch and self._pending["batches_done"] > 0
            self._pending_metrics = self._pending.get("epoch_metrics") if mid_epoch else None
            self._pending = None
        elif self._between_steps is not None:
            _set_rng_state(self._between_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._between_steps = _rng_state()
        self._mark(trainer, int(trainer.fit_loop.epoch_loop.batch_progress.current.processed))
        if self._pending_metrics:
            _add_epoch_accumulators(trainer, self._pending_metrics)
        self._pending_metrics = None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, safe: reads weights-only (a file needing code is refused, one line), writes
    atomically, and refuses to write weights holding NaN/Inf (so a diverged run never replaces a good file)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise TrainingError(f"refusing to write {path}: {len(bad)} weights hold NaN/Inf (e.g. '{bad[0]}') at step "
                                f"{checkpoint.get('global_step')}: training diverged; earlier checkpoints are kept")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_weights_only(path, "checkpoint")

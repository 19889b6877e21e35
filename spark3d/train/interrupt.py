"""Stopping on a signal: SIGTERM or SIGINT during training ends the run after the current step with
``checkpoints/last.ckpt`` written at that step (a resumable point, like the periodic ones) and the run reports
:class:`RunInterrupted` (the CLI exits 128 + the signal's number)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from .callbacks import PeriodicCheckpoint

__all__ = ["RunInterrupted", "SignalStop", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(Exception):
    """Training stopped on a signal; ``path`` holds the state after ``step`` (None: nothing could be saved)."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        self.signum, self.step, self.path = int(signum), int(step), path
        super().__init__(f"{signal.Signals(signum).name} at step {step}")


class SignalStop(pl.Callback):
    """On SIGTERM or SIGINT, finish the step being trained, write ``dirpath/last.ckpt`` (through the periodic
    checkpoint's writer: loggers flushed, atomic) and stop with :class:`RunInterrupted`. A second SIGINT stops at
    once (KeyboardInterrupt). With several processes the decision is taken jointly after every step (a signal to
    any rank stops all of them at the same step). Lightning's own SIGTERM handler is replaced while training
    runs (it would exit with status 0 and no checkpoint) and restored afterwards."""

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._step = -1

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:  # asked twice: stop now, without a checkpoint
            self._restore()
            raise KeyboardInterrupt

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signum, self._step = None, trainer.global_step
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)

    def _requested(self, trainer: pl.Trainer) -> int:
        """The signal that stops training (0: none), the same on every process."""
        mine = int(self.signum or 0)
        if trainer.world_size > 1:
            flag = torch.tensor([mine], device=trainer.strategy.root_device)
            return int(trainer.strategy.reduce(flag, reduce_op="max").item())
        return mine

    def _stop_if_asked(self, trainer: pl.Trainer) -> None:
        signum = self._requested(trainer)
        if not signum:
            return
        periodic = next((c for c in trainer.callbacks if isinstance(c, PeriodicCheckpoint) and c.path == self.path), None)
        if periodic is not None:
            periodic.save(trainer)
        else:
            for logger in trainer.loggers:
                logger.save()
            trainer.save_checkpoint(self.path, weights_only=False)
        self._restore()
        raise RunInterrupted(signum, trainer.global_step, self.path)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._step:  # an optimiser step ended (not a batch accumulating gradients)
            self._step = trainer.global_step
            self._stop_if_asked(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_asked(trainer)

    # handlers are restored before Lightning restores its own originals (its teardown runs before callbacks')
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

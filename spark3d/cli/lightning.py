"""LightningCLI glue for the training and inference commands: run folder, loggers, checkpoints, data checks."""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from ..data.contract import Spark3dDataModule
from ..errors import DataError, Spark3dError
from ..train.pretrain import PretrainModule

__all__ = ["Spark3dCLI", "RunCSVLogger", "make_cli", "parse_or_report", "run_fit", "run_directory_trainer_kwargs",
           "PRETRAIN_LINKS", "SEGMENTATION_LINKS"]

PRETRAIN_LINKS = {"data.init_args.roi_size": "model.init_args.input_size"}
SEGMENTATION_LINKS = {"data.init_args.roi_size": "model.init_args.roi_size",
                      "data.init_args.num_classes": "model.init_args.num_classes"}


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (a resumed run appends to it instead of deleting it)."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """CSVLogger writing ``metrics.csv`` straight into the run directory, appending across resumes."""

    def __init__(self, save_dir: str | Path) -> None:
        super().__init__(save_dir, name="", version="")

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def run_directory_trainer_kwargs(root: str | Path, config_trainer: dict[str, Any], monitor: str | None = None,
                                 mode: str = "min") -> dict[str, Any]:
    """Loggers and checkpointing that put everything of a run under ``root``.

    ``root/metrics.csv`` (CSVLogger), ``root/tensorboard/``, ``root/checkpoints/last.ckpt`` (+ best
    by ``monitor`` when given). User-given loggers and checkpoint callbacks are kept as they are.
    """
    root = Path(root)
    out: dict[str, Any] = {}
    if config_trainer.get("logger") in (None, True):
        out["logger"] = [RunCSVLogger(root), TensorBoardLogger(root, name="tensorboard", version="")]
    callbacks = list(config_trainer.get("callbacks") or [])
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(
            ModelCheckpoint(dirpath=root / "checkpoints", filename="epoch{epoch:03d}-step{step}", auto_insert_metric_name=False,
                            save_last=True, save_top_k=1, monitor=monitor, mode=mode)
        )
    out["callbacks"] = callbacks
    return out


class Spark3dCLI(LightningCLI):
    """LightningCLI with ``--ckpt_path``, ``data.roi_size`` linked into the model, run-directory outputs."""

    monitor: str | None = None
    monitor_mode: str = "min"
    links: dict[str, str] = PRETRAIN_LINKS
    extra_arguments: dict[str, dict[str, Any]] = {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume from or to evaluate ('last' = the run directory's last.ckpt)")
        for name, spec in self.extra_arguments.items():
            parser.add_argument(name, **spec)
        for source, target in self.links.items():
            parser.link_arguments(source, target)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or "runs/default"
        if config.get("sync_batchnorm") and isinstance(self.model, PretrainModule):
            # our sparse BatchNorm syncs visible-site statistics itself, on CPU (gloo) as on GPU; torch's
            # SyncBatchNorm (what Lightning would swap in) is GPU-only and would not be sparse
            n = self.model.model.set_batchnorm_sync(True)
            kwargs["sync_batchnorm"] = False
            if os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"spark3d: synchronising {n} sparse BatchNorm layers across processes (visible sites only)",
                      file=sys.stderr)
        kwargs.update(run_directory_trainer_kwargs(root, config, self.monitor, self.monitor_mode))
        return super().instantiate_trainer(**kwargs)


def make_cli(model_class: type, prog: str, description: str, argv: list[str], default_root_dir: str,
             monitor: str | None = None, monitor_mode: str = "min", links: dict[str, str] | None = None,
             extra_arguments: dict[str, dict[str, Any]] | None = None) -> Spark3dCLI:
    """Parse ``argv`` into model, data module and trainer. Raises ``argparse.ArgumentError``/``ValueError``
    for bad options, keys or values (nothing is written by then)."""
    attrs = {"monitor": monitor, "monitor_mode": monitor_mode, "extra_arguments": extra_arguments or {}}
    if links is not None:
        attrs["links"] = links
    cli_class = type("Spark3dCLI_" + prog.split()[-1], (Spark3dCLI,), attrs)
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    return cli_class(
        model_class,
        Spark3dDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=argv,
        run=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False, "default_root_dir": default_root_dir, "log_every_n_steps": 1},
        parser_kwargs={"prog": prog, "description": description, "allow_abbrev": False, "exit_on_error": False},
    )


def parse_or_report(model_class: type, prog: str, description: str, argv: list[str], default_root_dir: str,
                    **kw: Any) -> Spark3dCLI | None:
    """:func:`make_cli`, with bad options, keys or values reported in one line (None then; nothing written)."""
    try:
        return make_cli(model_class, prog, description, argv, default_root_dir, **kw)
    except (argparse.ArgumentError, ValueError) as err:
        ours = _spark3d_cause(err)
        if ours is not None:  # raised while building the model or data: jsonargparse wraps it in a union report
            print(f"{prog}: error: {ours}", file=sys.stderr)
        else:
            print(f"{prog}: error: {err}\n(see `{prog} --help`)", file=sys.stderr)
        return None


def _spark3d_cause(err: BaseException) -> Spark3dError | None:
    """The spark3d error behind a wrapped exception, if any (its one line is the message that matters)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Spark3dError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def run_fit(cli: Spark3dCLI, what: str) -> int:
    """Check the data, then fit; on bad data remove a run directory this run created (nothing half-written)."""
    root = Path(cli.trainer.default_root_dir)
    existed = root.exists()
    try:
        cli.datamodule.validate()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    except DataError:
        if not existed and cli.trainer.is_global_zero:
            shutil.rmtree(root, ignore_errors=True)
        raise
    if cli.trainer.is_global_zero:
        print(f"\n{what} finished; run directory: {root}", file=sys.stderr)
    return 0

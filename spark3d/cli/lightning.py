"""LightningCLI glue for the training and inference commands: run folder, loggers, checkpoints, data checks."""

from __future__ import annotations

import argparse
import csv
import io
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins.io import CheckpointIO

from ..checkpoint import read_encoder, read_lightning_checkpoint, safe_loading
from ..data.contract import Spark3dDataModule
from ..errors import ConfigError, DataError, Spark3dError, find_os_error, find_user_error, output_error
from ..train.callbacks import RESUME_KEY, NonFiniteGuard, PeriodicCheckpoint, ResumeState, SafeCheckpointIO
from ..train.interrupt import RunInterrupted, SignalStop
from ..train.pretrain import PretrainModule
from .configs import explain_parse_error, name_link_source, prepare_config_args
from .values import check_config_values
from .runs import (
    RunLock, check_axes, check_output_folder, check_resume, clean_failed_run, is_launching_process, refuse_used_folder,
    remove_run_files, resolve_ckpt_path, used_run_files,
)

__all__ = ["Spark3dCLI", "RunCSVLogger", "make_cli", "parse_or_report", "run_fit", "run_directory_trainer_kwargs",
           "prepare_data", "precheck_run", "PRETRAIN_LINKS", "SEGMENTATION_LINKS"]

PRETRAIN_LINKS = {"data.init_args.roi_size": "model.init_args.input_size"}
SEGMENTATION_LINKS = {"data.init_args.roi_size": "model.init_args.roi_size",
                      "data.init_args.num_classes": "model.init_args.num_classes"}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, newline="")
    os.replace(tmp, path)


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (a resumed run appends to it instead of deleting it); a header change
    rewrites the file atomically."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = list(header)  # the file's own column order: appended rows must match it

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        _write_atomic(path, buf.getvalue())


class RunCSVLogger(CSVLogger):
    """CSVLogger writing ``metrics.csv`` straight into the run directory, every step (a killed run loses no row
    a checkpoint holds), appending across resumes; :meth:`drop_from_step` removes the rows a resume redoes."""

    def __init__(self, save_dir: str | Path) -> None:
        super().__init__(save_dir, name="", version="", flush_logs_every_n_steps=1)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def drop_from_step(self, step: int) -> int:
        """Remove the rows of steps ``>= step`` from ``metrics.csv`` (a killed run's steps after its checkpoint);
        returns how many were removed."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return 0
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        keep = [r for r in rows if not (r.get("step") or "").isdigit() or int(r["step"]) < step]
        if len(keep) != len(rows):
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=fields)
            writer.writeheader()
            writer.writerows(keep)
            _write_atomic(path, buf.getvalue())
        return len(rows) - len(keep)

    def restore_rows(self, rows: list[dict[str, Any]]) -> int:
        """Append the rows a checkpoint holds that ``metrics.csv`` lacks (logged after the checkpoint was written,
        lost when the run was killed in between); returns how many were added."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not rows:
            return 0
        fields, existing = [], []
        if path.is_file():
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                fields, existing = list(reader.fieldnames or []), list(reader)
        missing = [row for row in rows if not any(
            r.get("step") == str(row["step"]) and all(r.get(k) not in (None, "") for k in row if k not in ("epoch", "step"))
            for r in existing)]
        if not missing:
            return 0
        fields = sorted(set(fields) | {k for row in missing for k in row})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(existing + missing)
        _write_atomic(path, buf.getvalue())
        return len(missing)


def run_directory_trainer_kwargs(root: str | Path, config_trainer: dict[str, Any], monitor: str | None = None,
                                 mode: str = "min", every_n_steps: int = 1000, every_n_minutes: float = 30.0,
                                 nonfinite_skip_steps: int = 0) -> dict[str, Any]:
    """Loggers, checkpointing and guards that put everything of a run under ``root``.

    ``root/metrics.csv`` (CSVLogger), ``root/tensorboard/``, ``root/checkpoints/last.ckpt`` (the latest state:
    every ``every_n_steps`` steps / ``every_n_minutes`` minutes and every epoch end) and the epoch checkpoint
    (the best by ``monitor`` when given, else the newest); the non-finite guard, the resume state and the safe
    checkpoint IO (atomic writes, weights-only reads, never a NaN weight). User-given loggers, checkpoint
    callbacks and checkpoint IO are kept as they are.
    """
    root = Path(root)
    out: dict[str, Any] = {}
    if config_trainer.get("logger") in (None, True):
        out["logger"] = [RunCSVLogger(root), TensorBoardLogger(root, name="tensorboard", version="")]
    callbacks = list(config_trainer.get("callbacks") or [])
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(
            ModelCheckpoint(dirpath=root / "checkpoints", filename="epoch{epoch:03d}-step{step}", auto_insert_metric_name=False,
                            save_last=False, save_top_k=1, monitor=monitor, mode=mode)
        )
    callbacks += [PeriodicCheckpoint(root / "checkpoints", every_n_steps, every_n_minutes), ResumeState(),
                  NonFiniteGuard(nonfinite_skip_steps), SignalStop(root / "checkpoints")]
    out["callbacks"] = callbacks
    plugins = config_trainer.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(SafeCheckpointIO())
    out["plugins"] = plugins
    return out


class Spark3dCLI(LightningCLI):
    """LightningCLI with ``--ckpt_path``, ``data.roi_size`` linked into the model, run-directory outputs."""

    monitor: str | None = None
    monitor_mode: str = "min"
    links: dict[str, str] = PRETRAIN_LINKS
    extra_arguments: dict[str, dict[str, Any]] = {}
    ckpt_path: str | None = None  # --ckpt_path resolved ('last' → RUN/checkpoints/last.ckpt), read weights-only
    checkpoint: dict[str, Any] | None = None
    prechecked = False  # ckpt_path, checkpoint and the run folder were checked before anything was built

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse with each ``--config`` read once (a run's config.yaml accepted: run-only keys dropped), and a
        parse error turned into one line with the real reason first (a ConfigError)."""
        accepted = {a.dest.split(".")[0] for a in parser._actions}
        prog = parser.prog
        if isinstance(args, (list, tuple)):
            args = prepare_config_args(list(args), accepted, prog)
        try:
            super().parse_arguments(parser, args)
        except (argparse.ArgumentError, TypeError, ValueError) as err:
            user = find_user_error(err)
            if user is not None:
                raise user from None
            options = [o for a in parser._actions for o in a.option_strings]
            line = explain_parse_error(err, prog, options)
            if line is None:
                raise
            raise ConfigError(line) from None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume from or to evaluate ('last' = the run directory's last.ckpt)")
        if not self.extra_arguments:  # training commands
            parser.add_argument("--overwrite", type=bool, default=False,
                                help="start afresh in a run folder that holds another run (its checkpoints, metrics, "
                                "encoder.pt, logs are removed first); without it such a folder is refused")
            parser.add_argument("--checkpoint_every_n_steps", type=int, default=1000,
                                help="refresh checkpoints/last.ckpt every N optimiser steps (0: off; epoch ends always)")
            parser.add_argument("--checkpoint_every_n_minutes", type=float, default=30.0,
                                help="refresh checkpoints/last.ckpt every M minutes (0: off)")
            parser.add_argument("--nonfinite_skip_steps", type=int, default=0,
                                help="steps with a non-finite loss or gradient skipped before training stops")
        for name, spec in self.extra_arguments.items():
            parser.add_argument(name, **spec)
        for source, target in self.links.items():
            parser.link_arguments(source, target)

    @property
    def training(self) -> bool:
        return not self.extra_arguments  # evaluate / predict add their own arguments

    def before_instantiate_classes(self) -> None:
        """Refuse, before anything is built or written: per-axis values of the wrong length, an unsafe or
        unreadable pretrained ``encoder.pt`` or ``--ckpt_path`` and, for training, a run folder holding another run."""
        config = self.config
        check_config_values(config)
        check_axes(config)
        pretrained = self._get(config, "model", default={}).get("init_args", {}).get("pretrained")
        if pretrained:
            _, meta = read_encoder(pretrained)
            if meta.get("complete") is False and os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"spark3d: note: {pretrained} is from a pretraining run that did not finish (step "
                      f"{meta.get('global_step')} of {meta.get('total_steps')}); using it as it is", file=sys.stderr)
        if self.training:
            root = Path(config.get("trainer.default_root_dir") or "runs/default")
            self.ckpt_path, self.checkpoint = precheck_run(root, config.get("ckpt_path"), bool(config.get("overwrite")))
            self.prechecked = True
        elif config.get("ckpt_path"):
            if config.get("ckpt_path") == "last":  # the run folder's latest state, as for a resume
                config["ckpt_path"] = str(Path(config.get("trainer.default_root_dir") or "runs/default")
                                          / "checkpoints" / "last.ckpt")
            read_lightning_checkpoint(config.get("ckpt_path"))  # refused before anything is built

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        if self.training:  # the data is checked before the trainer exists (and says anything)
            prepare_data(self)
            self.datamodule.validate()
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
        get = self.config.get
        kwargs.update(run_directory_trainer_kwargs(root, config, self.monitor, self.monitor_mode,
                                                   get("checkpoint_every_n_steps", 1000) or 0,
                                                   get("checkpoint_every_n_minutes", 30.0) or 0.0,
                                                   get("nonfinite_skip_steps", 0) or 0))
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
    """:func:`make_cli`, with bad options, keys or values reported in one line (None then; nothing written).
    A spark3d error behind the failure (e.g. raised while building the model) is raised as itself, for the CLI's
    one-line report."""
    try:
        return make_cli(model_class, prog, description, argv, default_root_dir, **kw)
    except (argparse.ArgumentError, ValueError) as err:
        user = find_user_error(err)
        if user is not None:
            raise name_link_source(user, kw.get("links") or PRETRAIN_LINKS) from None
        line = explain_parse_error(err, prog)
        if line is not None:
            raise name_link_source(ConfigError(line), kw.get("links") or PRETRAIN_LINKS) from None
        print(f"{prog}: error: {err}\n(see `{prog} --help`)", file=sys.stderr)
        return None


def precheck_run(root: Path, ckpt_path: str | None, overwrite: bool) -> tuple[str | None, dict[str, Any] | None]:
    """``--ckpt_path`` resolved and read weights-only, and the run folder free for this run (or overwritten,
    or resumed, and not a file or read-only); errors before anything is written. A folder whose run left no
    checkpoint to resume is one message whether ``--ckpt_path last`` is given or not."""
    check_output_folder(root)
    if is_launching_process():  # a DDP worker re-running the command: its launcher holds the lock
        RunLock(root).refuse_if_held()
    found = used_run_files(root) if not overwrite and ckpt_path in (None, "last") else []
    last = root / "checkpoints" / "last.ckpt"
    if found and not last.is_file() and (ckpt_path == "last" or not any((root / "checkpoints").glob("*.ckpt"))):
        ckpts = [f for f in found if f.endswith(".ckpt")]
        raise ConfigError(f"run folder {root} holds a run ({', '.join(found[:3])}) but no {last.name} to resume from "
                          "(it stopped before its first checkpoint)" + (f": resume from --ckpt_path {root / ckpts[0]}, "
                          "or" if ckpts else ":") + " start it afresh with --overwrite true, or choose another "
                          "--trainer.default_root_dir")
    path = resolve_ckpt_path(ckpt_path, root)
    checkpoint = read_lightning_checkpoint(path) if path else None
    if not overwrite:
        refuse_used_folder(root, path)
    return path, checkpoint


def prepare_data(cli: Spark3dCLI) -> None:
    """Tell the data module the channel count every input must have (the network's)."""
    spec = getattr(cli.model, "spec", None)
    if isinstance(cli.datamodule, Spark3dDataModule) and spec is not None:
        cli.datamodule.in_channels = int(spec.in_channels)


def run_fit(cli: Spark3dCLI, what: str) -> int:
    """Refuse what cannot work before anything is written — a used run folder (unless resuming it or
    ``--overwrite``), an unsafe or foreign checkpoint, bad data, a resume that the restored state would
    contradict — then lock the run folder (one run at a time) and fit (weights-only resume). A signal stops
    training with ``last.ckpt`` written and returns 128 + its number. On a spark3d error or a failed write (full
    disk, read-only), what this fresh run wrote is removed unless it holds a checkpoint (then it is a run to
    resume)."""
    trainer = cli.trainer
    root = Path(trainer.default_root_dir)
    existed = root.exists()
    overwrite = bool(cli.config.get("overwrite"))
    if getattr(cli, "prechecked", False):
        ckpt_path, checkpoint = cli.ckpt_path, cli.checkpoint
    else:  # a trainer built without Spark3dCLI
        ckpt_path, checkpoint = precheck_run(root, cli.config.get("ckpt_path"), overwrite)
    prepare_data(cli)
    # the launching process's: DDP workers take none
    lock = RunLock(root) if trainer.is_global_zero and is_launching_process() else None
    started = lock is None  # this run may clean up after itself (it holds the folder)
    try:
        cli.datamodule.validate()
        if checkpoint is not None:
            for note in check_resume(checkpoint, ckpt_path, cli.model, cli.datamodule, trainer):
                print(f"spark3d: resume: {note}", file=sys.stderr)
        if lock is not None:
            note = lock.acquire()
            if note:
                print(f"spark3d: {note}", file=sys.stderr)
            if not overwrite:
                refuse_used_folder(root, ckpt_path)  # again, under the lock: a run may have ended in between
            started = True
        if trainer.is_global_zero:
            if overwrite and checkpoint is None:
                remove_run_files(root)
            if checkpoint is not None:
                resume = checkpoint.get(RESUME_KEY) or {}
                for logger in trainer.loggers:
                    if isinstance(logger, RunCSVLogger):
                        logger.drop_from_step(int(checkpoint.get("global_step", 0)))
                        logger.restore_rows(resume.get("rows", []))
        with safe_loading(), warnings.catch_warnings():
            # the run folder and the data order are spark3d's business (refuse_used_folder, TrainOrder)
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
            trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=True)
    except RunInterrupted as stop:
        if trainer.is_global_zero:
            total = trainer.estimated_stepping_batches
            of = "" if total == float("inf") else f" of {int(total)}"
            print(f"spark3d: {what} stopped by {signal.Signals(stop.signum).name} at step {stop.step}{of}: wrote "
                  f"{stop.path}; continue with the same command plus --ckpt_path last"
                  f"{' (encoder.pt is marked incomplete)' if (root / 'encoder.pt').is_file() else ''}", file=sys.stderr)
        return 128 + stop.signum
    except Exception as err:
        user = find_user_error(err)
        failed_write = find_os_error(err) if user is None else None
        if user is None and failed_write is None:
            raise
        if failed_write is not None:
            user = output_error(failed_write, root, "cannot write")
        if trainer.is_global_zero and started:
            clean_failed_run(root, existed, resumed=checkpoint is not None)
        raise user from None
    finally:
        if lock is not None:
            lock.release()
    if trainer.is_global_zero:
        print(f"\n{what} finished; run directory: {root}", file=sys.stderr)
    return 0

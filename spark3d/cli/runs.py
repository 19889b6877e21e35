"""Run folders, checked before anything is written: one run per folder, what ``--ckpt_path last`` means, what
a resume may change, and per-axis configuration values that fit the run's dimensionality."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, output_error
from ..train.callbacks import RESUME_KEY

__all__ = ["RUN_FILES", "LOCK_FILE", "RunLock", "is_launching_process", "check_output_folder", "run_files", "used_run_files",
           "refuse_used_folder", "remove_run_files", "clean_failed_run", "resolve_ckpt_path", "check_resume", "check_axes",
           "RESTORED_HPARAMS", "WEIGHT_HPARAMS"]

LOCK_FILE = ".spark3d-run.lock"
# what a run writes into its folder, by name: folder -> file-name pattern (a temporary file of an atomic write
# is ".<name>.<pid>.tmp" or ".<name>.tmp"); --overwrite removes these and nothing else
RUN_FILES = {"": r"(encoder\.pt|metrics\.csv|config\.yaml|hparams\.yaml|ddp_check\.json)",
             "checkpoints": r"(last|epoch\d+-step\d+(-v\d+)?)\.ckpt",
             "tensorboard": r"(events\.out\.tfevents\..+|hparams\.yaml)",
             "figures": r"reconstruction_epoch\d+(\.tmp)?\.png"}
# model options whose effect lives in the optimiser state a resume restores: changing them cannot take effect
RESTORED_HPARAMS = ("optimizer", "lr", "base_lr", "betas", "weight_decay", "weight_decay_end", "layer_decay")
WEIGHT_HPARAMS = ("pretrained",)  # options that only set initial weights: the checkpoint's weights replace them
_AXES_KEYS = ("model.init_args.input_size", "model.init_args.roi_size", "data.init_args.roi_size",
              "data.init_args.spacing")
_PER_STAGE_KEYS = ("strides", "kernel_size", "upsample_kernel_size")


def check_output_folder(path: Path, what: str = "run folder") -> None:
    """An OutputError (naming the path and the errno) when ``path`` cannot become a writable folder: it or a parent
    is a file, or the nearest existing parent is read-only or forbidden. Nothing is created."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    prefix = what if existing == path else f"{what} {path} cannot be made:"
    if not existing.is_dir():
        code = errno.EEXIST if existing == path else errno.ENOTDIR
        raise output_error(OSError(code, os.strerror(code), str(existing)), what=prefix)
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        code = errno.EROFS if read_only else errno.EACCES
        raise output_error(OSError(code, os.strerror(code), str(existing)), what=prefix)


def is_launching_process() -> bool:
    """True in the process that started the run, False in a DDP worker it (or torchrun, SLURM) started: any of
    ``RANK``, ``LOCAL_RANK``, ``NODE_RANK``, ``GROUP_RANK``, ``SLURM_PROCID`` non-zero."""
    return all(os.environ.get(k, "0") in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                                                            "SLURM_PROCID"))


class RunLock:
    """One run per folder: an exclusive ``flock`` on ``RUN/.spark3d-run.lock`` that holds the owner's PID. The
    kernel drops it when the process ends, however it ends; a lock file left by a dead process is taken over."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> str | None:
        """The PID of a live run holding the lock, else None (a probe: nothing is created or kept)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)

    def refuse_if_held(self) -> None:
        """A ConfigError when a live run holds the folder."""
        holder = self.holder()
        if holder is not None:
            raise ConfigError(f"run folder {self.root} is in use by another run (PID {holder} holds {self.path}): "
                              "wait for it to end, or choose another --trainer.default_root_dir")

    def acquire(self) -> str | None:
        """Take the lock (creating the folder); a ConfigError when a live run holds it. Returns a note when a
        dead process's lock file was taken over."""
        check_output_folder(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    self.refuse_if_held()
                    continue  # it was released in between
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:  # not a file its previous owner removed while we waited for it
                    break
                os.close(fd)
            before = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            raise output_error(err, self.path, "cannot lock the run folder:") from None
        self._fd = fd
        if before and before != str(os.getpid()):
            return f"took over {self.path} from PID {before}, which is no longer running"
        return None

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a lock file nobody holds is taken over by the next run
        os.close(self._fd)
        self._fd = None


def run_files(root: Path) -> list[Path]:
    """The files of ``root`` that spark3d writes (:data:`RUN_FILES`, and temporary files of their atomic writes)."""
    found = []
    for folder, pattern in RUN_FILES.items():
        name = re.compile(rf"{pattern}|\.{pattern}(\.\d+)?\.(tmp|partial)")
        where = root / folder if folder else root
        if where.is_dir():
            found += sorted(p for p in where.iterdir() if p.is_file() and name.fullmatch(p.name))
    return found


def used_run_files(root: Path) -> list[str]:
    """What of another run ``root`` holds: checkpoints, ``encoder.pt``, ``metrics.csv``."""
    found = sorted(str(p.relative_to(root)) for p in (root / "checkpoints").glob("*.ckpt"))
    return found + [name for name in ("encoder.pt", "metrics.csv") if (root / name).is_file()]


def refuse_used_folder(root: Path, ckpt_path: str | None) -> None:
    """A ConfigError when ``root`` holds a run and this is not a resume of that very run."""
    found = used_run_files(root)
    if not found:
        return
    if ckpt_path and Path(ckpt_path).resolve().parent == (root / "checkpoints").resolve():
        return
    other = f" (--ckpt_path {ckpt_path} is not one of its checkpoints)" if ckpt_path else ""
    raise ConfigError(f"run folder {root} already holds a run ({', '.join(found[:3])}{', …' if len(found) > 3 else ''})"
                      f"{other}: resume it with --ckpt_path last, choose another --trainer.default_root_dir, or pass "
                      "--overwrite true to replace it")


def remove_run_files(root: Path) -> list[Path]:
    """Remove what spark3d wrote into ``root`` (``--overwrite``, or a failed fresh run) by name — its checkpoints,
    metrics, logs, figures, ``encoder.pt``, config — then its folders if that left them empty; a file a user put
    there (``checkpoints/my_backup.ckpt``) is never touched, nor the run lock. Returns what was removed."""
    removed = run_files(root)
    for path in removed:
        path.unlink()
    for folder in RUN_FILES:
        if folder and (root / folder).is_dir() and not any((root / folder).iterdir()):
            (root / folder).rmdir()
    return removed


def clean_failed_run(root: Path, existed: bool, resumed: bool) -> None:
    """After a run failed: a fresh run that wrote no checkpoint leaves nothing (the folder, if it made it, else its
    own files), so the same command starts afresh; otherwise the folder is kept to resume (``--ckpt_path last``),
    with a row of ``metrics.csv`` cut short by a full disk removed."""
    checkpoints = [p for p in run_files(root) if p.parent.name == "checkpoints" and p.suffix == ".ckpt"]
    if not resumed and not checkpoints:
        if existed:
            remove_run_files(root)
        else:
            shutil.rmtree(root, ignore_errors=True)
        return
    metrics = root / "metrics.csv"
    try:
        text = metrics.read_bytes() if metrics.is_file() else b""
        if text and not text.endswith(b"\n"):
            os.truncate(metrics, text.rfind(b"\n") + 1)
    except OSError:
        pass  # best effort: a resume drops the rows after its checkpoint and restores the ones it holds


def resolve_ckpt_path(value: str | None, root: Path) -> str | None:
    """``--ckpt_path``: ``last`` is ``root/checkpoints/last.ckpt`` (a fresh run, said so, when there is none yet)."""
    if not value:
        return None
    if value != "last":
        return value
    last = root / "checkpoints" / "last.ckpt"
    if last.is_file():
        return str(last)
    print(f"spark3d: --ckpt_path last: {last} does not exist yet: starting a fresh run", file=sys.stderr)
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str).replace("(", "[").replace(")", "]")


def _per_rank(n: int, world: int) -> int:
    return n if world <= 1 else math.ceil(n / world)


def check_resume(checkpoint: dict[str, Any], path: str, model: Any, datamodule: Any, trainer: Any) -> list[str]:
    """Compare a checkpoint with the run about to resume from it: a ConfigError/CheckpointError for what the
    restored state would contradict (network, optimiser options, data size, batch, processes), notes for what is
    applied (schedule length, other options)."""
    own, theirs = model.state_dict(), checkpoint["state_dict"]
    missing, unexpected = [k for k in own if k not in theirs], [k for k in theirs if k not in own]
    wrong = [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)]
    if missing or unexpected or wrong:
        example = (missing + unexpected + wrong)[0]
        raise CheckpointError(f"{path} does not fit this config's network ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected, {len(wrong)} other-shaped tensors, e.g. '{example}')")
    step = int(checkpoint.get("global_step", 0))
    refused, notes = [], []
    old_hp = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    new_hp = {k: v for k, v in dict(getattr(model, "hparams", {})).items() if not k.startswith("_")}
    for key in sorted(set(old_hp) & set(new_hp)):
        if _canonical(old_hp[key]) == _canonical(new_hp[key]):
            continue
        change = f"model.{key} {old_hp[key]} → {new_hp[key]}"
        if key in RESTORED_HPARAMS:
            refused.append(change)
        elif key in WEIGHT_HPARAMS:
            notes.append(f"{change}: no effect, the weights come from the checkpoint")
        else:
            notes.append(f"{change}: applied")
    state = checkpoint.get(RESUME_KEY)
    if state is None:
        notes.append(f"{path} has no spark3d resume state: data order and generators start afresh")
    else:
        plan = state["plan"]
        files = getattr(datamodule, "train_files", None)
        world = int(trainer.world_size)
        if files is not None and plan.get("train_items") is not None and \
                _per_rank(len(files), world) != plan["train_items"]:
            refused.append(f"the training list has {len(files)} cases, the run had {plan['train_items'] * world}")
        crops = getattr(datamodule, "crops_per_batch", None)
        if plan.get("crops_per_batch") is not None and crops != plan["crops_per_batch"]:
            refused.append(f"a batch holds {crops} crops, the run's held {plan['crops_per_batch']}")
        for key, now in (("world_size", world), ("accumulate_grad_batches", int(trainer.accumulate_grad_batches))):
            if plan.get(key) is not None and plan[key] != now:
                refused.append(f"trainer {key} {plan[key]} → {now}")
        for key in ("max_epochs", "max_steps"):
            now = getattr(trainer, key)
            if plan.get(key) != now:
                notes.append(f"trainer.{key} {plan.get(key)} → {now}: applied (the lr and weight-decay schedule is "
                             f"re-planned over the new length from step {step} on)")
        notes.insert(0, f"continuing {path} at step {step} (epoch {state['epoch']}, {state['batches_done']} batches "
                        "into it) with its data order, masks and schedule")
    if refused:
        raise ConfigError(f"cannot resume from {path}: {'; '.join(refused)} — the restored state (optimiser, data "
                          "order, schedule) would contradict it. Resume with the run's settings, or start a new run "
                          "in another folder")
    return notes


def check_axes(config: Any) -> None:
    """Per-axis values (roi size, input size, spacing, per-stage strides and kernels) hold one value or one per
    axis of the run's ``model.init_args.spatial_dims``; one value is repeated. ConfigError naming the key."""
    dims = config.get("model.init_args.spatial_dims")
    if not isinstance(dims, int):
        return
    for key in _AXES_KEYS:
        value = config.get(key)
        if value is None or isinstance(value, (int, float)):
            continue
        value = list(value)
        if len(value) == 1:
            config[key] = value * dims
        elif len(value) != dims:
            raise ConfigError(f"{key} has {len(value)} values {value}; a {dims}D run needs one value or {dims} "
                              "(one per axis)")
    kwargs = config.get("model.init_args.backbone_kwargs") or {}
    for key in _PER_STAGE_KEYS:
        for i, stage in enumerate(kwargs.get(key) or []):
            if not isinstance(stage, (int, float)) and len(stage) not in (1, dims):
                raise ConfigError(f"model.init_args.backbone_kwargs.{key}[{i}] is {list(stage)}; a {dims}D network "
                                  f"needs one value or {dims} (one per axis) per stage")

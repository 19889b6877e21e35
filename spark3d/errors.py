"""The error types a user can cause, each caught once by the CLI and shown as one line."""

from __future__ import annotations

import errno as _errno
import os
import re

__all__ = ["Spark3dError", "DataError", "CheckpointError", "UnsafeFileError", "ConfigError", "TrainingError",
           "OutputError", "OUTPUT_ERRNOS", "find_os_error", "output_error", "find_user_error"]

# a data-loader worker re-raises an error in the main process as ``type(msg)`` with its whole traceback as ``msg``
_WORKER_TRACEBACK = re.compile(r"^Caught (\w+) in (DataLoader worker process \d+)\.\nOriginal Traceback", re.S)


class Spark3dError(ValueError):
    """Base of spark3d's user-facing errors: the message names the file, key or shape and what was expected."""

    def __init__(self, message: str = "", *args: object) -> None:
        match = _WORKER_TRACEBACK.match(message) if isinstance(message, str) else None
        if match:  # keep the original one-line message, say where it happened
            lines = [line for line in message.strip().splitlines() if line.strip()]
            last = lines[-1]
            for prefix in (f"{match.group(1)}: ", f"{type(self).__module__}.{match.group(1)}: "):
                if prefix in last:
                    last = last.split(prefix, 1)[1]
                    break
            message = f"{last} (in {match.group(2).lower()})"
        super().__init__(message, *args)


class DataError(Spark3dError):
    """Bad input data: the message names the file, the key or the shape and what was expected."""


class CheckpointError(Spark3dError):
    """A checkpoint, ``encoder.pt`` or cache entry that cannot be read safely, or does not fit the network."""


class UnsafeFileError(CheckpointError):
    """A file that would run code if loaded (a pickle of anything but weights): refused, nothing of it runs."""


class ConfigError(Spark3dError):
    """A configuration value that cannot work (an unknown method option, a wrong number of axes, …)."""


class TrainingError(Spark3dError):
    """Training cannot go on (a non-finite loss, gradient or weight): the message names the step."""


class OutputError(Spark3dError):
    """An output that cannot be written: a full disk, a read-only folder, a file in the way. Names the path and
    the errno."""


# what the world (not a bug) does to a write: full disk or quota, read-only or forbidden, a file or folder in the way
OUTPUT_ERRNOS = frozenset({_errno.ENOSPC, _errno.EDQUOT, _errno.EROFS, _errno.EACCES, _errno.EPERM, _errno.ENOTDIR,
                           _errno.EEXIST, _errno.EISDIR, _errno.EFBIG})


def find_os_error(err: BaseException | None) -> OSError | None:
    """The OSError with one of :data:`OUTPUT_ERRNOS` behind ``err`` (itself or its cause/context chain: torch
    reports a full disk as a RuntimeError whose context is the OSError), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in OUTPUT_ERRNOS:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def output_error(err: OSError, path: object = None, what: str = "cannot write") -> OutputError:
    """One line for a failed write: ``what`` the path, the errno (name and text) and what to do about it."""
    code = err.errno or 0
    where = err.filename if err.filename is not None else path
    name = _errno.errorcode.get(code, str(code))
    hint = {_errno.ENOSPC: "free some space, then run the same command again (with --ckpt_path last a run continues "
                           "from its last checkpoint)",
            _errno.EDQUOT: "the disk quota is used up: free some, then run the same command again",
            _errno.EFBIG: "the file is larger than this filesystem allows",
            _errno.EROFS: "the filesystem is read-only: choose a writable output",
            _errno.EACCES: "no permission: choose a writable output", _errno.EPERM: "no permission: choose a writable output",
            _errno.ENOTDIR: "a file is in the way of a folder: remove it or choose another output",
            _errno.EEXIST: "a file is in the way: remove it or choose another output",
            _errno.EISDIR: "a folder is in the way of a file: remove it or choose another output"}.get(code, "")
    where = f"{what} {where}" if where is not None else what
    return OutputError(f"{where}: {os.strerror(code)} (errno {code} {name}){'; ' + hint if hint else ''}")


def find_user_error(err: BaseException | None) -> Spark3dError | None:
    """The :class:`Spark3dError` behind ``err`` (itself, or its cause/context chain, e.g. under MONAI's
    "applying transform" or jsonargparse's union errors), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Spark3dError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None

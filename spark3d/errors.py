"""The error types a user can cause, each caught once by the CLI and shown as one line."""

from __future__ import annotations

import re

__all__ = ["Spark3dError", "DataError", "CheckpointError", "UnsafeFileError", "ConfigError", "TrainingError",
           "find_user_error"]

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

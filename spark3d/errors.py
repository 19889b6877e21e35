"""The error types a user can cause, each caught once by the CLI and shown as one line."""

from __future__ import annotations

__all__ = ["Spark3dError", "DataError", "CheckpointError", "ConfigError"]


class Spark3dError(ValueError):
    """Base of spark3d's user-facing errors: the message names the file, key or shape and what was expected."""


class DataError(Spark3dError):
    """Bad input data: the message names the file, the key or the shape and what was expected."""


class CheckpointError(Spark3dError):
    """A checkpoint or ``encoder.pt`` that cannot be read, or does not fit the network it is loaded into."""


class ConfigError(Spark3dError):
    """A configuration value that cannot work (an unknown method option, a wrong number of axes, …)."""

"""The package version, in its own bottom-layer module so any room can read it without importing the package root."""

__version__ = "0.1.0"

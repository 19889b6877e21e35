"""The data-module contract, declared once: what the training modules, the CLI and inference call on a data module."""

from __future__ import annotations

import abc
from typing import Any

import pytorch_lightning as pl

from .sampling import TrainOrder

__all__ = ["Spark3dDataModule"]


class Spark3dDataModule(pl.LightningDataModule, abc.ABC):
    """A Lightning data module with spark3d's three promises.

    - :meth:`validate` checks every input before anything is written (the CLI calls it before fitting);
    - :meth:`metadata` says how the data was prepared (spacing, intensity window, normalisation), which
      travels with ``encoder.pt`` and titles the figures;
    - :attr:`crops_per_batch` is the number of samples one batch holds (the learning-rate scaling reads it).

    :attr:`in_channels` is the channel count every input must have, checked up front and wherever a volume is
    read (None: not checked); the CLI sets it to the network's before :meth:`validate`. Training loaders come
    from :attr:`train_order` (``self.train_order.loader(dataset, batch_size, …)``): its state travels in every
    checkpoint through :meth:`state_dict`, so that a resumed run sees the same data order.
    """

    in_channels: int | None = None

    @property
    def train_order(self) -> TrainOrder:
        """The training data order (seeded, resumable), created on first use."""
        order = self.__dict__.get("_train_order")
        if order is None:
            order = self.__dict__["_train_order"] = TrainOrder()
        return order

    def state_dict(self) -> dict[str, Any]:
        return {"train_order": self.train_order.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_order.load_state_dict(state_dict.get("train_order", {}))

    @abc.abstractmethod
    def validate(self) -> None:
        """Resolve and check every input; raise :class:`~spark3d.errors.DataError` naming the first bad one."""

    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """How the data was prepared: ``roi_size`` and, where they apply, ``spacing``, ``intensity_range``,
        ``mean``/``std``."""

    @property
    @abc.abstractmethod
    def crops_per_batch(self) -> int:
        """Samples per batch after any per-volume cropping."""

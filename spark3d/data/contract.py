"""The data-module contract, declared once: what the training modules, the CLI and inference call on a data module."""

from __future__ import annotations

import abc
import math
from typing import Any, Mapping

import pytorch_lightning as pl

from ..errors import ConfigError
from .sampling import TrainOrder

__all__ = ["Spark3dDataModule", "check_data_values", "per_axis"]


def per_axis(value: Any, dims: int = 3) -> Any:
    """One value (or a one-element list) repeated for every axis; a list of another length is kept as it is."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return [value] * dims
    value = list(value)
    return value * dims if len(value) == 1 else value


def check_data_values(values: Mapping[str, Any], where: str = "data.init_args") -> None:
    """The values of a data module that cannot work, refused before anything is built or written: a batch or
    sample count below 1, negative workers, a crop size below 1, a spacing <= 0 (MONAI would silently keep the
    native spacing), a reversed or empty intensity window. ConfigError naming ``where.KEY``."""
    for key in ("batch_size", "num_samples"):
        v = values.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{where}.{key} is {v}; expected an integer >= 1")
    v = values.get("num_workers")
    if v is not None and (not isinstance(v, int) or v < 0):
        raise ConfigError(f"{where}.num_workers is {v}; expected an integer >= 0")
    roi = per_axis(values.get("roi_size"))
    if roi is not None and any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in roi):
        raise ConfigError(f"{where}.roi_size is {values.get('roi_size')}; expected whole numbers of voxels >= 1 per axis")
    spacing = per_axis(values.get("spacing"))
    if spacing is not None and any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
                                   or s <= 0 for s in spacing):
        raise ConfigError(f"{where}.spacing is {values.get('spacing')}; every axis must be a spacing > 0 mm (MONAI "
                          "reads <= 0 as 'keep the native spacing': set spacing null for that)")
    window = values.get("intensity_range")
    if window is not None and values.get("intensity", "ct") == "ct":
        window = list(window) if not isinstance(window, (int, float, str)) else [window]
        if len(window) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in window) \
                or not window[0] < window[1]:
            raise ConfigError(f"{where}.intensity_range is {values.get('intensity_range')}; expected [low, high] in HU "
                              "with low < high")


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

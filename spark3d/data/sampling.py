"""The training data order, resumable: a seeded sampler whose position can be saved and restored, and
per-sample seeds so that augmentation depends on (seed, epoch, position) only — not on workers or history.

Every data module's ``train_dataloader`` builds its loader through its :class:`TrainOrder`
(``Spark3dDataModule.train_order``), which the data module's ``state_dict``/``load_state_dict`` save in
every checkpoint and restore before a resumed run builds its first loader (Lightning restores data modules
before anything iterates). The training callback ``spark3d.train.callbacks.ResumeState`` (which finds the
sampler through :func:`find_sampler`) tells the sampler how far training got, since a loader cannot know
which of its prefetched batches were trained. Together they make ``--ckpt_path last`` continue with the very
batches, crops and flips an uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from monai import data as md
from monai.transforms import Randomizable
from torch.utils.data import Dataset, Sampler

from ..errors import find_user_error

__all__ = ["ResumableSampler", "SeededItems", "TrainOrder", "resumable_loader", "eval_loader", "find_sampler",
           "item_seed"]

_MAX_SEED = 2**31 - 1


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the sample at ``position`` of ``epoch`` (independent streams, reproducible anywhere)."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0]) & _MAX_SEED


class ResumableSampler(Sampler):
    """Yields ``(index, sample_seed)``: a fresh permutation of ``range(length)`` per epoch (``shuffle``), from
    ``seed`` and the epoch. :meth:`mark` records how far training got (epoch, samples trained);
    :meth:`state_dict` saves it with the seed, and :meth:`load_state_dict` makes the next pass start there."""

    def __init__(self, length: int, shuffle: bool = True, seed: int | None = None) -> None:
        self.length = int(length)
        self.shuffle = shuffle
        # drawn from the global generator when not given: seed_everything makes it reproducible; a resume restores it
        self.seed = int(torch.randint(_MAX_SEED, (1,)).item()) if seed is None else int(seed)
        self.epoch = 0
        self.position = (0, 0)  # (epoch, samples of it already trained), set by the training loop's callback
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        """The indices of ``epoch``, in order."""
        if not self.shuffle:
            return list(range(self.length))
        gen = torch.Generator().manual_seed(item_seed(self.seed, epoch, self.length))  # a stream no sample uses
        return torch.randperm(self.length, generator=gen).tolist()

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        order = self.order(self.epoch)
        for position in range(start, self.length):
            yield order[position], item_seed(self.seed, self.epoch, position)

    def mark(self, epoch: int, trained: int) -> None:
        """Training has used the first ``trained`` samples of ``epoch`` (the whole epoch: say ``epoch + 1, 0``)."""
        self.position = (int(epoch), int(trained))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "length": self.length, "shuffle": self.shuffle, "epoch": self.position[0],
                "offset": self.position[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the saved seed; the next pass starts at the saved position (same epoch, same sample)."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = (self.epoch, int(state["offset"]))
        self._resume = (self.epoch, min(int(state["offset"]), self.length))


class SeededItems(Dataset):
    """A dataset read by ``(index, seed)``: the random transforms are re-seeded from ``seed`` before each sample
    (MONAI ``set_random_state``; torch/numpy/python generators inside a fork, so the caller's stay untouched).
    A dataset with ``takes_seeds = True`` (the CT store's crops) gets the key itself and seeds its own generator.
    Plain integer indices read the dataset as it is. A spark3d error raised inside (e.g. under MONAI's
    "applying transform" wrapper) comes out as itself, one line, in workers too."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        try:
            if not isinstance(key, (tuple, list)):
                return self.dataset[key]
            index, seed = key
            if getattr(self.dataset, "takes_seeds", False):  # draws from its own generator, seeded by the key
                return self.dataset[(index, seed)]
            transform = getattr(self.dataset, "transform", None)
            if isinstance(transform, Randomizable):
                transform.set_random_state(seed=seed)
            np_state, py_state = np.random.get_state(), random.getstate()
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    np.random.seed(seed)
                    random.seed(seed)
                    return self.dataset[index]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
        except Exception as err:
            user = find_user_error(err)
            if user is None or user is err:
                raise
            raise user from None


def resumable_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                     shuffle: bool = True, loader_class: type = md.DataLoader,
                     state: dict[str, Any] | None = None, **kwargs: Any) -> torch.utils.data.DataLoader:
    """A training loader (``loader_class``: MONAI's or torch's DataLoader) over :class:`SeededItems` with a
    :class:`ResumableSampler` (restored from ``state`` when given) and its own generator for worker seeds (the
    global one, which draws the masks, is never touched by data loading)."""
    sampler = ResumableSampler(len(dataset), shuffle=shuffle)  # type: ignore[arg-type]
    if state is not None:
        sampler.load_state_dict(state)
    return loader_class(SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=drop_last, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(sampler.seed), **kwargs)


class TrainOrder:
    """A data module's training order: builds its training loaders (:func:`resumable_loader`), saves the latest
    one's sampler state and restores it into the next loader built (a resumed run's first)."""

    def __init__(self) -> None:
        self.sampler: ResumableSampler | None = None
        self._pending: dict[str, Any] | None = None

    def loader(self, dataset: Dataset, batch_size: int, num_workers: int = 0, drop_last: bool = False,
               loader_class: type = md.DataLoader, **kwargs: Any) -> torch.utils.data.DataLoader:
        """The training loader (shuffled, resumable); the first one after :meth:`load_state_dict` continues there."""
        loader = resumable_loader(dataset, batch_size, num_workers, drop_last, True, loader_class, self._pending,
                                  **kwargs)
        self.sampler, self._pending = loader.sampler, None
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {} if self.sampler is None else {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = (state or {}).get("sampler")


def find_sampler(loader: Any) -> ResumableSampler | None:
    """The :class:`ResumableSampler` of a training loader (None for loaders built otherwise)."""
    for candidate in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(candidate, ResumableSampler):
            return candidate
    return None


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, loader_class: type = md.DataLoader,
                **kwargs: Any) -> torch.utils.data.DataLoader:
    """A validation loader in dataset order whose spark3d errors come out as one line (workers included)."""
    return loader_class(SeededItems(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator(), **kwargs)

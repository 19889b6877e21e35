"""Dataset construction shared by the data modules: per-rank sharding and the choice of cache.

The disk cache is MONAI's ``PersistentDataset`` with its reads replaced: every cache entry is loaded
through :func:`spark3d.checkpoint.load_weights_only`, so an entry that would need code to load (a planted
or foreign pickle in ``cache_dir``) is refused with one line naming it, whatever MONAI's default.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

from monai import data as md

from ..checkpoint import load_weights_only
from ..errors import CheckpointError, UnsafeFileError
from .datalist import DataError

__all__ = ["shard_for_rank", "cached_dataset", "SafePersistentDataset"]


def shard_for_rank(items: Sequence[Any], trainer: Any, even: bool = True) -> list:
    """This process's share of ``items`` under DDP (so each rank loads and caches only its own)."""
    world = trainer.world_size if trainer is not None else 1
    if world <= 1:
        return list(items)
    if even and len(items) < world:
        raise DataError(f"{len(items)} cases cannot be shared among {world} processes")
    if not even:  # every item once (partition_dataset's layout, and it refuses fewer items than processes)
        return list(items)[trainer.global_rank::world]
    return md.partition_dataset(list(items), num_partitions=world, shuffle=False, even_divisible=even)[trainer.global_rank]


class SafePersistentDataset(md.PersistentDataset):
    """``PersistentDataset`` whose cache hits are read weights-only by spark3d (refused with one line if unsafe);
    an unreadable (e.g. half-written) entry is recomputed as MONAI does."""

    def cache_file(self, item: Any) -> Path | None:
        """The cache file of a datalist item (MONAI's naming: hash of the item + hash of the transforms)."""
        if self.cache_dir is None:
            return None
        return Path(self.cache_dir) / f"{self.hash_func(item).decode('utf-8')}{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed: Any) -> Any:
        hashfile = self.cache_file(item_transformed)
        if hashfile is not None and hashfile.is_file():
            try:
                return load_weights_only(hashfile, "cache entry")
            except UnsafeFileError:
                raise
            except CheckpointError:
                hashfile.unlink(missing_ok=True)  # truncated or corrupt: recompute it below
        return super()._cachecheck(item_transformed)


def cached_dataset(files: list[dict], transform: Callable, cache: str, cache_dir: str | None = None) -> md.Dataset:
    """MONAI dataset caching the deterministic head of ``transform``: in RAM, on disk (read weights-only), or not at all."""
    if cache == "ram":
        return md.CacheDataset(files, transform=transform, progress=False, num_workers=None)
    if cache == "disk":
        safe = {"weights_only": True} if "weights_only" in inspect.signature(md.PersistentDataset).parameters else {}
        return SafePersistentDataset(files, transform=transform, cache_dir=cache_dir, **safe)
    return md.Dataset(files, transform=transform)

"""Dataset construction shared by the data modules: per-rank sharding and the choice of cache."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from monai import data as md

from .datalist import DataError

__all__ = ["shard_for_rank", "cached_dataset"]


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


def cached_dataset(files: list[dict], transform: Callable, cache: str, cache_dir: str | None = None) -> md.Dataset:
    """MONAI dataset caching the deterministic head of ``transform``: in RAM, on disk, or not at all."""
    if cache == "ram":
        return md.CacheDataset(files, transform=transform, progress=False, num_workers=None)
    if cache == "disk":
        return md.PersistentDataset(files, transform=transform, cache_dir=cache_dir)
    return md.Dataset(files, transform=transform)

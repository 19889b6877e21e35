"""Random crops read straight from the CT store's memory-mapped volumes, with randomness fixed by the item's key.

Only the crop's bytes are read from disk (``np.load(mmap_mode="r")``); nothing is cached in RAM. Every
random choice of an item (crop positions, flips, intensity jitter) comes from one generator seeded by
``(seed, stream, sample seed, index)``, where the sample seed comes with the key from the training
order's resumable sampler (:mod:`spark3d.data.sampling`, a function of its seed, the epoch and the
position): an item is the same whichever worker makes it, whenever it is made, and a resumed run
gets exactly the crops an uninterrupted one would have.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .store import StoreVolume, open_volume

__all__ = ["crop_start", "read_crop", "StoreCropDataset"]


def crop_start(shape: Sequence[int], roi: Sequence[int], rng: np.random.RandomState | None = None) -> tuple[int, ...]:
    """Start of a crop of ``roi`` in ``shape`` (spatial axes): uniform over the valid starts (MONAI
    ``RandSpatialCrop``), or MONAI's centre crop when ``rng`` is None; 0 on an axis shorter than the ROI."""
    if rng is None:
        return tuple(max(s // 2 - r // 2, 0) for s, r in zip(shape, roi))
    return tuple(int(rng.randint(0, s - r + 1)) if s > r else 0 for s, r in zip(shape, roi))


def read_crop(volume: np.ndarray, start: Sequence[int], roi: Sequence[int], flips: Sequence[bool] = ()) -> torch.Tensor:
    """``volume[:, start:start+roi]`` (channels first) as float32, flipped along the spatial axes in ``flips``,
    zero-padded symmetrically where the volume is shorter than the ROI (MONAI ``SpatialPad``). Reads only the
    crop's bytes of a memory map; the flip and the copy are one pass."""
    spatial = volume.shape[1:]
    flips = tuple(flips) + (False,) * (len(spatial) - len(flips))
    region = volume[(slice(None),) + tuple(slice(b, b + min(r, s)) for b, r, s in zip(start, roi, spatial))]
    region = region[(slice(None),) + tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    block = torch.from_numpy(np.ascontiguousarray(region)).float()
    if tuple(block.shape[1:]) == tuple(roi):
        return block
    out = torch.zeros((volume.shape[0], *roi), dtype=torch.float32)
    where = []
    for n, r, f in zip(block.shape[1:], roi, flips):
        before = (r - n) // 2
        before = r - n - before if f else before  # a flipped padded axis mirrors its padding too
        where.append(slice(before, before + n))
    out[(slice(None), *where)] = block
    return out


class StoreCropDataset(Dataset):
    """Volumes of a store → ``num_samples`` random ROI crops each (a list of ``{"image": (C, *roi)}``), randomly
    flipped per axis and intensity-jittered; or one centre crop per volume (``center=True``, for validation).

    Args:
        volumes: the store volumes this process reads (its DDP shard).
        roi_size: crop size; shorter volumes are zero-padded.
        num_samples: crops per item.
        flip_prob: probability of a flip along each spatial axis.
        intensity_jitter: scale ``× (1 + u)`` then shift ``+ v``, ``u, v`` uniform in ± this: what MONAI's
            ``RandScaleIntensity(factors=j)`` + ``RandShiftIntensity(offsets=j)`` do (the MONAI-chain path runs those),
            done in place here since the MONAI transforms (new tensors, MetaTensor round trips) cost ~3 ms a 96³
            crop, more than reading it; 0 turns it off.
        seed, stream: the run's seed and this process's stream (its DDP rank): items of different streams differ.
    """

    def __init__(self, volumes: Sequence[StoreVolume], roi_size: Sequence[int], num_samples: int = 1,
                 flip_prob: float = 0.5, intensity_jitter: float = 0.0, seed: int = 0, stream: int = 0,
                 center: bool = False) -> None:
        self.volumes = list(volumes)
        self.roi_size = tuple(int(r) for r in roi_size)
        self.num_samples = int(num_samples)
        self.flip_prob = float(flip_prob)
        self.seed, self.stream, self.center = int(seed), int(stream), bool(center)
        self.intensity_jitter = float(intensity_jitter)

    takes_seeds = True  # keys ``(index, sample_seed)``: its own generator, not the global ones (see sampling.py)

    def __len__(self) -> int:
        return len(self.volumes)

    def generator(self, sample_seed: int, index: int) -> np.random.RandomState:
        """The one random stream of item ``index`` drawn with ``sample_seed``."""
        seq = np.random.SeedSequence([self.seed % 2**64, self.stream, int(sample_seed), int(index)])
        return np.random.RandomState(np.random.PCG64(seq))

    def __getitem__(self, key: int | tuple[int, int]):
        index, sample_seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        vol = self.volumes[index]
        array = open_volume(vol.path)
        if self.center:
            return {"image": read_crop(array, crop_start(array.shape[1:], self.roi_size), self.roi_size)}
        rng = self.generator(sample_seed, index)
        crops = []
        for _ in range(self.num_samples):
            start = crop_start(array.shape[1:], self.roi_size, rng)
            flips = rng.random_sample(len(self.roi_size)) < self.flip_prob
            x = read_crop(array, start, self.roi_size, flips)
            if self.intensity_jitter > 0:
                scale, shift = rng.uniform(-self.intensity_jitter, self.intensity_jitter, size=2)
                x.mul_(1.0 + float(scale)).add_(float(shift))
            crops.append({"image": x})
        return crops

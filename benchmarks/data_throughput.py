"""Random 96³ crops per second: the CT store vs the uncached MONAI chain vs the RAM cache, on the same files.

    python benchmarks/data_throughput.py [--volumes 4] [--shape 256 256 160] [--workers 2] [--rounds 5] [--blosc2]

Writes phantoms (``make_phantom``, int16 NIfTI at native spacing 1.5×1.5×2.0 mm), builds the three training
datasets exactly as ``CTPretrainData`` builds them (``store``, ``cache: none``, ``cache: ram``) with the
same crops (``num_samples`` random ROI crops per volume, random flips along each axis), then measures
crops per second

- in one process with one torch thread (per core), the methods interleaved round by round, medians (and
  the range) over the rounds, per wall-clock second and per CPU second (the closer estimate of a quiet
  core on a shared machine), and each round's ratio to the uncached chain;
- through a data loader with ``--workers`` worker processes;

and the size on disk of the store against the raw NIfTI. ``--blosc2`` adds chunked compressed arrays
(``blosc2`` b2nd, when installed) of the same preprocessed volumes, read the same way: the measurement
behind the store's choice of plain ``.npy``. Timings on a shared machine vary: compare ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai import data as md

from spark3d.data import CTPretrainData, make_phantom
from spark3d.data.store import StoreSettings, write_store
from spark3d.data.store_dataset import crop_start


def write_phantoms(folder: Path, n: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> Path:
    """``n`` phantoms as int16 NIfTI and a datalist."""
    import json

    entries = []
    for i in range(n):
        hu, _, affine = make_phantom(100 + i, shape, spacing=spacing)
        nib.save(nib.Nifti1Image(hu, affine), folder / f"ct{i:03d}.nii.gz")
        entries.append({"image": f"ct{i:03d}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"training": entries}))
    return folder / "dataset.json"


def timed_items(get, keys, seconds: float, crops_per_item: int) -> tuple[float, float]:
    """Crops per wall-clock second and per CPU second of ``get(key)`` over ``keys`` until ``seconds`` passed
    (at least two items). On a shared machine the CPU-second rate is the closer estimate of one quiet core."""
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    for key in keys:
        get(key)
        done += 1
        if done >= 2 and time.perf_counter() - t0 >= seconds:
            break
    crops = done * crops_per_item
    return crops / (time.perf_counter() - t0), crops / max(time.process_time() - c0, 1e-9)


def loader_rate(ds, keys, workers: int, crops_per_item: int) -> float:
    """Crops per second through a MONAI DataLoader with ``workers`` processes (after the first batch)."""
    loader = md.DataLoader(ds, batch_size=1, sampler=keys, num_workers=workers)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n * crops_per_item / (time.perf_counter() - t0)


class TransferOnly(torch.utils.data.Dataset):
    """Items of the same size as the crops' and no reading: what the loader's worker → main transfer allows."""

    def __init__(self, roi, num_samples: int) -> None:
        self.roi, self.num_samples = tuple(roi), num_samples

    def __len__(self) -> int:
        return 1

    def __getitem__(self, key):
        return [{"image": torch.zeros((1, *self.roi))} for _ in range(self.num_samples)]


class Blosc2Crops:
    """Random flipped crops from blosc2 b2nd arrays (int16 quantised ×2000, or float16), read like the store."""

    def __init__(self, arrays: list[np.ndarray], folder: Path, kind: str, roi, num_samples: int) -> None:
        import blosc2

        blosc2.set_nthreads(1)
        self.paths, self.kind, self.roi, self.num_samples = [], kind, tuple(roi), num_samples
        for i, a in enumerate(arrays):
            path = folder / f"v{i}_{kind}.b2nd"
            if kind == "int16-lz4":
                data, cp = np.round(a.astype(np.float32) * 2000).astype(np.int16), {
                    "codec": blosc2.Codec.LZ4, "clevel": 5, "filters": [blosc2.Filter.SHUFFLE]}
            else:
                data, cp = a, {"codec": blosc2.Codec.ZSTD, "clevel": 5, "filters": [blosc2.Filter.BITSHUFFLE]}
            blosc2.asarray(data, urlpath=str(path), mode="w", chunks=(1, 64, 64, 64), blocks=(1, 16, 16, 16), cparams=cp)
            self.paths.append(path)
        self.shapes = [a.shape for a in arrays]

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def __getitem__(self, key):
        import blosc2

        index, sample_seed = key  # the store's keys: (volume index, sample seed)
        rng = np.random.RandomState((sample_seed * 1000 + index) % 2**32)
        array = blosc2.open(str(self.paths[index]), mode="r")
        out = []
        for _ in range(self.num_samples):
            s = crop_start(self.shapes[index][1:], self.roi, rng)
            block = array[(slice(None),) + tuple(slice(b, b + r) for b, r in zip(s, self.roi))]
            flips = rng.random_sample(3) < 0.5
            block = block[(slice(None),) + tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
            x = torch.from_numpy(np.ascontiguousarray(block)).float()
            out.append({"image": x / 2000 if self.kind == "int16-lz4" else x})
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160))
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.0), help="native = target spacing (mm)")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--num-samples", type=int, default=2, help="crops per volume per item (CTPretrainData default)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="time per method per round (1 process)")
    parser.add_argument("--blosc2", action="store_true", help="also measure blosc2 b2nd arrays (needs blosc2)")
    parser.add_argument("--jitter", action="store_true", help="also measure the store with intensity jitter")
    parser.add_argument("--json", default=None, help="write every figure (and the machine, versions, command) here")
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(1)
    roi, spacing, k = (args.roi,) * 3, tuple(args.spacing), args.num_samples
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datalist = write_phantoms(tmp, args.volumes, tuple(args.shape), spacing)
        common = dict(datalist=str(datalist), roi_size=roi, num_samples=k, spacing=spacing,
                      intensity_range=(-1000.0, 1000.0), num_workers=0, val_key=None, flip_prob=0.5)
        t0 = time.perf_counter()
        files = [str(tmp / f"ct{i:03d}.nii.gz") for i in range(args.volumes)]
        write_store({"training": files}, tmp / "store", StoreSettings(spacing, (-1000.0, 1000.0)), str(datalist))
        preprocess_s = (time.perf_counter() - t0) / args.volumes
        datasets, build_s = {}, {}
        variants = [("store (memory-mapped .npy float16)", {"store": str(tmp / "store")}),
                    ("MONAI chain, uncached", {"cache": "none"}), ("MONAI chain, RAM cache", {"cache": "ram"})]
        if args.jitter:
            variants.insert(1, ("store + intensity jitter 0.1", {"store": str(tmp / "store"), "intensity_jitter": 0.1}))
        for name, extra in variants:
            dm = CTPretrainData(**{**common, **extra})
            t0 = time.perf_counter()
            dm.setup("fit")
            build_s[name] = time.perf_counter() - t0
            datasets[name] = (dm.train_ds, "store" in extra)
        raw_bytes = sum(Path(f).stat().st_size for f in files)
        store_bytes = sum(p.stat().st_size for p in (tmp / "store" / "volumes").glob("*.npy"))
        sizes = {"raw NIfTI (int16, gzip)": raw_bytes, "store (.npy float16)": store_bytes}
        if args.blosc2:
            arrays = [np.load(p) for p in sorted((tmp / "store" / "volumes").glob("*.npy"))]
            for kind in ("int16-lz4", "float16-zstd"):
                b2 = Blosc2Crops(arrays, tmp, kind, roi, k)
                datasets[f"blosc2 b2nd {kind} (64³ chunks)"] = (b2, True)
                sizes[f"blosc2 b2nd {kind}"] = b2.bytes()

        rng = np.random.default_rng(0)

        def keys(n: int, keyed: bool, offset: int) -> list:
            idx = rng.integers(0, args.volumes, n)
            return [(int(i), offset + j) for j, i in enumerate(idx)] if keyed else [int(i) for i in idx]

        rates: dict[str, list[float]] = {name: [] for name in datasets}
        cpu_rates: dict[str, list[float]] = {name: [] for name in datasets}
        for name, (ds, keyed) in datasets.items():  # warm-up: page cache, lazy imports
            ds[keys(1, keyed, 10**6)[0]]
        for r in range(args.rounds):
            names = list(datasets) if r % 2 == 0 else list(datasets)[::-1]
            for name in names:
                ds, keyed = datasets[name]
                wall, cpu = timed_items(ds.__getitem__, keys(10000, keyed, r * 10000), args.seconds, k)
                rates[name].append(wall)
                cpu_rates[name].append(cpu)
        uncached = rates["MONAI chain, uncached"]
        workers: dict[str, float] = {}
        if args.workers > 0:
            for name, (ds, keyed) in datasets.items():
                if name.startswith("blosc2"):
                    continue
                n = 4 * args.workers if name == "MONAI chain, uncached" else 100 * args.workers
                workers[name] = loader_rate(ds, keys(n, keyed, 10**7), args.workers, k)
            name = "(loader transfer alone: zeros, no reading)"
            workers[name] = loader_rate(TransferOnly(roi, k), [0] * (100 * args.workers), args.workers, k)

    print(f"\n{args.volumes} phantoms {tuple(args.shape)} at {spacing} mm, random {args.roi}³ crops ({k} per volume "
          f"read, flips p=0.5 per axis); preprocess {preprocess_s:.2f} s/volume; {args.rounds} rounds\n")
    print(f"| source | 1 process (1 thread), crops/s | crops per CPU-s | × uncached | {args.workers} workers, crops/s "
          "| set-up s |")
    print("|---|---|---|---|---|---|")
    for name, values in rates.items():
        ratio = statistics.median(v / u for v, u in zip(values, uncached))
        w = f"{workers[name]:.0f}" if name in workers else "–"
        print(f"| {name} | {statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f}) "
              f"| {statistics.median(cpu_rates[name]):.1f} | {ratio:.1f} | {w} | {build_s.get(name, 0.0):.1f} |")
    for name, rate in workers.items():
        if name not in rates:
            print(f"| {name} | – | – | – | {rate:.0f} | – |")
    print("\n| on disk | MB | × raw NIfTI |\n|---|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size / 1e6:.1f} | {size / raw_bytes:.2f} |")
    if args.json:
        from spark3d.provenance import write_result

        sources = {name: {"crops_per_s": values, "crops_per_cpu_s": cpu_rates[name],
                          "x_uncached": [v / u for v, u in zip(values, uncached)],
                          "workers_crops_per_s": workers.get(name), "setup_s": build_s.get(name)}
                   for name, values in rates.items()}
        extra = {name: rate for name, rate in workers.items() if name not in rates}
        write_result(args.json, {"settings": {k: v for k, v in vars(args).items() if k != "json"},
                                 "preprocess_s_per_volume": preprocess_s, "sources": sources,
                                 "workers_only": extra, "bytes_on_disk": sizes},
                     ["python", "benchmarks/data_throughput.py", *sys.argv[1:]], started)


if __name__ == "__main__":
    main()

"""How long checking a CT store against its records takes, extrapolated to 10k volumes.

    python benchmarks/store_verify.py [--volumes 4] [--shape 256 256 160] [--json docs/store_verify.json]

Writes phantoms (int16 NIfTI, 1.5×1.5×2.0 mm native), preprocesses them into a store at native spacing (what
the store holds for a BTCV-sized CT: float16, about 20 MB a volume), then times, each ``--rounds`` times
(medians, wall clock and CPU seconds of this process):

- ``spark3d preprocess --verify`` (``verify_store``: size, header, record and full sha256 of every volume);
- the re-check of ``spark3d preprocess`` on the finished store (``write_store``: every volume "already done",
  its source's size and mtime, its array's size, header and sha256; the manifest rewritten);
- the start-of-pretraining check (``CTStore.check_files``: size and header of every volume, no voxel read);

and extrapolates each linearly to 10,000 volumes of the same size. The page cache holds the store after the
first round (a warm read); a cold read from disk is bounded by the disk's read speed instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from spark3d.data.phantoms import write_btcv_phantoms
from spark3d.data.store import StoreSettings, open_store, write_store
from spark3d.data.store_verify import verify_store


def _time(fn, rounds: int) -> dict[str, float]:
    wall, cpu = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_btcv_phantoms(Path(tmp) / "data", n_train=args.volumes, n_val=0, n_test=0,
                                       shape=tuple(args.shape), seed=0)
        listing = json.loads(Path(datalist).read_text())
        splits = {"training": [str(Path(datalist).parent / e["image"]) for e in listing["training"]], "validation": []}
        settings = StoreSettings(spacing=None, intensity_range=(-1000.0, 1000.0))
        store = Path(tmp) / "store"
        write_store(splits, store, settings, str(datalist))
        report = verify_store(store)
        assert not report["problems"], report["problems"]
        size = report["bytes"]
        timings = {
            "preprocess --verify (size, header, record, sha256)": _time(lambda: verify_store(store), args.rounds),
            "preprocess re-run on the finished store (skips after size, header, sha256)":
                _time(lambda: write_store(splits, store, settings, str(datalist)), args.rounds),
            "pretraining start (size and header)": _time(lambda: open_store(store).check_files(), args.rounds),
        }
    n = args.volumes
    result = {"volumes": n, "shape": args.shape, "bytes_per_volume": size / n, "rounds": args.rounds, "checks": {}}
    print(f"{n} volumes of {args.shape} (float16, {size / n / 1e6:.1f} MB each), medians of {args.rounds} rounds")
    for name, t in timings.items():
        per = {k: v / n for k, v in t.items()}
        row = {**t, "per_volume_ms_wall": 1e3 * per["wall_s"], "per_volume_ms_cpu": 1e3 * per["cpu_s"],
               "MB_per_s_cpu": size / 1e6 / max(t["cpu_s"], 1e-9),
               "10k_volumes_min_wall": 1e4 * per["wall_s"] / 60, "10k_volumes_min_cpu": 1e4 * per["cpu_s"] / 60}
        result["checks"][name] = row
        print(f"  {name}: {row['per_volume_ms_wall']:.1f} ms/volume wall, {row['per_volume_ms_cpu']:.1f} ms CPU "
              f"({row['MB_per_s_cpu']:.0f} MB/s) -> 10k volumes: {row['10k_volumes_min_wall']:.1f} min wall, "
              f"{row['10k_volumes_min_cpu']:.1f} min CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

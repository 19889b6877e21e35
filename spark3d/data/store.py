"""The preprocessed CT store: one memory-mappable ``.npy`` (float16) per volume, a JSON manifest, crop reading.

Layout of a store folder::

    settings.json                    what every volume was made with (preprocessing settings, library versions)
    volumes/<id>.npy                 one preprocessed volume, (C, X, Y, Z) float16, RAS, plain .npy (no pickle)
    volumes/<id>.json                its record (shape, spacing, affine, source path + size + sha256, own sha256)
    manifest-shard-<i>-of-<n>.json   what shard i of n wrote (``spark3d preprocess --shard i/n``)
    manifest.json                    the whole store (an unsharded run, or ``--merge`` of every shard)

A volume is finished when its record exists: the array and then the record are each written to a
``.partial`` file and renamed, so a run killed at any point leaves only whole volumes, and the next
run skips them. Volumes are read with ``np.load(mmap_mode="r", allow_pickle=False)``: a random crop
touches only its own pages, and a truncated file or a pickle is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import DataError
from .datalist import check_preprocessed_volume

__all__ = ["STORE_FORMAT", "FORMAT_VERSION", "MANIFEST", "StoreSettings", "StoreVolume", "CTStore", "sha256_file",
           "check_preprocessed_volume", "library_versions", "volume_id", "preprocess_volume", "write_store",
           "merge_shards", "open_store", "open_volume"]

STORE_FORMAT = "spark3d-ct-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
VOLUMES = "volumes"
SPLITS = ("training", "validation")


@dataclass(frozen=True)
class StoreSettings:
    """The deterministic preprocessing a store was made with (``transforms.ct_preprocess``), and its storage."""

    spacing: tuple[float, ...] | None
    intensity_range: tuple[float, float] | None
    channels: int = 1
    spatial_dims: int = 3
    orientation: str = "RAS"
    crop_foreground: bool = True
    dtype: str = "float16"
    plan: dict[str, Any] | None = None  # an nnU-Net plan's preprocessing (nnunet_prep.PlanPreprocessing.as_dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreSettings":
        """Inverse of :meth:`as_dict`."""
        tup = (lambda v: None if v is None else tuple(float(x) for x in v))
        return cls(tup(d["spacing"]), tup(d["intensity_range"]), int(d["channels"]), int(d["spatial_dims"]),
                   str(d["orientation"]), bool(d["crop_foreground"]), str(d["dtype"]), d.get("plan"))

    def differences(self, other: "StoreSettings") -> list[str]:
        """``key: self vs other`` for every setting that differs (floats compared to 1e-6)."""
        out = []
        for key, mine in asdict(self).items():
            theirs = getattr(other, key)
            both = isinstance(mine, tuple) and isinstance(theirs, tuple) and len(mine) == len(theirs)
            if not (np.allclose(mine, theirs, rtol=0, atol=1e-6) if both else mine == theirs):
                out.append(f"{key} {_show(mine)} vs {_show(theirs)}")
        return out


def _show(v: Any) -> str:
    return "none" if v is None else str(list(v)) if isinstance(v, tuple) else str(v)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the stored arrays (recorded in the store; a mismatch is refused)."""
    import monai
    import nibabel
    import torch

    from ..version import __version__

    return {"spark3d": __version__, "monai": monai.__version__, "torch": torch.__version__.split("+")[0],
            "numpy": np.__version__, "nibabel": nibabel.__version__}


# ---------------------------------------------------------------------------------------------- writing
def volume_id(source: str | Path | list) -> str:
    """A stable file name for a source volume (a file or a one-file list): its stem + a hash of its absolute path."""
    path = Path(source[0] if isinstance(source, (list, tuple)) else source).absolute()
    stem = path.name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes | memoryview, tag: str = "") -> None:
    """Write ``path`` whole or not at all: a ``.partial`` file (``tag`` tells writers apart), flushed, renamed."""
    tmp = path.with_name(f".{path.name}{tag}.partial")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind


def _json_bytes(obj: dict[str, Any]) -> bytes:
    """Indented JSON with each entry of ``volumes`` on one line (a manifest of 10k volumes stays readable)."""
    head = json.dumps({k: v for k, v in obj.items() if k != "volumes"}, indent=1)
    if "volumes" not in obj:
        return (head + "\n").encode()
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in obj["volumes"].items()]
    body = "{\n" + ",\n".join(lines) + "\n }" if lines else "{}"
    return (head[:-2] + f',\n "volumes": {body}\n}}\n').encode()


def preprocess_volume(source: str, settings: StoreSettings) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """``ct_preprocess`` (load, RAS, resample, window, crop to foreground) of one file, or the nnU-Net plan's
    (``settings.plan``: nnU-Net's axes, affine = the spacing's diagonal), checked; returns ``(array in the store
    dtype, affine 4×4 of the result, its voxel spacing)``."""
    from .nnunet_prep import PlanPreprocessing, preprocess_case
    from .transforms import ct_preprocess

    if settings.plan is not None:
        array, spacing = preprocess_case([source], PlanPreprocessing.from_dict(settings.plan))
        check_preprocessed_volume(array := array.astype(settings.dtype), source, settings.spatial_dims, settings.channels)
        return array, np.diag([*spacing, 1.0]), tuple(spacing)

    chain = ct_preprocess(("image",), settings.spacing, settings.intensity_range, roi_size=None,
                          crop_foreground=settings.crop_foreground, track_meta=True)
    image = chain({"image": source})["image"]
    array = image.detach().cpu().numpy().astype(settings.dtype)
    check_preprocessed_volume(array, source, settings.spatial_dims, settings.channels)
    affine = image.affine.detach().cpu().numpy().astype(np.float64)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    return array, affine, spacing


def _finished(volumes: Path, vid: str, source: Path) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a volume made from this very file (same size and mtime) whose array is the one
    recorded (size, header, sha256); ``(None, why not)`` when its record does not hold; ``(None, None)``: none."""
    if not (volumes / f"{vid}.json").exists():
        return None, None
    try:
        record, stat = json.loads((volumes / f"{vid}.json").read_text()), source.stat()
        if [record["source"], record["source_bytes"], record["source_mtime_ns"]] != [str(source), stat.st_size,
                                                                                    stat.st_mtime_ns]:
            return None, "its source file changed"
        if (volumes / f"{vid}.npy").stat().st_size != record["bytes"]:
            return None, "its array is not the recorded size"
        open_volume(volumes / f"{vid}.npy", record["shape"], record["dtype"])
        if sha256_file(volumes / f"{vid}.npy") != record["sha256"]:
            return None, "its array's sha256 differs from its record (changed or corrupted)"
    except (OSError, ValueError, KeyError, TypeError) as err:  # DataError is a ValueError
        return None, f"its record or array is unreadable ({type(err).__name__})"
    return record, None


def _store_header(settings: StoreSettings) -> dict[str, Any]:
    return {"format": STORE_FORMAT, "format_version": FORMAT_VERSION, "settings": settings.as_dict(),
            "versions": library_versions()}


def _claim_store(out: Path, settings: StoreSettings) -> dict[str, Any]:
    """Create ``out`` for these settings, or check that an existing store was made with the same ones."""
    header = _store_header(settings)
    path = out / SETTINGS
    if path.is_file():
        existing = _read_json(path)
        if existing.get("format") != STORE_FORMAT:
            raise DataError(f"{out} is not a spark3d CT store ({path} has no format '{STORE_FORMAT}')")
        diff = StoreSettings.from_dict(existing["settings"]).differences(settings)
        diff += [f"{k} {existing['versions'].get(k)} vs {v}" for k, v in header["versions"].items()
                 if existing["versions"].get(k) != v]
        if diff:
            raise DataError(f"store {out} was made with other settings ({'; '.join(diff)}, store vs now): "
                            f"write to a new --out or use the store's settings and environment")
        return existing
    if out.exists() and any(p.name != VOLUMES and not p.name.endswith(".partial") for p in out.iterdir()):
        raise DataError(f"--out {out} is a non-empty folder that is not a spark3d CT store")
    (out / VOLUMES).mkdir(parents=True, exist_ok=True)
    _atomic_write(path, _json_bytes(header), tag=f".{os.getpid()}")  # shards starting together write the same
    return _claim_store(out, settings)


def _unique_sources(splits: dict[str, list[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for name in SPLITS:
        for source in splits.get(name, []):
            if isinstance(source, (list, tuple)) and len(source) != 1:  # an nnU-Net case: its channel files
                raise DataError(f"{source[0]}: a CT store holds one file per volume; pretrain multi-channel cases "
                                "without a store")
            source = source[0] if isinstance(source, (list, tuple)) else source
            seen.setdefault(str(Path(source).absolute()), None)
    return list(seen)


def write_store(splits: dict[str, list[str]], out: str | Path, settings: StoreSettings, datalist: str | None = None,
                shard: tuple[int, int] = (0, 1), progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, int]:
    """Preprocess this shard's volumes of ``splits`` (``{"training": [paths], "validation": [paths]}``) into
    the store ``out``, skipping finished ones; then write its manifest (``manifest.json`` when unsharded,
    ``manifest-shard-i-of-n.json`` otherwise). Volume ``k`` (in order of first appearance) belongs to shard
    ``k % n``. Returns counts ``{"volumes", "written", "skipped"}``."""
    index, count = shard
    if not 0 <= index < count:
        raise DataError(f"--shard {index}/{count}: expected 0 <= i < n")
    out = Path(out)
    header = _claim_store(out, settings)
    volumes = out / VOLUMES
    sources = _unique_sources(splits)
    mine = [s for k, s in enumerate(sources) if k % count == index]
    records, written, redone = {}, 0, []
    for source in (progress(mine) if progress is not None else mine):
        vid, path = volume_id(source), Path(source)
        record, why = _finished(volumes, vid, path)
        if why is not None:
            redone.append(f"{VOLUMES}/{vid}.npy: {why}")
        if record is None:
            array, affine, spacing = preprocess_volume(source, settings)
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            data = buffer.getbuffer()
            stat = path.stat()
            record = {"id": vid, "file": f"{VOLUMES}/{vid}.npy", "shape": list(array.shape), "dtype": settings.dtype,
                      "spacing": list(spacing), "affine": affine.tolist(), "source": str(path),
                      "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
                      "source_sha256": sha256_file(path), "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()}
            _atomic_write(volumes / f"{vid}.npy", data)
            _atomic_write(volumes / f"{vid}.json", _json_bytes(record))
            written += 1
        records[vid] = record
    manifest = {**header, "datalist": datalist,
                "splits": {name: [volume_id(s) for s in splits.get(name, [])] for name in SPLITS}}
    if count == 1:
        _atomic_write(out / MANIFEST, _json_bytes({**manifest, "volumes": records}))
    else:
        _atomic_write(out / f"manifest-shard-{index}-of-{count}.json",
                      _json_bytes({**manifest, "shard": [index, count], "volumes": records}))
    return {"volumes": len(mine), "written": written, "skipped": len(mine) - written, "redone": redone}


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} must hold a JSON object")
    return content


def merge_shards(out: str | Path) -> Path:
    """Join every ``manifest-shard-i-of-n.json`` of a store into ``manifest.json``, after checking that all
    ``n`` shards finished with the same settings, environment and datalist and that every volume is there."""
    out = Path(out)
    found = sorted(out.glob("manifest-shard-*-of-*.json"))
    if not found:
        raise DataError(f"{out} holds no manifest-shard-*-of-*.json (run `spark3d preprocess --shard i/n` first)")
    shards = [_read_json(p) for p in found]
    counts = {s["shard"][1] for s in shards}
    if len(counts) != 1:
        raise DataError(f"{out} holds shard manifests of different shard counts {sorted(counts)}; remove the stale ones")
    count = counts.pop()
    missing = sorted(set(range(count)) - {s["shard"][0] for s in shards})
    if missing:
        raise DataError(f"{out}: shards {missing} of {count} have not finished (no manifest-shard-i-of-{count}.json)")
    first = shards[0]
    for path, shard in zip(found, shards):
        for key in ("format_version", "settings", "versions", "datalist", "splits"):
            if shard.get(key) != first.get(key):
                raise DataError(f"{path} differs from {found[0].name} in '{key}': the shards were not made alike")
    volumes: dict[str, dict] = {}
    for shard in shards:
        volumes.update(shard["volumes"])
    order = list(dict.fromkeys(v for name in SPLITS for v in first["splits"][name]))
    absent = [v for v in order if v not in volumes]
    if absent:
        raise DataError(f"{out}: volume {absent[0]} (and {len(absent) - 1} more) is in no shard manifest")
    for vid in order:
        record = volumes[vid]
        path = out / record["file"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            raise DataError(f"{path} is missing or not {record['bytes']} bytes: re-run its shard")
    manifest = {k: v for k, v in first.items() if k not in ("shard", "volumes")}
    manifest["volumes"] = {vid: volumes[vid] for vid in order}
    _atomic_write(out / MANIFEST, _json_bytes(manifest))
    return out / MANIFEST


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class StoreVolume:
    """One stored volume as the crop reader needs it: its file and its shape (channels first)."""

    path: Path
    shape: tuple[int, ...]


def open_volume(path: str | Path, shape: Sequence[int] | None = None, dtype: str | None = None) -> np.memmap:
    """Memory-map a stored volume (``allow_pickle=False``); a truncated file, a pickle or the wrong shape or
    dtype is a one-line :class:`DataError`."""
    redo = "re-run spark3d preprocess on the store (it redoes volumes that are not whole)"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        text = str(err)
        reason = ("it holds pickled data, never loaded since that could run code" if "pickle" in text else
                  "it holds Python objects, never loaded" if "Python objects" in text else
                  "it is truncated, shorter than its header says" if "greater than file size" in text else
                  f"it is not a whole .npy array: {(text.splitlines() or [type(err).__name__])[0]}")
        raise DataError(f"store volume {path} is refused: {reason}; {redo}") from None
    if not isinstance(array, np.ndarray):  # np.load gives an NpzFile for a zip archive
        raise DataError(f"store volume {path} is not a .npy array: {redo}")
    if (shape is not None and tuple(array.shape) != tuple(shape)) or (dtype is not None and array.dtype != np.dtype(dtype)):
        raise DataError(f"store volume {path} holds {array.dtype}{tuple(array.shape)}; the manifest says "
                        f"{dtype}{tuple(shape or ())}: {redo}")
    return array


class CTStore:
    """A finished store, read from its ``manifest.json``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            shards = sorted(p.name for p in self.root.glob("manifest-shard-*-of-*.json"))
            hint = (f"found {', '.join(shards)}: run `spark3d preprocess --out {self.root} --merge` once every shard "
                    "finished") if shards else "make it with `spark3d preprocess --config CFG --out STORE`"
            raise DataError(f"store {self.root} has no {MANIFEST} ({hint})")
        manifest = _read_json(path)
        if manifest.get("format") != STORE_FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} is not a spark3d CT store of format version {FORMAT_VERSION} "
                            f"(format {manifest.get('format')!r}, version {manifest.get('format_version')!r})")
        self.manifest = manifest
        self.settings = StoreSettings.from_dict(manifest["settings"])
        self.datalist: str | None = manifest.get("datalist")

    def volumes(self, split: str) -> list[StoreVolume]:
        """The volumes of ``split`` (``"training"`` or ``"validation"``), in datalist order."""
        records = self.manifest["volumes"]
        return [StoreVolume(self.root / records[v]["file"], tuple(records[v]["shape"]))
                for v in self.manifest["splits"].get(split, [])]

    def check_agrees(self, settings: StoreSettings, datalist: str | None, where: str = "data.init_args") -> None:
        """Refuse a configuration that differs from what the store was made with."""
        diff = self.settings.differences(settings)
        if diff:
            raise DataError(f"store {self.root} was preprocessed with other settings than {where} "
                            f"({'; '.join(diff)}, store vs config): re-run spark3d preprocess or match the config")
        if datalist is not None and self.datalist is not None and str(Path(datalist).absolute()) != self.datalist:
            raise DataError(f"store {self.root} was made from datalist {self.datalist}, {where}.datalist is {datalist}: "
                            "set it to the store's datalist or to null")

    def check_files(self) -> None:
        """Every volume of the manifest is its recorded size and a whole array of the recorded shape and dtype
        (its header: no voxel is read; ``store_verify.verify_store`` compares full hashes)."""
        for record in self.manifest["volumes"].values():
            path = self.root / record["file"]
            open_volume(path, record["shape"], record["dtype"])  # first: it names a pickle or a truncation as such
            if path.stat().st_size != record["bytes"]:
                raise DataError(f"store volume {path} is {path.stat().st_size} bytes, the manifest says "
                                f"{record['bytes']}: re-run spark3d preprocess on the store (it redoes it)")


def open_store(root: str | Path) -> CTStore:
    """Open a finished store (``manifest.json``); :class:`DataError` when it is missing or not a store."""
    return CTStore(root)

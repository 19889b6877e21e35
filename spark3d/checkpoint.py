"""The ``encoder.pt`` format — write, read (weights-only), check against a network — and Lightning checkpoint reads.

``encoder.pt`` is ``{"state_dict": {dense-network key: tensor}, "meta": {...}}`` with
``meta["format"] == "spark3d-encoder-v1"`` and the description of the network it was written for
(``backbone``, ``source``, ``spatial_dims``, ``in_channels``, ``backbone_kwargs``) plus what is needed to
feed it (``input_size``, ``spacing``, ``intensity_range``). Files from before the format field
existed are read as v1. Nothing else in spark3d opens these files.

Every file spark3d reads with ``torch.load`` (``encoder.pt``, Lightning checkpoints, disk-cache entries) goes
through :func:`load_weights_only`: explicit ``weights_only=True`` with the few types such files legitimately
hold (:data:`SAFE_GLOBALS`); a file that would need code to load is refused with one line naming it and the
offending object, and nothing of it runs. Every file spark3d writes goes through :func:`atomic_save`
(a reader never sees half a file) and none holds non-finite weights.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import pickletools
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, UnsafeFileError, find_os_error

__all__ = ["ENCODER_FORMAT", "ENCODER_FILE", "SAFE_GLOBALS", "safe_loading", "load_weights_only", "unsafe_globals",
           "atomic_save", "nonfinite_tensors", "write_encoder", "read_encoder", "check_encoder_meta",
           "load_encoder_state", "read_lightning_checkpoint", "CheckpointError", "LABEL_NAMES_KEY"]

LABEL_NAMES_KEY = "spark3d_label_names"  # a fine-tuning checkpoint's class names: inference needs no datalist

ENCODER_FORMAT = "spark3d-encoder-v1"
ENCODER_FILE = "encoder.pt"
_KNOWN_FORMATS = (ENCODER_FORMAT,)
_IDENTITY = ("backbone", "source", "spatial_dims", "in_channels")  # what names the network a file was written for


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                          "uint8", "uint16", "uint32", "uint64", "bool")]
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


# Beyond torch's own allowlist (tensors, containers, primitives): what checkpoints legitimately hold — paths in
# hyper-parameters, numpy scalars and arrays (metric values, MONAI crop indices). None of these runs code.
SAFE_GLOBALS: tuple = (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                       *_numpy_globals())


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Allow :data:`SAFE_GLOBALS` in weights-only loads inside the block (Lightning's resume included), nothing more."""
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        yield


def _pickle_globals(data: bytes) -> list[str] | None:
    """``module.name`` of every GLOBAL a raw pickle stream would import, found without executing it
    (None when ``data`` is not a whole pickle stream)."""
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle, or a truncated one
        return None
    return found


def unsafe_globals(path: str | Path) -> list[str] | None:
    """The objects a file would import that weights-only loading (with :data:`SAFE_GLOBALS`) does not allow
    (None when the file is neither a torch zip checkpoint nor a whole pickle stream)."""
    with safe_loading():
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # not a zip checkpoint: a plain (legacy) pickle
            pass
    with open(path, "rb") as f:
        names = _pickle_globals(f.read())
    if names is None:
        return None
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    return sorted({n for n in names if n not in allowed and not n.startswith(("torch.", "collections.OrderedDict"))})


def load_weights_only(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that needs code to load, or cannot be read, is a
    one-line :class:`CheckpointError` naming ``what``, the file and the offending object. Nothing of the file runs."""
    path = Path(path)
    if path.is_dir():
        example = path / "encoder.pt" if "encoder" in what else path / "checkpoints" / "last.ckpt"
        raise CheckpointError(f"{what} {path} is a folder; expected a file (e.g. {example})")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        with safe_loading(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        offending = unsafe_globals(path)
        if offending is None:
            raise CheckpointError(f"cannot read {what} {path}: not a torch checkpoint ({_first_cause(err)})") from None
        objects = ", ".join(offending) or _first_cause(err)
        raise UnsafeFileError(f"refusing {what} {path}: loading it would run code ({objects}); spark3d loads weights "
                              "only and never executes a file's code") from None
    except Exception as err:  # truncated or not a torch file at all
        raise CheckpointError(f"cannot read {what} {path}: {_first_cause(err)}") from None


def _first_cause(err: BaseException) -> str:
    """The most specific one-line description of an error (torch's long advice paragraphs left out)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file an issue",
                                                              "Check the documentation"))]
    return (useful or lines or [type(err).__name__])[0].split(". ")[0][:300]


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError whose context is the OSError
        failed = find_os_error(err)
        if failed is None:
            raise
        raise OSError(failed.errno, failed.strerror, str(path)) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Keys of the floating-point tensors of ``state`` holding NaN or Inf."""
    bad = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(key)
    return bad


def write_encoder(path: str | Path, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``encoder.pt`` atomically (a reader never sees half a file); loadable with ``weights_only=True``.
    Refuses (CheckpointError, nothing written) weights holding NaN or Inf."""
    path = Path(path)
    export = {"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
              "meta": {**dict(meta), "format": ENCODER_FORMAT}}
    bad = nonfinite_tensors(export["state_dict"])
    if bad:
        raise CheckpointError(f"refusing to write {path}: {len(bad)} encoder tensors hold NaN/Inf (e.g. '{bad[0]}'); "
                              f"the previous {path.name}, if any, is kept")
    return atomic_save(export, path)


def read_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of an ``encoder.pt``, read weights-only; a CheckpointError names what is wrong."""
    path = Path(path)
    export = load_weights_only(path, "pretrained encoder")
    if not isinstance(export, dict) or "state_dict" not in export or "meta" not in export:
        raise CheckpointError(f"{path} is not a spark3d encoder.pt (expected 'state_dict' and 'meta')")
    meta, state = export["meta"], export["state_dict"]
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a spark3d encoder.pt ('state_dict' and 'meta' must be dictionaries)")
    version = meta.get("format", ENCODER_FORMAT)
    if version not in _KNOWN_FORMATS:
        raise CheckpointError(f"{path} has encoder format '{version}'; this spark3d reads {', '.join(_KNOWN_FORMATS)} "
                              "(upgrade spark3d to read it)")
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN/Inf (e.g. '{bad[0]}'); the pretraining diverged")
    return state, meta


def check_encoder_meta(meta: Mapping[str, Any], expected: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a file written for another network: ``expected`` holds the identity fields of the target network."""
    for key in _IDENTITY:
        value, stored = expected.get(key), meta.get(key)
        if value is None or stored is None or str(stored).lower() == str(value).lower():
            continue
        written = ", ".join(f"{k} {meta[k]}" for k in _IDENTITY if k in meta)
        target = ", ".join(f"{k} {expected[k]}" for k in _IDENTITY if expected.get(k) is not None)
        raise CheckpointError(f"{path} was pretrained with {key}={stored!r}, but the network has {key}={value!r} "
                              f"(file: {written}; network: {target})")


def load_encoder_state(target: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> int:
    """Load ``state`` into ``target`` by key; every tensor must exist with its shape. Returns the matched count."""
    own = target.state_dict()
    unknown = [k for k in state if k not in own]
    if len(unknown) == len(state):
        raise CheckpointError(f"{path} matches none of the network's {len(own)} tensors (e.g. '{next(iter(state), '')}')")
    if unknown:
        raise CheckpointError(f"{path} has {len(unknown)} tensors the network lacks, e.g. {unknown[:3]}")
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{path}: {len(wrong)} tensors have other shapes, e.g. '{k}' {got} vs network {want}")
    target.load_state_dict(dict(state), strict=False)
    return len(state)


def read_lightning_checkpoint(path: str | Path | None) -> dict[str, Any]:
    """A Lightning checkpoint's content, read weights-only; a CheckpointError for a missing, unsafe or foreign
    file, or one whose weights hold NaN/Inf."""
    if not path:
        raise CheckpointError("--ckpt_path is required: the fine-tuned checkpoint to run (e.g. RUN/checkpoints/last.ckpt)")
    path = Path(path)
    content = load_weights_only(path, "checkpoint")
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    bad = nonfinite_tensors(content["state_dict"])
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weights hold NaN/Inf (e.g. '{bad[0]}'); use an earlier checkpoint")
    return content

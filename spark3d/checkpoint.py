"""The ``encoder.pt`` format — write, read (weights-only), check against a network — and Lightning checkpoint reads.

``encoder.pt`` is ``{"state_dict": {dense-network key: tensor}, "meta": {...}}`` with
``meta["format"] == "spark3d-encoder-v1"`` and the description of the network it was written for
(``backbone``, ``source``, ``spatial_dims``, ``in_channels``, ``backbone_kwargs``) plus what is needed to
feed it (``input_size``, ``spacing``, ``intensity_range``). Files from before the format field
existed are read as v1. Nothing else in spark3d opens these files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["ENCODER_FORMAT", "ENCODER_FILE", "write_encoder", "read_encoder", "check_encoder_meta",
           "load_encoder_state", "read_lightning_checkpoint", "CheckpointError"]

ENCODER_FORMAT = "spark3d-encoder-v1"
ENCODER_FILE = "encoder.pt"
_KNOWN_FORMATS = (ENCODER_FORMAT,)
_IDENTITY = ("backbone", "source", "spatial_dims", "in_channels")  # what names the network a file was written for


def write_encoder(path: str | Path, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``encoder.pt`` atomically (a reader never sees half a file); loadable with ``weights_only=True``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export = {"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
              "meta": {**dict(meta), "format": ENCODER_FORMAT}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(export, tmp)
    os.replace(tmp, path)
    return path


def read_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, meta)`` of an ``encoder.pt``, read weights-only; a CheckpointError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained encoder {path} does not exist")
    try:
        export = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {path} as a spark3d encoder.pt: {str(err).splitlines()[0]}") from None
    if not isinstance(export, dict) or "state_dict" not in export or "meta" not in export:
        raise CheckpointError(f"{path} is not a spark3d encoder.pt (expected 'state_dict' and 'meta')")
    meta, state = export["meta"], export["state_dict"]
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a spark3d encoder.pt ('state_dict' and 'meta' must be dictionaries)")
    version = meta.get("format", ENCODER_FORMAT)
    if version not in _KNOWN_FORMATS:
        raise CheckpointError(f"{path} has encoder format '{version}'; this spark3d reads {', '.join(_KNOWN_FORMATS)} "
                              "(upgrade spark3d to read it)")
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
    """A Lightning checkpoint's content (for evaluate / predict); a CheckpointError for a missing path or file."""
    if not path:
        raise CheckpointError("--ckpt_path is required: the fine-tuned checkpoint to run (e.g. RUN/checkpoints/last.ckpt)")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint")
    return content

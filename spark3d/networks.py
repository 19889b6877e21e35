"""Fine-tuning networks from the backbone table, and loading a pretrained ``encoder.pt`` into them.

SegResNet, DynUNet and MedNeXt fine-tune as the full MONAI network; ResNets become the encoder of a
MONAI ``FlexibleUNet`` (whose encoder is the very ``ResNetFeatures`` that was pretrained), and so do
ResNet-style timm networks in 2D. Weights load by key, with no renaming, into the part of the
network the backbone's table entry names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .backbones import BackboneSpec, build_segmentation_network, encoder_children, encoder_module_of
from .checkpoint import check_encoder_meta, load_encoder_state, read_encoder
from .encoders import from_spec

__all__ = ["build_segmentation_network", "encoder_module_of", "encoder_children", "load_pretrained_encoder",
           "encoder_parameter_levels", "encoder_state_of", "pretraining_mismatches"]


def load_pretrained_encoder(network: nn.Module, path: str | Path, spec: BackboneSpec) -> dict[str, Any]:
    """Load ``encoder.pt`` into ``network`` (built for ``spec``) by key; returns a report (matched tensors, meta).

    Raises :class:`~spark3d.errors.CheckpointError` for a file that is not a spark3d encoder, was written
    for another backbone or dimensionality, has tensors of other shapes or keys the network lacks, or
    matches nothing.
    """
    state, meta = read_encoder(path)
    check_encoder_meta(meta, {"backbone": spec.name, "source": spec.source, "spatial_dims": spec.spatial_dims,
                              "in_channels": spec.in_channels}, path)
    target, prefix = encoder_module_of(network, spec)
    matched = load_encoder_state(target, state, path)
    return {"matched": matched, "network_tensors": len(network.state_dict()), "prefix": prefix, "meta": meta}


def encoder_parameter_levels(network: nn.Module, spec: BackboneSpec) -> tuple[dict[str, int], int]:
    """Encoder level (0 = finest) of each encoder parameter of a segmentation network, and the number of levels.

    Levels come from running the pretraining encoder once (which modules run before each level's output).
    """
    encoder = from_spec(spec)
    _, prefix = encoder_module_of(network, spec)
    levels = {}
    for name, _ in network.named_parameters():
        if name.startswith(prefix):
            level = encoder.level_of(name[len(prefix):])
            if level is not None:
                levels[name] = level
    return levels, len(encoder.taps)


def encoder_state_of(network: nn.Module, spec: BackboneSpec) -> dict:
    """The encoder tensors of a segmentation network under ``encoder.pt``'s keys (the ones masked pretraining
    exports for ``spec``): a supervised encoder written in the same format as a pretrained one."""
    keys = from_spec(spec).dense_state_dict().keys()
    target, _ = encoder_module_of(network, spec)
    own = target.state_dict()
    return {k: own[k].detach().clone() for k in keys}


def pretraining_mismatches(meta: dict[str, Any], data_meta: dict[str, Any]) -> list[str]:
    """``key pretrained X vs fine-tuning Y`` for the input settings (spacing, intensity window) in which the data
    an encoder was pretrained on and the fine-tuning data differ (compared to 1e-6; unknown on either side: skipped)."""
    out = []
    for key in ("spacing", "intensity_range"):
        a, b = meta.get(key), data_meta.get(key)
        if a is None or b is None:
            continue
        a, b = [float(v) for v in a], [float(v) for v in b]
        if len(a) != len(b) or any(abs(x - y) > 1e-6 for x, y in zip(a, b)):
            out.append(f"{key} pretrained {a} vs fine-tuning {b}")
    return out

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
           "encoder_parameter_levels"]


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

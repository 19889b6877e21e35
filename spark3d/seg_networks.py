"""Segmentation networks from a backbone description, and loading a pretrained ``encoder.pt`` into them.

SegResNet, DynUNet and MedNeXt fine-tune as the full MONAI network; ResNets become the encoder of a
MONAI ``FlexibleUNet`` (whose encoder is the very ``ResNetFeatures`` that was pretrained). Weights load
by key, with no renaming: into the whole network, or into ``FlexibleUNet.encoder``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .encoders import MONAI_ENCODERS

__all__ = ["build_segmentation_network", "encoder_module_of", "load_pretrained_encoder", "PretrainedMismatch"]


class PretrainedMismatch(ValueError):
    """An ``encoder.pt`` that does not fit the network it is loaded into."""


def build_segmentation_network(backbone: str, spatial_dims: int, in_channels: int, out_channels: int,
                               source: str = "monai", backbone_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The MONAI segmentation network for a backbone name (same kwargs as in pretraining)."""
    kwargs = copy.deepcopy(backbone_kwargs or {})
    key = backbone.lower()
    if source != "monai":
        raise ValueError(f"fine-tuning builds MONAI networks; backbone source '{source}' ({backbone}) is not supported")
    if key.startswith("resnet"):
        from monai.networks.nets import FlexibleUNet

        return FlexibleUNet(in_channels, out_channels, backbone=key, pretrained=False, spatial_dims=spatial_dims, **kwargs)
    if key not in MONAI_ENCODERS:
        raise ValueError(f"unknown backbone '{backbone}'; known: {', '.join(MONAI_ENCODERS)}")
    kwargs["out_channels"] = out_channels
    return MONAI_ENCODERS[key](spatial_dims, in_channels, **kwargs)


def encoder_module_of(network: nn.Module) -> tuple[nn.Module, str]:
    """The submodule holding the pretrained encoder's weights, and its key prefix in ``network``."""
    from monai.networks.nets import FlexibleUNet

    if isinstance(network, FlexibleUNet):
        return network.encoder, "encoder."
    return network, ""


def load_pretrained_encoder(network: nn.Module, path: str | Path, backbone: str | None = None,
                            spatial_dims: int | None = None, in_channels: int | None = None) -> dict[str, Any]:
    """Load ``encoder.pt`` into ``network`` by key; returns a report (matched tensors, meta).

    Raises :class:`PretrainedMismatch` for a file that is not a spark3d encoder, another backbone or
    dimensionality, tensors of other shapes, keys the network lacks, or a file that matches nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedMismatch(f"pretrained encoder {path} does not exist")
    try:
        export = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedMismatch(f"cannot read {path} as a spark3d encoder.pt: {err}") from None
    if not isinstance(export, dict) or "state_dict" not in export or "meta" not in export:
        raise PretrainedMismatch(f"{path} is not a spark3d encoder.pt (expected 'state_dict' and 'meta')")
    meta, state = export["meta"], export["state_dict"]
    expected = {"backbone": backbone, "spatial_dims": spatial_dims, "in_channels": in_channels}
    for key, value in expected.items():
        if value is not None and meta.get(key) is not None and str(meta[key]).lower() != str(value).lower():
            raise PretrainedMismatch(f"{path} was pretrained with {key}={meta[key]!r}, but the network has {key}={value!r}")
    target, prefix = encoder_module_of(network)
    own = target.state_dict()
    unknown = [k for k in state if k not in own]
    if len(unknown) == len(state):
        raise PretrainedMismatch(f"{path} matches none of the network's {len(own)} tensors (e.g. '{next(iter(state), '')}')")
    if unknown:
        raise PretrainedMismatch(f"{path} has {len(unknown)} tensors the network lacks, e.g. {unknown[:3]}")
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k, got, want = wrong[0]
        raise PretrainedMismatch(f"{path}: {len(wrong)} tensors have other shapes, e.g. '{k}' {got} vs network {want}")
    target.load_state_dict(state, strict=False)
    return {"matched": len(state), "network_tensors": len(network.state_dict()), "prefix": prefix, "meta": meta}

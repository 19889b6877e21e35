"""Segmentation networks from a backbone description, and loading a pretrained ``encoder.pt`` into them.

SegResNet, DynUNet and MedNeXt fine-tune as the full MONAI network; ResNets become the encoder of a
MONAI ``FlexibleUNet`` (whose encoder is the very ``ResNetFeatures`` that was pretrained), and so do
ResNet-style timm networks in 2D (registered as FlexibleUNet backbones ``timm/<name>``). Weights load
by key, with no renaming: into the whole network, or into ``FlexibleUNet.encoder``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .encoders import MONAI_ENCODERS, HierarchicalEncoder, from_timm

__all__ = [
    "build_segmentation_network", "encoder_module_of", "load_pretrained_encoder", "register_timm_backbone",
    "PretrainedMismatch",
]


class PretrainedMismatch(ValueError):
    """An ``encoder.pt`` that does not fit the network it is loaded into."""


def build_segmentation_network(backbone: str, spatial_dims: int, in_channels: int, out_channels: int,
                               source: str = "monai", backbone_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The MONAI segmentation network for a backbone name (same kwargs as in pretraining)."""
    kwargs = copy.deepcopy(backbone_kwargs or {})
    key = backbone.lower()
    if source == "timm":
        from monai.networks.nets import FlexibleUNet

        if spatial_dims != 2:
            raise ValueError(f"timm backbones are 2D; got spatial_dims={spatial_dims} for '{backbone}'")
        return FlexibleUNet(in_channels, out_channels, backbone=register_timm_backbone(backbone), pretrained=False,
                            spatial_dims=2, **kwargs)
    if source != "monai":
        raise ValueError(f"unknown backbone source '{source}' ({backbone}); expected 'monai' or 'timm'")
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
        if isinstance(network.encoder, HierarchicalEncoder):  # a registered timm backbone
            return network.encoder.network, "encoder.network."
        return network.encoder, "encoder."
    return network, ""


def register_timm_backbone(name: str) -> str:
    """Register a ResNet-style timm network (levels at strides 2, 4, 8, 16, 32) as a MONAI FlexibleUNet
    backbone ``timm/<name>``; its encoder is the unmodified timm model, so ``encoder.pt`` loads by key."""
    from monai.networks.blocks import BaseEncoder
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    key = f"timm/{name}"
    if key in FLEXUNET_BACKBONE.register_dict:
        return key
    probe = from_timm(name, strides=_UNET_STRIDES)  # raises a clear error for nets without a stride-2 level
    channels = tuple(probe.channels)

    class TimmUNetEncoder(HierarchicalEncoder, BaseEncoder):
        """A timm network tapped at strides 2..32, as FlexibleUNet wants its encoders."""

        def __init__(self, model_name: str, spatial_dims: int, in_channels: int, pretrained: bool) -> None:
            if pretrained:
                raise ValueError("spark3d never downloads weights: load a SparK encoder.pt instead")
            enc = from_timm(model_name, strides=_UNET_STRIDES, in_chans=in_channels)
            HierarchicalEncoder.__init__(self, enc.network, enc.taps, 2, in_channels, meta=enc.meta)

        @classmethod
        def get_encoder_names(cls) -> list[str]:
            return [key]

        @classmethod
        def num_outputs(cls) -> list[int]:
            return [len(channels)]

        @classmethod
        def num_channels_per_output(cls) -> list[tuple[int, ...]]:
            return [channels]

        @classmethod
        def get_encoder_parameters(cls) -> list[dict]:
            return [{"model_name": name, "spatial_dims": 2, "in_channels": 3, "pretrained": False}]

    FLEXUNET_BACKBONE.register_class(TimmUNetEncoder)
    return key


_UNET_STRIDES = (2, 4, 8, 16, 32)


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

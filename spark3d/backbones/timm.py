"""timm family: any 2D timm convnet with ``feature_info``, tapped by total stride; fine-tuned in a ``FlexibleUNet``.

The fine-tuning network registers the unmodified timm model as a MONAI ``FlexibleUNet`` backbone
``timm/<name>`` (ResNet-style networks with levels at strides 2, 4, 8, 16 and 32), so ``encoder.pt``
loads into it by key.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .registry import Backbone, Example, register

__all__ = ["timm_taps", "register_timm_unet_backbone", "UNET_STRIDES"]

SPARK_STRIDES = (4, 8, 16, 32)
UNET_STRIDES = (2, 4, 8, 16, 32)


def _build(name: str, spatial_dims: int, in_channels: int, **kw) -> nn.Module:
    import timm

    kw.setdefault("pretrained", False)
    network = timm.create_model(name, in_chans=in_channels, **kw)
    if not hasattr(network, "forward_intermediates") or not hasattr(network, "feature_info"):
        raise ValueError(f"timm model '{name}' has no forward_intermediates/feature_info; it is not a supported convnet")
    return network


def _levels(network: nn.Module) -> list[dict]:
    info = network.feature_info
    return info.get_dicts() if hasattr(info, "get_dicts") else list(info)


def _by_reduction(network: nn.Module, strides: Sequence[int]) -> dict[int, int]:
    """Index in ``feature_info`` of the last level at each wanted total stride (a clear error if absent)."""
    found = {}
    for i, level in enumerate(_levels(network)):
        found[int(level["reduction"])] = i  # the last module at each reduction wins
    missing = [s for s in strides if s not in found]
    if missing:
        name = getattr(network, "default_cfg", {}).get("architecture", type(network).__name__)
        raise ValueError(f"timm model '{name}' has no feature level at stride {missing}; it has {sorted(found)}")
    return {s: found[s] for s in strides}


def timm_taps(network: nn.Module, strides: Sequence[int] = SPARK_STRIDES) -> list[str]:
    """Module names of a timm network's levels at the given total strides (finest first)."""
    levels = _levels(network)
    return [levels[i]["module"] for i in _by_reduction(network, strides).values()]


class TimmUNetEncoder(nn.Module):
    """An unmodified timm network giving its stride 2..32 levels, as a FlexibleUNet encoder wants them."""

    backbone_name = ""
    channels: tuple[int, ...] = ()

    def __init__(self, model_name: str, spatial_dims: int, in_channels: int, pretrained: bool) -> None:
        super().__init__()
        if pretrained:
            raise ValueError("spark3d never downloads weights: load a SparK encoder.pt instead")
        if spatial_dims != 2:
            raise ValueError(f"timm backbones are 2D; got spatial_dims={spatial_dims}")
        self.network = _build(model_name, 2, in_channels)
        self.indices = list(_by_reduction(self.network, UNET_STRIDES).values())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.network.forward_intermediates(x, indices=self.indices, intermediates_only=True)

    @classmethod
    def get_encoder_names(cls) -> list[str]:
        return [cls.backbone_name]

    @classmethod
    def num_outputs(cls) -> list[int]:
        return [len(cls.channels)]

    @classmethod
    def num_channels_per_output(cls) -> list[tuple[int, ...]]:
        return [cls.channels]

    @classmethod
    def get_encoder_parameters(cls) -> list[dict]:
        return [{"model_name": cls.backbone_name.removeprefix("timm/"), "spatial_dims": 2, "in_channels": 3,
                 "pretrained": False}]


def register_timm_unet_backbone(name: str) -> str:
    """Register timm network ``name`` as the MONAI FlexibleUNet backbone ``timm/<name>`` (once); returns the key."""
    from monai.networks.blocks import BaseEncoder
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    key = f"timm/{name}"
    if key in FLEXUNET_BACKBONE.register_dict:
        return key
    probe = _build(name, 2, 3)
    levels = _levels(probe)
    channels = tuple(int(levels[i]["num_chs"]) for i in _by_reduction(probe, UNET_STRIDES).values())
    encoder_class = type(f"TimmUNetEncoder_{name}", (TimmUNetEncoder, BaseEncoder),
                         {"backbone_name": key, "channels": channels})
    FLEXUNET_BACKBONE.register_class(encoder_class)
    return key


def _unet(name: str, spatial_dims: int, in_channels: int, out_channels: int, **kw) -> nn.Module:
    from monai.networks.nets import FlexibleUNet

    if spatial_dims != 2:
        raise ValueError(f"timm backbones are 2D; got spatial_dims={spatial_dims} for '{name}'")
    return FlexibleUNet(in_channels, out_channels, backbone=register_timm_unet_backbone(name), pretrained=False,
                        spatial_dims=2, **kw)


register(Backbone(
    family="timm", source="timm", names=None, spatial_dims=(2,), build=_build, taps=timm_taps, segmentation=_unet,
    seg_encoder_prefix="encoder.network.",
    examples=(Example("timm-resnet18", "resnet18", 2, 3, (64, 64)),
              Example("timm-convnext_atto", "convnext_atto", 2, 3, (64, 64))),
))

"""MONAI families: ResNets (``ResNetFeatures``, fine-tuned in a ``FlexibleUNet``), SegResNet, DynUNet, MedNeXt."""

from __future__ import annotations

import pydoc
from typing import Any, Callable

from torch import nn

from .registry import Backbone, Example, register

__all__: list[str] = []


def _from_definition(define: Callable[..., dict[str, Any]]) -> Callable[..., nn.Module]:
    """A builder instantiating the MONAI network a definition names: spark3d and MONAI bundles build from
    the same description (``{"_target_": "monai.networks.nets.X", **arguments}``)."""

    def build(*args: Any, **kw: Any) -> nn.Module:
        definition = dict(define(*args, **kw))
        return pydoc.locate(definition.pop("_target_"))(**definition)

    return build


def _build_resnet(name: str, spatial_dims: int, in_channels: int, **kw) -> nn.Module:
    """MONAI's ``ResNetFeatures`` (conv1 stride 2, MedicalNet shortcuts): the very encoder of a
    ``FlexibleUNet(backbone="resnetN")``, so pretrained weights load into it key for key."""
    from monai.networks.nets.resnet import ResNetFeatures

    kw.setdefault("pretrained", False)  # never download
    return ResNetFeatures(name, spatial_dims=spatial_dims, in_channels=in_channels, **kw)


def _resnet_unet_def(name: str, spatial_dims: int, in_channels: int, out_channels: int, **kw) -> dict[str, Any]:
    return {"_target_": "monai.networks.nets.FlexibleUNet", "in_channels": in_channels, "out_channels": out_channels,
            "backbone": name, "pretrained": False, "spatial_dims": spatial_dims, **kw}


def _is(class_name: str):
    def check(network: nn.Module) -> bool:
        from monai.networks import nets

        return isinstance(network, getattr(nets, class_name))

    return check


register(Backbone(
    family="monai-resnet", source="monai", names=("resnet10", "resnet18", "resnet34", "resnet50"), spatial_dims=(2, 3),
    build=_build_resnet, taps=lambda net: ["layer1", "layer2", "layer3", "layer4"],
    segmentation=_from_definition(_resnet_unet_def), bundle_network=_resnet_unet_def,
    seg_encoder_prefix="encoder.", recognises=_is("ResNet"),
    examples=(Example("monai-resnet18-2d", "resnet18", 2, 1, (64, 64)),
              Example("monai-resnet18-3d", "resnet18", 3, 1, (64, 64, 64))),
))


def _segresnet_def(name: str, spatial_dims: int, in_channels: int, out_channels: int = 2, **kw) -> dict[str, Any]:
    return {"_target_": "monai.networks.nets.SegResNet", "spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": out_channels, **kw}


_build_segresnet = _from_definition(_segresnet_def)


register(Backbone(
    family="segresnet", source="monai", names=("segresnet",), spatial_dims=(2, 3),
    build=_build_segresnet, taps=lambda net: [f"down_layers.{i}" for i in range(len(net.down_layers))],
    segmentation=_build_segresnet, bundle_network=_segresnet_def, seg_encoder_modules=("convInit", "down_layers"),
    recognises=_is("SegResNet"),
    examples=(Example("monai-segresnet-3d", "segresnet", 3, 1, (32, 32, 32), {"init_filters": 8}),),
))


def _dynunet_def(name: str, spatial_dims: int, in_channels: int, out_channels: int = 2, **kw) -> dict[str, Any]:
    strides = kw.pop("strides", [1, 2, 2, 2, 2])
    kernel_size = kw.pop("kernel_size", [3] * len(strides))
    upsample = kw.pop("upsample_kernel_size", strides[1:])
    return {"_target_": "monai.networks.nets.DynUNet", "spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": out_channels, "kernel_size": kernel_size, "strides": strides,
            "upsample_kernel_size": upsample, **kw}


_build_dynunet = _from_definition(_dynunet_def)


register(Backbone(
    family="dynunet", source="monai", names=("dynunet",), spatial_dims=(2, 3), build=_build_dynunet,
    taps=lambda net: ["input_block"] + [f"downsamples.{i}" for i in range(len(net.downsamples))] + ["bottleneck"],
    segmentation=_build_dynunet, bundle_network=_dynunet_def,
    seg_encoder_modules=("input_block", "downsamples", "bottleneck"),
    recognises=_is("DynUNet"),
    examples=(Example("monai-dynunet-3d", "dynunet", 3, 1, (32, 32, 16),
                      {"strides": [1, 2, 2, (2, 2, 1)], "filters": [8, 16, 32, 64]}),),
))


def _mednext_def(name: str, spatial_dims: int, in_channels: int, out_channels: int = 2, **kw) -> dict[str, Any]:
    return {"_target_": "monai.networks.nets.MedNeXt", "spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": out_channels, **kw}


_build_mednext = _from_definition(_mednext_def)


register(Backbone(
    family="mednext", source="monai", names=("mednext",), spatial_dims=(2, 3), build=_build_mednext,
    taps=lambda net: [f"enc_stages.{i}" for i in range(len(net.enc_stages))] + ["bottleneck"],
    segmentation=_build_mednext, bundle_network=_mednext_def,
    seg_encoder_modules=("stem", "enc_stages", "down_blocks", "bottleneck"),
    recognises=_is("MedNeXt"),
    examples=(Example("monai-mednext-3d", "mednext", 3, 1, (32, 32, 32), {"init_filters": 8}),),
))

"""nnU-Net family: ``ResidualEncoderUNet`` (ResEnc M, L, XL) and ``PlainConvUNet`` from ``dynamic-network-architectures``.

Pretrained and fine-tuned as the very same network: the encoder is tapped at ``encoder.stages.0 … N``
(the U-Net decoder never runs while pretraining) and ``encoder.pt`` loads by key into the segmentation
network, deep supervision off. Needs the optional extra ``pip install spark3d[nnunet]``.

The recipe is nnU-Net's (its ResEnc planners and nnssl's ResEnc-L): blocks per stage 1, 3, 4, 6, 6, 6, …
(ResEnc) or 2 convs per stage (plain), one conv per decoder stage for ResEnc and two for plain,
widths 32 doubling per stage up to 320 (3D) or 512 (2D), 3×3(×3) convs with bias, InstanceNorm
(affine, eps 1e-5), LeakyReLU. nnU-Net's M, L and XL planners share that recipe and differ only in
the GPU memory target (8, 24, 40 GB) they fill with larger patches; for isotropic patches of 128³ and
up all three give the 6-stage network nnssl pretrains as ResEnc-L (strides 1, 2, 2, 2, 2, 2), which is
the default topology here. ``patch_size`` and ``spacing`` derive nnU-Net's topology instead (anisotropic
strides and kernels where the spacing is), and ``strides`` / ``kernel_sizes`` set it by hand.

The name ``plan`` (or any name given ``backbone_kwargs: {plans: PLANS.json, configuration: 3d_fullres}``) builds
the network of an nnU-Net plan exactly as nnU-Net's ``get_network_from_plans`` does (``nnunet_plans``).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Sequence

from torch import nn

from ..errors import ConfigError
from .nnunet_plans import PLAN_KEYS, build_plan_network, plan_dataset_json
from .registry import Backbone, Example, register

__all__ = ["RESENC_PRESETS", "nnunet_topology", "nnunet_kwargs", "plan_out_channels"]

RESENC_PRESETS = {"resenc_m": 8, "resenc_l": 24, "resenc_xl": 40}  # name -> nnU-Net planner's GPU memory target (GB)
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)  # nnU-Net ResEnc planners: residual blocks per encoder stage
BASE_FEATURES = 32
MAX_FEATURES = {1: 512, 2: 512, 3: 320}
DEFAULT_STAGES = 6  # nnssl's ResEnc-L
MIN_EDGE = 4  # nnU-Net: smallest feature-map edge at the bottleneck


def nnunet_topology(patch_size: Sequence[int], spacing: Sequence[float] | None = None, min_edge: int = MIN_EDGE
                    ) -> tuple[list[list[int]], list[list[int]]]:
    """Per-stage strides and kernel sizes by nnU-Net's planning rule for a patch size and voxel spacing.

    Halve every axis whose spacing is within 2× of the finest and whose size stays at least
    ``2 * min_edge``; a kernel axis becomes 3 once its spacing is within 2× of the finest (1 before);
    the bottleneck gets 3 on every axis.
    """
    size = [int(s) for s in patch_size]
    current = [float(s) for s in (spacing or [1.0] * len(size))]
    if len(current) != len(size):
        raise ValueError(f"spacing {tuple(current)} and patch_size {tuple(size)} have different numbers of axes")
    strides, kernels, kernel = [[1] * len(size)], [], [1] * len(size)
    while True:
        axes = [i for i in range(len(size)) if size[i] >= 2 * min_edge]
        if not axes:
            break
        finest = min(current[i] for i in axes)
        axes = [i for i in axes if current[i] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_edge:
            break
        kernel = [3 if k == 3 or current[i] / min(current) < 2 else 1 for i, k in enumerate(kernel)]
        kernels.append(list(kernel))
        strides.append([2 if i in axes else 1 for i in range(len(size))])
        for i in axes:
            current[i] *= 2
            size[i] = math.ceil(size[i] / 2)
    kernels.append([3] * len(size))
    return strides, kernels


def nnunet_kwargs(name: str, spatial_dims: int, in_channels: int, out_channels: int = 2, **kw: Any) -> dict[str, Any]:
    """The constructor arguments of the named network (``resenc_m|l|xl`` or ``plainconv``) with overrides.

    Overrides: ``strides`` and ``kernel_sizes`` (per stage), or ``patch_size`` (+ ``spacing``) for nnU-Net's
    topology rule; ``features_per_stage``, or ``base_features`` / ``max_features``; ``n_blocks_per_stage``
    (ResEnc) or ``n_conv_per_stage`` (plain); ``n_conv_per_stage_decoder``; ``deep_supervision``.
    """
    residual = name in RESENC_PRESETS
    patch_size, spacing = kw.pop("patch_size", None), kw.pop("spacing", None)
    strides, kernels = kw.pop("strides", None), kw.pop("kernel_sizes", None)
    if strides is None and patch_size is not None:
        patch = [patch_size] * spatial_dims if isinstance(patch_size, int) else list(patch_size)
        strides, planned = nnunet_topology(patch, spacing)
        kernels = planned if kernels is None else kernels
    given = next((v for v in (strides, kernels, kw.get("features_per_stage")) if v is not None), None)
    n = len(given) if given is not None else DEFAULT_STAGES
    strides = [[1] * spatial_dims] + [[2] * spatial_dims] * (n - 1) if strides is None else strides
    strides = [[s] * spatial_dims if isinstance(s, int) else list(s) for s in strides]
    kernels = [[3] * spatial_dims] * n if kernels is None else [[k] * spatial_dims if isinstance(k, int) else list(k)
                                                                  for k in kernels]
    if len(kernels) != n:
        raise ValueError(f"{name}: {len(kernels)} kernel_sizes for {n} stages (strides {strides})")
    base, top = kw.pop("base_features", BASE_FEATURES), kw.pop("max_features", MAX_FEATURES[spatial_dims])
    features = kw.pop("features_per_stage", None) or [min(top, base * 2**i) for i in range(n)]
    if len(features) != n:
        raise ValueError(f"{name}: {len(features)} features_per_stage for {n} stages")
    conv, norm = {1: (nn.Conv1d, nn.InstanceNorm1d), 2: (nn.Conv2d, nn.InstanceNorm2d),
                  3: (nn.Conv3d, nn.InstanceNorm3d)}[spatial_dims]
    args = dict(input_channels=in_channels, n_stages=n, features_per_stage=list(features), conv_op=conv,
                kernel_sizes=kernels, strides=strides, num_classes=out_channels, conv_bias=True, norm_op=norm,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)
    if residual:
        args["n_blocks_per_stage"] = list(kw.pop("n_blocks_per_stage", RESENC_BLOCKS[:n]))
        args["n_conv_per_stage_decoder"] = list(kw.pop("n_conv_per_stage_decoder", [1] * (n - 1)))
    else:
        args["n_conv_per_stage"] = list(kw.pop("n_conv_per_stage", [2] * n))
        args["n_conv_per_stage_decoder"] = list(kw.pop("n_conv_per_stage_decoder", [2] * (n - 1)))
    args.update(kw)
    return args


def plan_out_channels(plans: str) -> int:
    """The segmentation heads of a plan's dataset: labels of the ``dataset.json`` beside the plans (2 without one)."""
    dataset = plan_dataset_json(plans) or {}
    labels = {k: v for k, v in (dataset.get("labels") or {}).items() if k != "ignore"}  # nnU-Net's ignore label
    if not labels:
        return 2
    regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
    return len(labels) - 1 if regions else len(labels)  # regions: one sigmoid head per region, no background


def _build_from_plan(name: str, spatial_dims: int, in_channels: int, out_channels: int | None, kw: dict) -> nn.Module:
    """The network of ``kw["plans"]`` / ``kw["configuration"]``; other keys would silently not apply, so they are refused."""
    plans, configuration = kw.pop("plans"), kw.pop("configuration", "3d_fullres")
    extra = sorted(set(kw) - {"deep_supervision"})
    if extra:
        raise ConfigError(f"backbone_kwargs {extra} do not apply: the plan {plans} decides the network (keep only "
                          f"{list(PLAN_KEYS)})")
    if name not in ("plan", *RESENC_PRESETS, "plainconv"):
        raise ConfigError(f"backbone '{name}' with backbone_kwargs.plans: use backbone 'plan'")
    heads = plan_out_channels(plans) if out_channels is None else out_channels
    return build_plan_network(plans, configuration, in_channels, heads, kw.get("deep_supervision", False), spatial_dims)


def _build(name: str, spatial_dims: int, in_channels: int, out_channels: int | None = None, **kw: Any) -> nn.Module:
    """``ResidualEncoderUNet`` or ``PlainConvUNet`` with nnU-Net's He initialisation (random weights), or a plan's network."""
    if "plans" in kw or name == "plan":
        if "plans" not in kw:
            raise ConfigError("backbone 'plan' needs backbone_kwargs.plans (an nnU-Net plans JSON) and .configuration")
        return _build_from_plan(name, spatial_dims, in_channels, out_channels, dict(kw))
    out_channels = 2 if out_channels is None else out_channels
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    except ImportError:
        raise ConfigError(f"backbone '{name}' (source nnunet) needs dynamic-network-architectures: "
                          "pip install 'spark3d[nnunet]'") from None
    cls = ResidualEncoderUNet if name in RESENC_PRESETS else PlainConvUNet
    network = cls(**nnunet_kwargs(name, spatial_dims, in_channels, out_channels, **kw))
    if hasattr(network, "initialize"):
        network.apply(network.initialize)
    return network


def _taps(network: nn.Module) -> list[str]:
    return [f"encoder.stages.{i}" for i in range(len(network.encoder.stages))]


def _recognises(network: nn.Module) -> bool:
    return type(network).__name__ in ("ResidualEncoderUNet", "PlainConvUNet") and type(network).__module__.startswith(
        "dynamic_network_architectures")


def _installed() -> bool:
    try:
        return importlib.util.find_spec("dynamic_network_architectures") is not None
    except (ImportError, ValueError, AttributeError):
        return False


_SMALL = {"features_per_stage": [4, 8, 8, 16], "n_blocks_per_stage": [1, 1, 2, 2]}
register(Backbone(
    family="nnunet", source="nnunet", names=(*RESENC_PRESETS, "plainconv", "plan"), spatial_dims=(2, 3), build=_build,
    taps=_taps, segmentation=_build, seg_encoder_modules=("encoder",), recognises=_recognises,
    # examples only where the optional package is installed (the tests parameterise over them)
    examples=(Example("nnunet-resenc-3d-aniso", "resenc_l", 3, 1, (32, 32, 16),
                      {**_SMALL, "strides": [1, [2, 2, 1], 2, 2], "kernel_sizes": [[3, 3, 1], 3, 3, 3]}),
              Example("nnunet-plainconv-2d", "plainconv", 2, 1, (64, 64), {"features_per_stage": [4, 8, 8, 16]}))
    if _installed() else (),
))

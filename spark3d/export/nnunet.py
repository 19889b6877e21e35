"""Hand-off to nnU-Net: a pretrained ``encoder.pt`` as the whole network of a plan, in nnU-Net's weights file.

``nnUNetv2_train D C F -p PLANS -pretrained_weights FILE`` (nnunetv2 2.8.1) loads ``FILE["network_weights"]``
after checking that every key of the network built from the plans (but ``.seg_layers.``) is there with its
shape; nnU-Net master and nnssl read ``FILE["nnssl_adaptation_plan"]`` too and take the encoder and stem only.
So the file holds the state dict of the whole network built from the plan (every name a tensor is registered
under, decoder included, nnU-Net's own initialisation there) with the pretrained encoder and stem loaded
into it, and every value is a tensor or plain Python (it loads with ``weights_only=True``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import build_plan_network, plan_architecture, plan_out_channels, plan_strides, read_plans
from ..backbones.nnunet_plans import plan_configuration, plan_dataset_json
from ..checkpoint import atomic_save, read_encoder
from ..errors import CheckpointError
from ..version import __version__

__all__ = ["NNUNET_WEIGHTS_FORMAT", "export_nnunet", "adaptation_plan", "first_difference"]

NNUNET_WEIGHTS_FORMAT = "spark3d-nnunet-v1"
_STAGE = re.compile(r"^encoder\.(stem|stages\.\d+)\.")


def _groups(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Encoder tensors by stage (``encoder.stem``, ``encoder.stages.0``, …), in the network's order."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _STAGE.match(key)
        if match:
            out.setdefault(f"encoder.{match.group(1)}", {})[key] = shape
    return out


def first_difference(pretrained: dict[str, tuple[int, ...]], plan: dict[str, tuple[int, ...]]) -> str | None:
    """The first encoder stage whose tensors (names and shapes) differ between two state dicts, described; None if alike."""
    mine, theirs = _groups(pretrained), _groups(plan)
    for stage in list(dict.fromkeys([*theirs, *mine])):
        a, b = mine.get(stage, {}), theirs.get(stage, {})
        if a == b:
            continue
        if not a or not b:
            return f"{stage} exists only in {'the plan' if b else 'encoder.pt'}'s network"
        only = [k for k in b if k not in a] or [k for k in a if k not in b]
        if only:
            return f"{stage}: {len(a)} tensors vs the plan's {len(b)} (e.g. '{only[0]}')"
        key = next(k for k in b if a[k] != b[k])
        return f"{stage}: '{key}' is {a[key]} in encoder.pt, {b[key]} in the plan"
    return None


def adaptation_plan(network: nn.Module, plans: str | Path, configuration: str, meta: dict[str, Any],
                    in_channels: int) -> dict[str, Any]:
    """The ``nnssl_adaptation_plan`` of the exported file (plain Python only)."""
    content = read_plans(plans)
    conf = plan_configuration(content, configuration, str(plans))
    arch = plan_architecture(plans, configuration)
    stem = getattr(network, "key_to_stem", "encoder.stem")
    return {
        "architecture_plans": {"arch_class_name": arch["network_class_name"], "arch_kwargs": arch["arch_kwargs"],
                               "arch_kwargs_requiring_import": arch["_kw_requires_import"]},
        "pretrain_plan": {
            "plans_name": content.get("plans_name"), "dataset_name": content.get("dataset_name"),
            "transpose_forward": content.get("transpose_forward"),
            "foreground_intensity_properties_per_channel": content.get("foreground_intensity_properties_per_channel"),
            "configurations": {configuration: {"patch_size": list(meta.get("input_size") or conf["patch_size"]),
                                               "spacing": meta.get("spacing") or conf.get("spacing"),
                                               "normalization_schemes": conf.get("normalization_schemes")}}},
        "pretrain_num_input_channels": int(in_channels),
        "recommended_downstream_patchsize": [int(s) for s in conf["patch_size"]],
        "key_to_encoder": getattr(network, "key_to_encoder", "encoder.stages"),
        "key_to_stem": stem,
        "keys_to_in_proj": list(getattr(network, "keys_to_in_proj", (f"{stem}.convs.0.conv",))),
        "key_to_lpe": None,
        "spark3d": {"format": NNUNET_WEIGHTS_FORMAT, "version": __version__, "method": meta.get("method"),
                    "global_step": meta.get("global_step"), "mask_ratio": meta.get("mask_ratio")},
    }


def export_nnunet(encoder: str | Path, plans: str | Path, configuration: str, out: str | Path) -> Path:
    """Write ``out``: ``{"network_weights": state dict of the plan's whole network with encoder.pt's encoder and stem,
    "nnssl_adaptation_plan": …}``. Refused (CheckpointError, nothing written) when encoder.pt is not a spark3d file,
    was pretrained for other channels, or for another architecture (the first differing stage is named)."""
    encoder, out = Path(encoder), Path(out)
    state, meta = read_encoder(encoder)
    arch = plan_architecture(plans, configuration)
    dataset = plan_dataset_json(plans) or {}
    channels = len(dataset["channel_names"]) if isinstance(dataset.get("channel_names"), dict) else None
    pretrained_channels = meta.get("in_channels")
    if channels is not None and pretrained_channels is not None and int(pretrained_channels) != channels:
        raise CheckpointError(f"{encoder} was pretrained on {pretrained_channels} input channel(s); the plan's dataset "
                              f"({Path(plans).parent / 'dataset.json'}) has {channels}")
    in_channels = channels if channels is not None else int(pretrained_channels or 1)
    network = build_plan_network(plans, configuration, in_channels, plan_out_channels(str(plans)), None)
    own = network.state_dict()
    where = f"{encoder} ({meta.get('backbone')}, {meta.get('source')}) was pretrained on another network than " \
            f"{Path(plans).name} '{configuration}' ({arch['network_class_name'].rsplit('.', 1)[-1]})"
    diff = first_difference({k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in own.items()})
    if diff is None and not any(_STAGE.match(k) for k in state):
        diff = f"encoder.pt holds no encoder.stem / encoder.stages tensors (backbone {meta.get('backbone')!r}, " \
               f"source {meta.get('source')!r})"
    if diff is None and meta.get("strides") is not None:
        planned = [list(s) for s in plan_strides(plans, configuration)]
        stored = [list(s) for s in meta["strides"]]
        if stored != planned:
            i = next((i for i, (a, b) in enumerate(zip(stored, planned)) if a != b), min(len(stored), len(planned)))
            diff = (f"encoder.stages.{i}: total stride {stored[i] if i < len(stored) else None} in encoder.pt, "
                    f"{planned[i] if i < len(planned) else None} in the plan")
    unknown = [k for k in state if k not in own]
    if diff is None and unknown:
        diff = f"'{unknown[0]}' is not in the plan's network"
    if diff is not None:
        raise CheckpointError(f"{where}: {diff}")
    network.load_state_dict(dict(state), strict=False)
    weights = network.state_dict()
    if any(not torch.equal(weights[k], v) for k, v in state.items()):  # an alias loaded last over another name
        raise CheckpointError(f"{encoder}: tensors registered under several names disagree; not a spark3d export")
    payload = {"network_weights": {k: v.detach().cpu() for k, v in weights.items()},
               "nnssl_adaptation_plan": adaptation_plan(network, plans, configuration, meta, in_channels)}
    return atomic_save(payload, out)

"""nnU-Net plans files: one configuration of a ``nnUNet*Plans.json`` read and checked, and the network it builds.

The network is what nnU-Net's ``get_network_from_plans`` builds for that plan: the class named by
``architecture.network_class_name``, its ``arch_kwargs`` with the ``_kw_requires_import`` entries located as
Python objects, ``input_channels`` / ``num_classes`` as given, and the class's own ``initialize`` applied.
Configurations that ``inherits_from`` another are merged the way nnU-Net's ``PlansManager`` does it.
"""

from __future__ import annotations

import copy
import json
import pydoc
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["read_plans", "plan_configuration", "plan_dataset_json", "plan_architecture", "build_plan_network",
           "plan_strides", "plan_probe_size", "PLAN_KEYS"]

PLAN_KEYS = ("plans", "configuration")  # the backbone_kwargs that name a plan's network


def read_plans(path: str | Path) -> dict[str, Any]:
    """The content of a plans JSON; ConfigError naming the file when it is missing or not an nnU-Net plans file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"nnU-Net plans {path} does not exist")
    try:
        plans = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"nnU-Net plans {path} is not valid JSON: {err}") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise ConfigError(f"{path} is not an nnU-Net plans file (no 'configurations' object)")
    return plans


def plan_configuration(plans: dict[str, Any], configuration: str, where: str = "plans") -> dict[str, Any]:
    """One configuration of a plan with ``inherits_from`` resolved (the child's keys win)."""
    configs = plans["configurations"]
    if configuration not in configs:
        raise ConfigError(f"{where} has no configuration '{configuration}' (it has: {', '.join(configs)})")
    chain, name = [], configuration
    while name is not None:
        if name in chain or name not in configs:
            raise ConfigError(f"{where}: configuration '{configuration}' inherits from a missing or circular '{name}'")
        chain.append(name)
        name = configs[name].get("inherits_from")
    merged: dict[str, Any] = {}
    for name in reversed(chain):
        merged.update(copy.deepcopy(configs[name]))
    return merged


def plan_dataset_json(path: str | Path) -> dict[str, Any] | None:
    """The ``dataset.json`` beside a plans file (nnU-Net writes it into the preprocessed dataset folder), or None."""
    found = Path(path).parent / "dataset.json"
    if not found.is_file():
        return None
    try:
        content = json.loads(found.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{found} is not valid JSON: {err}") from None
    return content if isinstance(content, dict) else None


def plan_architecture(path: str | Path, configuration: str) -> dict[str, Any]:
    """``{"network_class_name", "arch_kwargs", "_kw_requires_import"}`` of a plan's configuration (plain JSON)."""
    conf = plan_configuration(read_plans(path), configuration, str(path))
    arch = conf.get("architecture")
    if not isinstance(arch, dict) or "network_class_name" not in arch or "arch_kwargs" not in arch:
        raise ConfigError(f"{path}: configuration '{configuration}' has no 'architecture' with network_class_name and "
                          "arch_kwargs (a plans file of nnU-Net < 2.4?)")
    return {"network_class_name": arch["network_class_name"], "arch_kwargs": dict(arch["arch_kwargs"]),
            "_kw_requires_import": list(arch.get("_kw_requires_import", []))}


def _locate(name: str, what: str) -> Any:
    found = pydoc.locate(name)
    if found is None:
        raise ConfigError(f"{what} '{name}' cannot be imported (install dynamic-network-architectures: "
                          "pip install 'spark3d[nnunet]')")
    return found


def build_plan_network(path: str | Path, configuration: str, in_channels: int, out_channels: int,
                       deep_supervision: bool | None = False, spatial_dims: int | None = None) -> nn.Module:
    """The network of a plan's configuration, built as ``get_network_from_plans`` builds it (random init)."""
    arch = plan_architecture(path, configuration)
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key], f"{path}: arch_kwargs.{key}")
    cls = _locate(arch["network_class_name"], f"{path}: network_class_name")
    conv = kwargs.get("conv_op")
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}.get(conv)
    if spatial_dims is not None and dims is not None and dims != spatial_dims:
        raise ConfigError(f"{path}: configuration '{configuration}' builds a {dims}D network, spatial_dims is "
                          f"{spatial_dims}")
    if deep_supervision is not None:
        kwargs["deep_supervision"] = deep_supervision
    network = cls(input_channels=int(in_channels), num_classes=int(out_channels), **kwargs)
    if hasattr(network, "initialize"):
        network.apply(network.initialize)
    return network


def plan_strides(path: str | Path, configuration: str) -> list[tuple[int, ...]]:
    """Cumulative per-axis strides of the plan network's encoder stages, finest first (nnU-Net's array axes)."""
    strides = plan_architecture(path, configuration)["arch_kwargs"]["strides"]
    dims = next((len(s) for s in strides if isinstance(s, (list, tuple))), None)
    if dims is None:
        raise ConfigError(f"{path}: arch_kwargs.strides {strides} must list per-axis strides")
    total, out = [1] * dims, []
    for s in strides:
        step = list(s) if isinstance(s, (list, tuple)) else [int(s)] * dims
        total = [t * int(v) for t, v in zip(total, step)]
        out.append(tuple(total))
    return out


def plan_probe_size(path: str | Path, configuration: str) -> tuple[int, ...]:
    """The smallest probe input the plan network downsamples to whole numbers: twice its total stride per axis."""
    return tuple(2 * s for s in plan_strides(path, configuration)[-1])

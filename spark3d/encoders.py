"""Hierarchical encoders: any network plus the names of the submodules whose outputs are its levels.

:class:`HierarchicalEncoder` runs the wrapped network's own ``forward``, captures the outputs of the
tapped submodules with forward hooks and stops right after the last one (a U-Net's decoder never
runs). A probe pass at construction measures each level's channels and per-axis stride, records
which modules take part in encoding (those are converted, checked and exported) and at which level,
and traces every operation they run outside covered layers (``op_trace``: what the converter judges).
:func:`from_timm`, :func:`from_monai`, :func:`from_nnunet` and :func:`from_spec` build encoders from the
backbone table.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .backbones import (BackboneSpec, build_network, lookup, plan_configuration, plan_probe_size, read_plans, registered,
                        timm_taps)
from .sparse import OpTrace, trace_ops

__all__ = ["HierarchicalEncoder", "from_timm", "from_monai", "from_nnunet", "from_spec", "make_encoder"]


class _StopEncoding(Exception):
    """Raised by the last tap's hook to stop the wrapped network's forward."""


class _TapHook:
    """Forward hook of one tap; an object (not a closure) so deep copies of an encoder hook their own copy."""

    def __init__(self, encoder: "HierarchicalEncoder", name: str) -> None:
        self.encoder = encoder
        self.name = name

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.encoder._on_tap(self.name, output)


class HierarchicalEncoder(nn.Module):
    """A network seen as a multi-scale encoder through named taps; ``enc(x)`` returns features, finest first.

    Args:
        network: the dense module whose weights are pretrained; its own forward is run.
        taps: names of submodules (as in ``named_modules()``) whose outputs are the levels.
        spatial_dims: 2 or 3 (1 works too).
        in_channels: input channels the network expects.
        probe_size: input size of the probe pass that measures strides (default 64 per axis).
        builder: a zero-argument callable that builds a fresh dense copy of ``network`` (for export).
        meta: description of how the network was made (stored with exported weights).
    """

    def __init__(
        self,
        network: nn.Module,
        taps: Sequence[str],
        spatial_dims: int,
        in_channels: int,
        probe_size: int | Sequence[int] | None = None,
        builder: Callable[[], nn.Module] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not taps:
            raise ValueError("HierarchicalEncoder needs at least one tap")
        modules = dict(network.named_modules())
        missing = [t for t in taps if t not in modules]
        if missing:
            names = ", ".join(n for n in modules if n and n.count(".") < 2)
            raise ValueError(f"taps {missing} are not submodules of {type(network).__name__}; some names: {names}")
        self.network = network
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.meta = dict(meta or {})
        self._builder = builder
        self._capture: dict[str, torch.Tensor] | None = None
        self._stop_tap: str | None = None
        self._called: list[str] | None = None  # module names in call order, during the probe pass only
        self._tap_marks: dict[str, int] = {}
        for name in taps:
            modules[name].register_forward_hook(_TapHook(self, name))
        probe = probe_size if probe_size is not None else 64
        probe = (probe,) * self.spatial_dims if isinstance(probe, int) else tuple(probe)
        self.op_trace = OpTrace()  # what the probe pass ran outside covered layers (sparse.trace)
        self.taps, self.channels, self.strides, self.participating, self.module_levels = self._probe(list(taps), probe)

    def _on_tap(self, name: str, output: Any) -> None:
        if self._capture is None:
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"tap '{name}' returned {type(output).__name__}, expected a tensor")
        self._capture[name] = output
        if self._called is not None:
            self._tap_marks[name] = len(self._called)
        if name == self._stop_tap:
            raise _StopEncoding

    def _run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._capture = captured = {}
        try:
            self.network(x)
        except _StopEncoding:
            pass
        finally:
            self._capture = None
        return captured

    @torch.no_grad()
    def _probe(self, taps: list[str], probe: tuple[int, ...]):
        self._called = called = []
        handles = [
            m.register_forward_pre_hook(lambda mod, inp, name=name: called.append(name))
            for name, m in self.network.named_modules()
        ]
        was_training = {m: m.training for m in self.network.modules()}
        self.network.eval()
        try:
            device = next(self.network.parameters(), torch.empty(0)).device
            x = torch.zeros(1, self.in_channels, *probe, device=device)
            recorder = trace_ops(self.network, self.spatial_dims)
            with recorder:
                feats = self._run(recorder.input(x))
            self.op_trace = recorder.trace
        finally:
            self._called = None
            for h in handles:
                h.remove()
            for m, flag in was_training.items():
                m.training = flag
        absent = [t for t in taps if t not in feats]
        if absent:
            raise ValueError(f"taps {absent} were never called by {type(self.network).__name__}.forward")
        order = sorted(taps, key=lambda t: list(feats).index(t))
        self._stop_tap = order[-1]
        strides = {}
        for t in taps:
            size = feats[t].shape[2:]
            if len(size) != self.spatial_dims or any(p % s for p, s in zip(probe, size)):
                raise ValueError(
                    f"tap '{t}' gives a feature map of size {tuple(size)} for a probe input of {probe}; "
                    "expected a whole-number downsampling of every axis (try another probe_size)"
                )
            strides[t] = tuple(p // s for p, s in zip(probe, size))
        taps = sorted(taps, key=lambda t: (math.prod(strides[t]), order.index(t)))
        channels = [int(feats[t].shape[1]) for t in taps]
        stop = self._tap_marks[self._stop_tap]
        participating = set(called[:stop])  # what runs until the last tap
        marks = [self._tap_marks[t] for t in taps]  # call counts at which each level's output was ready
        levels: dict[str, int] = {}
        for position, name in enumerate(called[:stop]):  # a module's level: the first level whose output follows it
            levels.setdefault(name, next(k for k, mark in enumerate(marks) if position < mark))
        return taps, channels, [strides[t] for t in taps], participating, levels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        captured = self._run(x)
        return [captured[t] for t in self.taps]

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the modules that took part in encoding, in dense-network key names
        (under every name a module is registered by: nnU-Net's blocks register each layer twice)."""
        modules = dict(self.network.named_modules(remove_duplicate=False))
        taking_part = {id(m) for name, m in self.network.named_modules() if name in self.participating}
        out = {}
        for key, value in self.network.state_dict().items():
            owner = key.rsplit(".", 1)[0] if "." in key else ""
            if id(modules.get(owner)) in taking_part:
                out[key] = value
        return out

    def level_of(self, key: str) -> int | None:
        """Encoder level (0 = finest) of a parameter or buffer key of the dense network; None outside the encoder."""
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        return self.module_levels.get(owner)

    def build_dense(self) -> nn.Module:
        """A freshly built dense network of the same architecture (random weights)."""
        if self._builder is None:
            raise RuntimeError("this encoder was made from an instance; no builder is known")
        return self._builder()


# --------------------------------------------------------------------------------------------
# constructors over the backbone table
# --------------------------------------------------------------------------------------------


def from_spec(spec: BackboneSpec, probe_size: int | Sequence[int] | None = None) -> HierarchicalEncoder:
    """Encoder over the network a description names, tapped as its backbone-table entry says."""
    builder = functools.partial(build_network, spec)  # picklable: a fresh dense copy, for export
    network = builder()
    meta = {"source": spec.source, "name": spec.name, "spatial_dims": spec.spatial_dims,
            "in_channels": spec.in_channels, "kwargs": dict(spec.kwargs)}
    return HierarchicalEncoder(network, spec.entry.taps(network), spec.spatial_dims, spec.in_channels,
                               probe_size=probe_size, builder=builder, meta=meta)


def from_timm(
    name: str,
    strides: Sequence[int] = (4, 8, 16, 32),
    in_chans: int = 3,
    probe_size: int | Sequence[int] = 64,
    **kwargs: Any,
) -> HierarchicalEncoder:
    """Encoder over a timm convnet (random init; no download), tapped at the given total strides."""
    spec = BackboneSpec(name, "timm", 2, in_chans, dict(kwargs))
    builder = functools.partial(build_network, spec)
    network = builder()
    meta = {"source": "timm", "name": name, "spatial_dims": 2, "in_channels": in_chans, "kwargs": dict(kwargs)}
    return HierarchicalEncoder(network, timm_taps(network, strides), 2, in_chans, probe_size=probe_size,
                               builder=builder, meta=meta)


def from_monai(
    name_or_network: str | nn.Module,
    spatial_dims: int = 3,
    in_channels: int = 1,
    probe_size: int | Sequence[int] = 64,
    **kwargs: Any,
) -> HierarchicalEncoder:
    """Encoder over a MONAI network, by name (``resnet18``, ``segresnet``, ``dynunet``, ``mednext``, …) or instance."""
    if isinstance(name_or_network, str):
        lookup("monai", name_or_network.lower())  # a clear error for unknown names
        spec = BackboneSpec(name_or_network.lower(), "monai", spatial_dims, in_channels, dict(kwargs))
        return from_spec(spec, probe_size)
    return _from_instance(name_or_network, "monai-instance", spatial_dims, in_channels, probe_size)


def from_nnunet(
    name_or_network: str | nn.Module = "resenc_l",
    spatial_dims: int = 3,
    in_channels: int = 1,
    probe_size: int | Sequence[int] | None = None,
    plans: str | None = None,
    configuration: str = "3d_fullres",
    **kwargs: Any,
) -> HierarchicalEncoder:
    """Encoder over nnU-Net's ``ResidualEncoderUNet`` (``resenc_m``, ``resenc_l``, ``resenc_xl``) or
    ``PlainConvUNet`` (``plainconv``), by name or instance, tapped at ``encoder.stages.0 … N``.

    ``plans`` (an ``nnUNet*Plans.json``) and ``configuration`` build instead exactly the network nnU-Net's
    ``get_network_from_plans`` builds for that plan (backbone ``plan``; ``spatial_dims`` follows the plan). ``kwargs`` override a preset
    (``features_per_stage``, ``strides``, ``kernel_sizes``, ``patch_size`` + ``spacing``, …; see
    :func:`spark3d.backbones.nnunet_kwargs`). Needs ``pip install 'spark3d[nnunet]'``.
    """
    if plans is not None:
        if kwargs:
            raise ValueError(f"from_nnunet(plans=...): the plan decides the network; {sorted(kwargs)} do not apply")
        spatial_dims = len(plan_configuration(read_plans(plans), configuration, str(plans))["patch_size"])
        spec = BackboneSpec("plan", "nnunet", spatial_dims, in_channels,
                            {"plans": str(plans), "configuration": configuration})
        return from_spec(spec, probe_size if probe_size is not None else plan_probe_size(plans, configuration))
    probe_size = 64 if probe_size is None else probe_size
    if isinstance(name_or_network, str):
        lookup("nnunet", name_or_network.lower())
        spec = BackboneSpec(name_or_network.lower(), "nnunet", spatial_dims, in_channels, dict(kwargs))
        return from_spec(spec, probe_size)
    return _from_instance(name_or_network, "nnunet-instance", spatial_dims, in_channels, probe_size)


def _from_instance(network: nn.Module, source: str, spatial_dims: int, in_channels: int,
                   probe_size: int | Sequence[int] | None) -> HierarchicalEncoder:
    entry = next((b for b in registered() if b.recognises is not None and b.recognises(network)), None)
    if entry is None:
        raise ValueError(
            f"no default taps for {type(network).__name__}; wrap it with HierarchicalEncoder(net, taps=[...]) "
            "naming the submodules whose outputs are the encoder levels"
        )
    builder = functools.partial(copy.deepcopy, copy.deepcopy(network))  # same architecture, fresh object
    meta = {"source": source, "name": type(network).__name__, "spatial_dims": spatial_dims, "in_channels": in_channels}
    return HierarchicalEncoder(network, entry.taps(network), spatial_dims, in_channels, probe_size=probe_size,
                               builder=builder, meta=meta)


def make_encoder(
    source: str, name: str, spatial_dims: int = 3, in_channels: int = 1, **kwargs: Any
) -> HierarchicalEncoder:
    """An encoder from a description (``source``: a backbone-table source such as ``"monai"`` or ``"timm"``)."""
    probe_size = kwargs.pop("probe_size", None)
    return from_spec(BackboneSpec(name, source, spatial_dims, in_channels, kwargs), probe_size)

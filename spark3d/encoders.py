"""Hierarchical encoders: any network plus the names of the submodules whose outputs are its levels.

:class:`HierarchicalEncoder` runs the wrapped network's own ``forward``, captures the outputs of the
tapped submodules with forward hooks and stops right after the last one (a U-Net's decoder never
runs). A probe pass at construction measures each level's channels and per-axis stride and records
which modules take part in encoding (those are converted, checked and exported).
:func:`from_timm` and :func:`from_monai` build encoders from the networks users already have.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["HierarchicalEncoder", "from_timm", "from_monai", "make_encoder", "MONAI_ENCODERS"]


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
        self.taps, self.channels, self.strides, self.participating = self._probe(list(taps), probe)

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
            feats = self._run(x)
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
        participating = set(called[: self._tap_marks[self._stop_tap]])  # what runs until the last tap
        return taps, channels, [strides[t] for t in taps], participating

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        captured = self._run(x)
        return [captured[t] for t in self.taps]

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the modules that took part in encoding, in dense-network key names."""
        out = {}
        for key, value in self.network.state_dict().items():
            owner = key.rsplit(".", 1)[0] if "." in key else ""
            if owner in self.participating:
                out[key] = value
        return out

    def build_dense(self) -> nn.Module:
        """A freshly built dense network of the same architecture (random weights)."""
        if self._builder is None:
            raise RuntimeError("this encoder was made from an instance; no builder is known")
        return self._builder()


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------


def from_timm(
    name: str,
    strides: Sequence[int] = (4, 8, 16, 32),
    in_chans: int = 3,
    probe_size: int | Sequence[int] = 64,
    **kwargs: Any,
) -> HierarchicalEncoder:
    """Encoder over a timm convnet (random init; no download), tapped at the given total strides."""
    import timm

    kwargs.setdefault("pretrained", False)

    build = functools.partial(timm.create_model, name, in_chans=in_chans, **kwargs)  # picklable
    network = build()
    if not hasattr(network, "forward_intermediates") or not hasattr(network, "feature_info"):
        raise ValueError(f"timm model '{name}' has no forward_intermediates/feature_info; it is not a supported convnet")
    info = network.feature_info
    info = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    by_reduction = {}
    for level in info:
        by_reduction[int(level["reduction"])] = level["module"]  # the last module at each reduction wins
    missing = [s for s in strides if s not in by_reduction]
    if missing:
        raise ValueError(f"timm model '{name}' has no feature level at stride {missing}; it has {sorted(by_reduction)}")
    taps = [by_reduction[s] for s in strides]
    meta = {"source": "timm", "name": name, "spatial_dims": 2, "in_channels": in_chans, "kwargs": dict(kwargs)}
    return HierarchicalEncoder(network, taps, 2, in_chans, probe_size=probe_size, builder=build, meta=meta)


# --------------------------------------------------------------------------------------------
# MONAI
# --------------------------------------------------------------------------------------------


def _monai_resnet(depth: int):
    """MONAI's ``ResNetFeatures`` (conv1 stride 2, MedicalNet shortcuts): the very encoder of a
    ``FlexibleUNet(backbone="resnetN")``, so pretrained weights load into it key for key."""

    def make(spatial_dims: int, in_channels: int, **kw):
        from monai.networks.nets.resnet import ResNetFeatures

        kw.setdefault("pretrained", False)  # never download
        return ResNetFeatures(f"resnet{depth}", spatial_dims=spatial_dims, in_channels=in_channels, **kw)

    return make


def _monai_segresnet(spatial_dims: int, in_channels: int, **kw):
    from monai.networks.nets import SegResNet

    kw.setdefault("out_channels", 2)
    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, **kw)


def _monai_dynunet(spatial_dims: int, in_channels: int, **kw):
    from monai.networks.nets import DynUNet

    strides = kw.pop("strides", [1, 2, 2, 2, 2])
    kernel_size = kw.pop("kernel_size", [3] * len(strides))
    upsample = kw.pop("upsample_kernel_size", strides[1:])
    kw.setdefault("out_channels", 2)
    return DynUNet(spatial_dims, in_channels, kernel_size=kernel_size, strides=strides, upsample_kernel_size=upsample, **kw)


def _monai_mednext(spatial_dims: int, in_channels: int, **kw):
    from monai.networks.nets import MedNeXt

    kw.setdefault("out_channels", 2)
    return MedNeXt(spatial_dims=spatial_dims, in_channels=in_channels, **kw)


def _taps_for(network: nn.Module) -> list[str]:
    """Level names of the MONAI networks we know, from the instance's own structure."""
    from monai.networks.nets import DynUNet, MedNeXt, ResNet, SegResNet

    if isinstance(network, ResNet):
        return ["layer1", "layer2", "layer3", "layer4"]
    if isinstance(network, SegResNet):
        return [f"down_layers.{i}" for i in range(len(network.down_layers))]
    if isinstance(network, DynUNet):
        return ["input_block"] + [f"downsamples.{i}" for i in range(len(network.downsamples))] + ["bottleneck"]
    if isinstance(network, MedNeXt):
        return [f"enc_stages.{i}" for i in range(len(network.enc_stages))] + ["bottleneck"]
    raise ValueError(
        f"no default taps for {type(network).__name__}; wrap it with HierarchicalEncoder(net, taps=[...]) "
        "naming the submodules whose outputs are the encoder levels"
    )


MONAI_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "resnet10": _monai_resnet(10),
    "resnet18": _monai_resnet(18),
    "resnet34": _monai_resnet(34),
    "resnet50": _monai_resnet(50),
    "segresnet": _monai_segresnet,
    "dynunet": _monai_dynunet,
    "mednext": _monai_mednext,
}


def _build_monai(key: str, spatial_dims: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    return MONAI_ENCODERS[key](spatial_dims, in_channels, **copy.deepcopy(kwargs))


def from_monai(
    name_or_network: str | nn.Module,
    spatial_dims: int = 3,
    in_channels: int = 1,
    probe_size: int | Sequence[int] = 64,
    **kwargs: Any,
) -> HierarchicalEncoder:
    """Encoder over a MONAI network, by name (``resnet18``, ``segresnet``, ``dynunet``, ``mednext``, …) or instance."""
    if isinstance(name_or_network, nn.Module):
        network = name_or_network
        builder = functools.partial(copy.deepcopy, copy.deepcopy(network))  # same architecture, fresh object
        meta = {"source": "monai-instance", "name": type(network).__name__, "spatial_dims": spatial_dims,
                "in_channels": in_channels}
    else:
        key = str(name_or_network).lower()
        if key not in MONAI_ENCODERS:
            raise ValueError(f"unknown MONAI encoder '{name_or_network}'; known: {', '.join(MONAI_ENCODERS)}")
        builder = functools.partial(_build_monai, key, spatial_dims, in_channels, copy.deepcopy(kwargs))
        network = builder()
        meta = {"source": "monai", "name": key, "spatial_dims": spatial_dims, "in_channels": in_channels,
                "kwargs": dict(kwargs)}
    return HierarchicalEncoder(network, _taps_for(network), spatial_dims, in_channels, probe_size=probe_size,
                               builder=builder, meta=meta)


def make_encoder(
    source: str, name: str, spatial_dims: int = 3, in_channels: int = 1, **kwargs: Any
) -> HierarchicalEncoder:
    """An encoder from a description: ``source`` is ``"monai"`` or ``"timm"`` (2D only)."""
    if source == "monai":
        return from_monai(name, spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
    if source == "timm":
        if spatial_dims != 2:
            raise ValueError(f"timm networks are 2D; got spatial_dims={spatial_dims} for '{name}'")
        return from_timm(name, in_chans=in_channels, **kwargs)
    raise ValueError(f"unknown backbone source '{source}'; expected 'monai' or 'timm'")

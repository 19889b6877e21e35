"""The backbone table: one :class:`Backbone` entry per network family, and the description of one network.

Every consumer (pretraining, fine-tuning, ``check-backbone``, ``benchmark``, the tests) reads this
table; adding a backbone is one :func:`register` call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

__all__ = ["Backbone", "BackboneSpec", "Example", "register", "unregister", "lookup", "find", "registered", "examples",
           "build_network", "build_segmentation_network", "segmentation_network_definition", "encoder_module_of",
           "encoder_children"]


@dataclass(frozen=True)
class Example:
    """A small configuration of a backbone, for the tests and ``check-backbone`` defaults."""

    id: str
    name: str
    spatial_dims: int
    in_channels: int
    input_size: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Backbone:
    """How one family of networks is built, tapped, and fine-tuned.

    Attributes:
        family: the family's name (``"segresnet"``, ``"monai-resnet"``, ``"timm"``, …).
        source: where the networks come from (``"monai"``, ``"timm"``, …); part of a network's description.
        names: the network names the family builds; ``None`` for a family that builds any name (timm).
        spatial_dims: dimensionalities the family supports.
        build: ``(name, spatial_dims, in_channels, **kwargs) -> nn.Module``, the dense network that is pretrained.
        taps: ``network -> [submodule names]``, the encoder levels, finest first.
        segmentation: ``(name, spatial_dims, in_channels, out_channels, **kwargs) -> nn.Module``, the
            fine-tuning network that holds the pretrained encoder unmodified.
        seg_encoder_prefix: key prefix of the pretrained encoder inside the segmentation network
            (``"encoder."`` for a FlexibleUNet; ``""`` when the pretrained network *is* the segmentation network).
        seg_encoder_modules: top-level children of the segmentation network that make up the encoder, when
            the prefix is ``""`` (frozen during a frozen-encoder warm-up; layer decay applies to them).
        recognises: ``network -> bool``, for wrapping an existing instance (``from_monai(net)``).
        trusted: block classes of the family known to compose covered layers position-wise (the sparse
            converter's override for custom blocks it cannot judge).
        examples: small configurations the tests parameterise over.
        methods: the pretraining methods (names in the method table) its networks work with.
        bundle_network: ``(name, spatial_dims, in_channels, out_channels, **kwargs) -> dict``, the fine-tuning
            network as a MONAI config definition (``_target_`` + arguments) that builds without spark3d (what a
            MONAI bundle's ``network_def`` holds); ``None`` when the network needs spark3d code to build.
    """

    family: str
    source: str
    names: tuple[str, ...] | None
    spatial_dims: tuple[int, ...]
    build: Callable[..., nn.Module]
    taps: Callable[[nn.Module], list[str]]
    segmentation: Callable[..., nn.Module]
    seg_encoder_prefix: str = ""
    seg_encoder_modules: tuple[str, ...] = ()
    recognises: Callable[[nn.Module], bool] | None = None
    trusted: tuple[type, ...] = ()
    examples: tuple[Example, ...] = ()
    methods: tuple[str, ...] = ("spark",)
    bundle_network: Callable[..., dict[str, Any]] | None = None

    def builds(self, name: str) -> bool:
        return self.names is None or name.lower() in self.names


@dataclass(frozen=True)
class BackboneSpec:
    """The description of one network: what ``encoder.pt`` records and every config names."""

    name: str
    source: str = "monai"
    spatial_dims: int = 3
    in_channels: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def entry(self) -> Backbone:
        return lookup(self.source, self.name)

    def describe(self) -> str:
        """``segresnet (monai, 3D, 1 channel, init_filters=32)``: for messages."""
        extra = "".join(f", {k}={v}" for k, v in sorted(self.kwargs.items()))
        return f"{self.name} ({self.source}, {self.spatial_dims}D, {self.in_channels} channel(s){extra})"


_TABLE: list[Backbone] = []


def register(backbone: Backbone) -> Backbone:
    """Add (or replace, by family and source) an entry of the table."""
    _TABLE[:] = [b for b in _TABLE if (b.family, b.source) != (backbone.family, backbone.source)]
    _TABLE.append(backbone)
    return backbone


def unregister(family: str, source: str) -> None:
    """Remove an entry (for tests and plug-ins that registered one temporarily)."""
    _TABLE[:] = [b for b in _TABLE if (b.family, b.source) != (family, source)]


def registered() -> list[Backbone]:
    """Every entry, in registration order."""
    return list(_TABLE)


def examples(method: str | None = "spark") -> list[tuple[Example, "BackboneSpec"]]:
    """The example configurations, with their descriptions, of every entry that works with ``method``
    (``None``: of every entry): what the tests parameterise over."""
    return [(ex, BackboneSpec(ex.name, b.source, ex.spatial_dims, ex.in_channels, dict(ex.kwargs)))
            for b in _TABLE if method is None or method in b.methods for ex in b.examples]


def lookup(source: str, name: str) -> Backbone:
    """The entry of ``source`` that builds ``name``; a clear error listing what exists otherwise."""
    entries = [b for b in _TABLE if b.source == source]
    if not entries:
        sources = sorted({b.source for b in _TABLE})
        raise ValueError(f"unknown backbone source '{source}'; known sources: {', '.join(sources)}")
    for b in sorted(entries, key=lambda b: b.names is None):  # exact names before catch-all families
        if b.builds(name):
            return b
    known = sorted(n for b in entries for n in (b.names or ()))
    raise ValueError(f"unknown {source} backbone '{name}'; known: {', '.join(known)}")


def find(name: str, source: str | None = None) -> BackboneSpec:
    """A description from a bare name: ``source/name`` forces the source, otherwise named entries win."""
    if source is None and "/" in name:
        source, name = name.split("/", 1)
    if source is not None:
        lookup(source, name)
        return BackboneSpec(name, source)
    for b in sorted(_TABLE, key=lambda b: b.names is None):
        if b.builds(name):
            return BackboneSpec(name, b.source)
    raise ValueError(f"no backbone family builds '{name}'")


def build_network(spec: BackboneSpec) -> nn.Module:
    """The dense network a description names (random init; nothing is downloaded)."""
    entry = spec.entry
    if spec.spatial_dims not in entry.spatial_dims:
        raise ValueError(f"{spec.source} backbone '{spec.name}' supports spatial_dims {entry.spatial_dims}, "
                         f"got {spec.spatial_dims}")
    return entry.build(spec.name, spec.spatial_dims, spec.in_channels, **copy.deepcopy(spec.kwargs))


def build_segmentation_network(spec: BackboneSpec, out_channels: int) -> nn.Module:
    """The fine-tuning network of a description, with ``out_channels`` classes."""
    entry = spec.entry
    if spec.spatial_dims not in entry.spatial_dims:
        raise ValueError(f"{spec.source} backbone '{spec.name}' supports spatial_dims {entry.spatial_dims}, "
                         f"got {spec.spatial_dims}")
    kwargs = copy.deepcopy(spec.kwargs)
    kwargs.pop("out_channels", None)  # a pretraining head size; the segmentation network has its own
    return entry.segmentation(spec.name, spec.spatial_dims, spec.in_channels, out_channels, **kwargs)


def segmentation_network_definition(spec: BackboneSpec, out_channels: int) -> dict[str, Any] | None:
    """The fine-tuning network of a description as a MONAI config definition (None: it needs spark3d to build)."""
    entry = spec.entry
    if entry.bundle_network is None:
        return None
    kwargs = copy.deepcopy(spec.kwargs)
    kwargs.pop("out_channels", None)
    return entry.bundle_network(spec.name, spec.spatial_dims, spec.in_channels, out_channels, **kwargs)


def encoder_module_of(network: nn.Module, spec: BackboneSpec) -> tuple[nn.Module, str]:
    """The submodule of a segmentation network holding the pretrained encoder's keys, and its key prefix."""
    prefix = spec.entry.seg_encoder_prefix
    return (network.get_submodule(prefix.rstrip(".")) if prefix else network), prefix


def encoder_children(network: nn.Module, spec: BackboneSpec) -> nn.Module:
    """The encoder part of a segmentation network as one module (for freezing)."""
    entry = spec.entry
    module, prefix = encoder_module_of(network, spec)
    if prefix or not entry.seg_encoder_modules:
        return module
    return nn.ModuleList([m for n, m in network.named_children() if n in entry.seg_encoder_modules])

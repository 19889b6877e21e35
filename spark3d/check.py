"""Safety checks of sparse masking for a backbone: no leak from masked cells, dense equivalence."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .backbones import BackboneSpec, find
from .encoders import HierarchicalEncoder, from_spec
from .masking import upsample_mask
from .methods import SparK
from .sparse import UnsafeLayerError, refusal_lines
from .sparse.verify import plan_lines

__all__ = ["CheckResult", "relative_difference", "leak_difference", "dense_difference", "check_backbone", "build_encoder",
           "refusal_report"]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in the Frobenius norm (0 when both are zero)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def leak_difference(model: SparK, x: torch.Tensor, mask: torch.Tensor, noise_scale: float = 100.0, seed: int = 0) -> float:
    """How much the output changes when masked cells are replaced by large noise (should be ~0).

    Two views: ``out.pred`` of the full model, and the sparse encoder's features when it is fed the
    raw (not pre-masked) input, so the converted layers themselves must keep masked content out.
    """
    gen = torch.Generator().manual_seed(seed)
    visible = upsample_mask(mask, x.shape[2:])
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype) * noise_scale
    x_noisy = torch.where(visible, x, noise.to(x.device))
    state = copy.deepcopy(model.state_dict())  # train-mode BN updates running stats; compare from one state
    results = []
    with torch.no_grad():
        for inputs in (x, x_noisy):
            pred = model(inputs, mask=mask).pred
            model.load_state_dict(state)
            with model.ctx.use(mask):
                feats = model.encoder(inputs)
            model.load_state_dict(state)
            results.append([pred, *feats])
    return max(relative_difference(b, a) for a, b in zip(*results))


def dense_difference(model: SparK, dense: HierarchicalEncoder, x: torch.Tensor) -> float:
    """Largest relative difference between ``model.encode`` with all cells visible and the dense encoder."""
    with torch.no_grad():
        sparse_feats = model.encode(x, model.full_mask(x.shape[0]))
        dense_feats = dense(x)
    return max(relative_difference(s, d) for s, d in zip(sparse_feats, dense_feats))


@dataclass
class CheckResult:
    name: str
    channels: list[int]
    strides: list[tuple[int, ...]]
    leak: dict[str, float]
    dense: dict[str, float]
    exact: Sequence[str] = ()  # global poolings made exact under a mask, one line per block kind
    compute: str = ""  # the sparse-compute decision ("sparse (…)" or "masked-dense: <layer> <reason>")
    plan: Sequence[str] = ()  # the packed flow's plan: counts, then per converted layer its strategy
    leak_tol: float = 1e-5
    dense_tol: float = 1e-4

    @property
    def ok(self) -> bool:
        return all(v < self.leak_tol for v in self.leak.values()) and all(v < self.dense_tol for v in self.dense.values())

    def report(self) -> str:
        def verdict(values: dict[str, float], tol: float) -> str:
            worst = max(values.values())
            detail = ", ".join(f"{mode} {v:.1e}" for mode, v in values.items())
            return f"{'PASS' if worst < tol else 'FAIL'} ({detail}; tolerance {tol:.0e})"

        lines = [
            f"backbone        {self.name}",
            f"channels        {self.channels}",
            f"strides         {[tuple(s) for s in self.strides]}",
            f"no leak         {verdict(self.leak, self.leak_tol)}",
            f"dense-equal     {verdict(self.dense, self.dense_tol)}",
            *(f"exact pooling   {line}" for line in self.exact),
            *([f"compute path    {self.compute}"] if self.compute else []),
            *([f"plan            {self.plan[0]}"] + [f"  {line}" for line in self.plan[1:]] if self.plan else []),
            f"verdict         {'safe for sparse masking' if self.ok else 'NOT safe for sparse masking'}",
        ]
        return "\n".join(lines)


def refusal_report(name: str, err: UnsafeLayerError) -> str:
    """What ``check-backbone`` prints for a network the converter refuses: per refused op, where, what and why."""
    lines = [f"backbone        {name}",
             f"verdict         NOT safe for sparse masking: {len(err.refusals)} operation(s) mix positions",
             "refused         module path (block class): op — why"]
    return "\n".join(lines + [f"  {line}" for line in refusal_lines(err.refusals, max_paths=10**6)])


def build_encoder(name: str, spatial_dims: int | None = None, in_channels: int | None = None,
                  backbone_kwargs: dict[str, Any] | None = None,
                  probe_size: int | Sequence[int] | None = None) -> HierarchicalEncoder:
    """An encoder from a backbone-table name (``resnet18``, ``segresnet``, ``resenc_l``, …; ``source/name`` forces
    the source), any other name being a timm model; 2D with 3 channels for 2D-only families, else 3D with 1 channel."""
    spec = find(name)
    dims = spec.entry.spatial_dims
    sd = spatial_dims or (3 if 3 in dims else dims[0])
    return from_spec(BackboneSpec(spec.name, spec.source, sd, in_channels or (1 if 3 in dims else 3),
                                  dict(backbone_kwargs or {})), probe_size)


def check_backbone(
    name: str,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
    size: Sequence[int] | int | None = None,
    mask_ratio: float = 0.6,
    batch_size: int = 2,
    seed: int = 0,
    backbone_kwargs: dict[str, Any] | None = None,
) -> CheckResult:
    """Run the no-leak and dense-equivalence checks on random data, in train and eval mode.

    Raises :class:`~spark3d.sparse.UnsafeLayerError` (with ``refusals``) when the converter refuses the network.
    """
    torch.manual_seed(seed)
    encoder = build_encoder(name, spatial_dims, in_channels, backbone_kwargs)
    sd = encoder.spatial_dims
    total = encoder.strides[-1]
    if size is None:
        size = tuple(max(2 * t, 64 if sd == 2 else 32) for t in total)
    size = (size,) * sd if isinstance(size, int) else tuple(size)
    dense = copy.deepcopy(encoder)
    model = SparK(encoder, size, mask_ratio=mask_ratio, decoder_width=64)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, encoder.in_channels, *size, generator=gen)
    mask = model.random_mask(batch_size, generator=gen)
    leak, dense_diff = {}, {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        dense.train(mode == "train")
        leak[mode] = leak_difference(model, x, mask)
        dense_diff[mode] = dense_difference(model, dense, x)
    exact = refusal_lines(encoder.op_trace.select("exact", encoder.participating))
    sparse = model.sparse_check(mask)
    return CheckResult(name, list(encoder.channels), list(encoder.strides), leak, dense_diff, exact,
                       compute=sparse.reason(), plan=plan_lines(sparse.plan))

"""Is the packed flow of a network exactly masked-dense? A check that weights cannot fool, and the plan it ran.

Covered layers are exact by construction; what a network's own ``forward`` does to packed maps outside
them (a reshape that assumes the batch, a random draw, an op the judge cannot see) is not. The check
runs on a *perturbed copy*: every parameter drawn afresh (norm, layer and branch scales in
[0.5, 1.5], biases and running means small, running variances in [0.5, 1.5]), so a zero-initialised
residual branch or a 1e-6 layer scale cannot hide a difference, and the verdict does not depend on
the weights at all (only on the structure). It compares, in float64 so that only a structural
difference shows, features in train mode (same torch seed for both paths: stochastic depth) and eval
mode, and the gradients of a random projection of the features (input and every parameter) in train
mode, which runs the packed convs' own backward. The check also records the plan: per converted layer
the strategy the packed flow ran (the strategies depend on layer geometry only, so they are training's).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .context import MaskContext
from .packed import packed_flow
from .sync import SYNC_FLAG

__all__ = ["EXACT_TOL", "PlanEntry", "CheckReport", "perturbed_copy", "exactness_check", "packed_flow_difference", "plan_lines",
           "plan_of"]


EXACT_TOL = 1e-6  # largest relative difference (float64) of the packed flow against masked-dense: structural


@dataclass(frozen=True)
class PlanEntry:
    """One converted layer of the packed flow: where, what, the strategy it ran and (for ``dense``) why."""

    path: str
    layer_type: str
    strategy: str
    detail: str = ""


@dataclass
class CheckReport:
    """What the exactness check found: worst relative differences (float64), the plan, or why it failed."""

    features: float = math.inf
    gradients: float = math.inf
    plan: list[PlanEntry] = field(default_factory=list)
    error: str | None = None

    def dense_layers(self) -> list[PlanEntry]:
        return [e for e in self.plan if e.strategy == "dense"]

    def exact(self, tol: float = EXACT_TOL) -> bool:
        return self.error is None and self.features < tol and self.gradients < tol

    def reason(self, tol: float = EXACT_TOL) -> str:
        """One line: ``sparse (…)`` or ``masked-dense: <layer path> <reason>``."""
        if self.error is not None:
            return f"masked-dense: {self.error}"
        dense = self.dense_layers()
        if dense:
            more = f" (and {len(dense) - 1} more layer(s))" if len(dense) > 1 else ""
            return f"masked-dense: {dense[0].path} ({dense[0].layer_type}) would run dense: {dense[0].detail}{more}"
        if not self.exact(tol):
            return (f"masked-dense: the packed flow is not exact for this encoder (relative difference from masked-dense "
                    f"{max(self.features, self.gradients):.1e} in float64 on perturbed weights: features "
                    f"{self.features:.1e}, gradients {self.gradients:.1e})")
        return (f"sparse (packed flow = masked-dense in float64 on perturbed weights, train and eval: features "
                f"{self.features:.0e}, gradients {self.gradients:.0e})")


def plan_of(layout, network: nn.Module) -> list[PlanEntry]:
    """The plan a layout recorded (``layout.plan``), with module paths of ``network``, in module order."""
    recorded = layout.plan or {}
    out = []
    for path, module in network.named_modules():
        if id(module) in recorded:
            _, strategy, detail = recorded[id(module)]
            out.append(PlanEntry(path, type(module).__name__, strategy, detail))
    return out


def plan_lines(plan: Sequence[PlanEntry]) -> list[str]:
    """Counts per strategy, then one line per layer: ``path (Type): strategy [— why]``."""
    counts: dict[str, int] = {}
    for e in plan:
        counts[e.strategy] = counts.get(e.strategy, 0) + 1
    head = ", ".join(f"{s} {counts.get(s, 0)}" for s in ("direct", "sites", "blocks", "dense"))
    return [f"{len(plan)} converted layers: {head}"] + [
        f"{e.path} ({e.layer_type}): {e.strategy}" + (f" — {e.detail}" if e.detail and e.strategy == "dense" else "")
        for e in plan]


def perturbed_copy(module: nn.Module, ctx: MaskContext, seed: int = 0, dtype: torch.dtype = torch.float64):
    """``(copy, its context)``: a deep copy of ``module`` (converted layers reading a fresh context) with every
    floating tensor redrawn away from zero (see module docs), in ``dtype``, cross-process BatchNorm sync off."""
    fresh = MaskContext()
    twin = copy.deepcopy(module, {id(ctx): fresh})
    gen = torch.Generator().manual_seed(seed)

    def draw(shape, kind):
        if kind == "weight":
            fan_in = math.prod(shape[1:])
            return torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
        if kind == "small":
            return 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        return 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)

    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.is_floating_point():
                kind = "weight" if p.ndim >= 2 else "small" if name.endswith("bias") else "scale"
                p.data = draw(tuple(p.shape), kind).to(p.device, dtype)
        for name, b in twin.named_buffers():
            if b.is_floating_point():
                kind = "scale" if name.endswith("running_var") else "small" if name.endswith("running_mean") else None
                b.data = (draw(tuple(b.shape), kind) if kind else b.data.double()).to(b.device, dtype)
    for m in twin.modules():
        m.__dict__.pop(SYNC_FLAG, None)  # the check is one process's business, never a collective
    return twin, fresh


class _FastGroupedFloat64(TorchFunctionMode):
    """While active, float64 grouped convs on a CPU run as one-group convs with block-diagonal weights (the
    same values; torch's CPU float64 depthwise conv is orders of magnitude slower)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS:
            call = {**dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args)), **kwargs}
            x, groups = call["input"], int(call.get("groups", 1))
            if groups > 1 and x.dtype == torch.float64 and not x.is_cuda:
                from .compute import expand_groups  # (compute imports this module)

                call["weight"], call["groups"] = expand_groups(call["weight"], groups), 1
                return func(**call)
        return func(*args, **kwargs)


_CONVS = {F.conv1d, F.conv2d, F.conv3d}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def exactness_check(encoder: Callable[[torch.Tensor], Sequence[torch.Tensor]], network: nn.Module, ctx: MaskContext,
                    x: torch.Tensor, mask_b1g: torch.Tensor, backward: bool = True, seed: int = 0) -> CheckReport:
    """Packed flow against masked-dense on ``x`` under ``mask_b1g``: features in train and eval mode, and (train
    mode) gradients of the input and parameters; buffers, train flags and random state are left as they were."""
    flags = {m: m.training for m in network.modules()}
    buffers = [b.detach().clone() for b in network.buffers()]
    params = [p for p in network.parameters() if p.requires_grad]
    report = CheckReport(features=0.0, gradients=0.0)

    def restore():
        with torch.no_grad():
            for b, saved in zip(network.buffers(), buffers):
                b.copy_(saved)

    def run(packed: bool, grads: bool):
        torch.manual_seed(seed)
        with torch.set_grad_enabled(grads), ctx.use(mask_b1g):
            if packed:
                with packed_flow(ctx) as layout:
                    layout.plan = {} if not report.plan else None
                    inp = layout.pack(x).requires_grad_(grads)
                    feats = [layout.unpack(f) if layout.holds(f) else f for f in encoder(inp)]
                    if layout.plan is not None:
                        report.plan = plan_of(layout, network)
            else:
                inp = (x * ctx.weights_at(x.shape[2:], x.dtype)).requires_grad_(grads)
                feats = list(encoder(inp))
            out = [feats]
            if grads:
                gen = torch.Generator().manual_seed(seed + 1)
                loss = sum((f * torch.randn(f.shape, generator=gen, dtype=f.dtype).to(f.device)).sum() for f in feats)
                got = torch.autograd.grad(loss, [inp, *params], allow_unused=True)
                g_in = layout.unpack(got[0]) if packed else got[0] * ctx.weights_at(x.shape[2:], x.dtype)
                g_par = [torch.zeros_like(p) if g is None else g for p, g in zip(params, got[1:])]
                out.append(torch.cat([g_in.flatten(), *[g.flatten() for g in g_par]]))
        restore()
        return out

    try:
        with torch.autocast(x.device.type, enabled=False), torch.random.fork_rng(
                devices=[x.device] if x.device.type == "cuda" else []), _FastGroupedFloat64():
            for training in (True, False):
                network.train(training)
                grads = backward and training
                reference, packed = run(False, grads), run(True, grads)
                if len(packed[0]) != len(reference[0]) or any(p.shape != r.shape for p, r in zip(packed[0], reference[0])):
                    report.error = "the packed flow's features do not have the masked-dense shapes"
                    return report
                report.features = max([report.features] + [_relative(p, r) for p, r in zip(packed[0], reference[0])])
                if grads:
                    report.gradients = max(report.gradients, _relative(packed[1], reference[1]))
    except (RuntimeError, ValueError, IndexError, TypeError) as err:  # the forward cannot take packed maps
        first = (str(err).splitlines() or [""])[0][:200]
        report.error = f"the encoder's forward cannot take packed cells ({type(err).__name__}: {first})"
    finally:
        for m, flag in flags.items():
            m.training = flag
        restore()
    return report


@torch.no_grad()
def packed_flow_difference(encoder: Callable[[torch.Tensor], Sequence[torch.Tensor]], network: nn.Module,
                           ctx: MaskContext, x: torch.Tensor, mask_b1g: torch.Tensor) -> float:
    """Largest relative difference of the packed flow's features from masked-dense's (train and eval; ``inf``
    when the packed flow fails or a layer runs dense); see :func:`exactness_check` for gradients and the plan."""
    report = exactness_check(encoder, network, ctx, x, mask_b1g, backward=False)
    return math.inf if report.error or report.dense_layers() else report.features

"""SparK: sparse and hierarchical masked modeling for convnets (Tian et al., ICLR 2023), 2D and 3D.

volume/image → mask → sparse encoder → densify → light decoder → norm-pix loss on masked patches.
The whole method reads in :class:`SparK`; the encoder conversion lives in :mod:`spark3d.sparse`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..backbones import BackboneSpec
from ..errors import ConfigError
from ..encoders import HierarchicalEncoder, from_spec
from ..layers import make_norm, norm_kind_of
from ..masking import mask_grid, random_mask
from ..sparse import MaskContext, set_batchnorm_sync, sparsify
from ..sparse.compute import PackedLayout, packed_flow
from ..sparse.verify import EXACT_TOL, CheckReport, PlanEntry, exactness_check, perturbed_copy
from .common import (
    MaskedModelingMethod, MaskedModelOutput, mask_input, masked_patch_loss, norm_pix_target, patchify,
    reconstruct_from_patches,
)
from .decoders import make_decoder

__all__ = ["SparK", "SparKOutput"]

SparKOutput = MaskedModelOutput  # the output type every method shares
COMPUTE_MODES = ("auto", "sparse", "masked-dense")
AUTO_MAX_VISIBLE = 0.5  # "auto" computes sparse when at most this fraction of the cells is visible


class SparK(MaskedModelingMethod):
    """SparK pretraining model around a :class:`HierarchicalEncoder` (converted to sparse in place).

    Args:
        encoder: the encoder; its network is made sparse and owned by this model from now on.
        input_size: spatial input size, divisible by the encoder's total stride per axis.
        mask_ratio: fraction of masked cells (SparK 2D: 0.6; 3D work: 0.75).
        decoder_width: decoder channels at the coarsest scale (default 768 in 2D, 256 in 3D); halves per scale.
        decoder: ``"spark"`` (the faithful light decoder, up to stride 1) or ``"efficient"`` (decodes to stride 4
            and predicts the finer pixels with a pixel-shuffle head; see :mod:`spark3d.methods.decoders`).
        densify_norm: norm applied to each level before filling mask tokens: ``"auto"`` (the encoder's
            own kind), ``"batch"``, ``"instance"``, ``"group"``, ``"layer"`` or ``"none"``.
        decoder_norm: norm inside the decoder blocks.
        fusion: ``"add"`` (SparK) or ``"concat"`` for skip fusion in the decoder.
        norm_pix_loss: normalise each target patch by its own mean and variance.
        trusted: block classes whose operations the converter does not judge (an override; safety is
            otherwise decided from the operations the encoder's probe pass ran).
        compute: how the encoder computes under a mask. ``"masked-dense"``: the full dense network with masked
            inputs and outputs at every layer. ``"sparse"``: only the visible cells flow through the encoder
            (:mod:`spark3d.sparse.compute`; exact, work follows the visible fraction). ``"auto"`` (default):
            sparse when at most half the cells are visible and a one-time check on a small input shows the
            network's forward takes packed cells exactly; masked-dense otherwise.
    """

    def __init__(
        self,
        encoder: HierarchicalEncoder,
        input_size: Sequence[int],
        mask_ratio: float = 0.6,
        decoder_width: int | None = None,
        densify_norm: str = "auto",
        decoder_norm: str = "batch",
        fusion: str = "add",
        norm_pix_loss: bool = True,
        trusted: Sequence[type] = (),
        decoder: str = "spark",
        compute: str = "auto",
    ) -> None:
        super().__init__()
        sd = encoder.spatial_dims
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) != sd:
            raise ValueError(f"input_size {input_size} has {len(input_size)} axes but the encoder is {sd}D")
        self.encoder = encoder
        self.input_size = input_size
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size = tuple(encoder.strides[-1])
        self.mask_grid = mask_grid(input_size, self.patch_size)
        for stride in encoder.strides:
            if any(c % s for c, s in zip(self.patch_size, stride)):
                raise ValueError(f"encoder level stride {stride} does not divide the total stride {self.patch_size}")
        for name, p in encoder.network.named_parameters():
            if name.rpartition(".")[0] not in encoder.participating:
                p.requires_grad_(False)  # heads and U-Net decoders never run while pretraining (DDP needs this)
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got '{compute}'")
        self.compute = compute
        self._verdicts: dict[tuple, CheckReport] = {}  # the exactness check, once per visible count and structure
        self._said: set[str] = set()
        self.compute_decision: str | None = None  # the last compute decision's one line (tests read it)
        self.last_path: str | None = None  # the path the encoder last ran ("sparse" / "masked-dense")
        self.last_layout: PackedLayout | None = None  # the packed layout of the last sparse step
        self.ctx = MaskContext()
        self._trusted = tuple(trusted)
        sparsify(encoder.network, self.ctx, only=encoder.participating, trusted=self._trusted,
                 trace=encoder.op_trace)  # refuse early

        width = decoder_width if decoder_width is not None else (768 if sd <= 2 else 256)
        self.decoder_kind = decoder
        self.decoder = make_decoder(decoder, encoder.strides, encoder.in_channels, width, sd, norm=decoder_norm,
                                    fusion=fusion)
        kind = norm_kind_of(encoder.network, encoder.participating) if densify_norm == "auto" else densify_norm
        self.densify_norm_kind = kind
        self.densify_norms = nn.ModuleList(
            [nn.Identity() if kind == "none" else make_norm(kind, c, sd) for c in encoder.channels]
        )
        self.mask_tokens = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, c, *([1] * sd))) for c in encoder.channels]
        )
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02 * 2, b=0.02 * 2)
        self.densify_projs = self.decoder.projections(encoder.channels)
        self.resparsify()

    @classmethod
    def from_backbone(cls, spec: BackboneSpec, input_size: Sequence[int], mask_ratio: float, **kwargs: Any) -> "SparK":
        """SparK over the encoder of a backbone-table network (what configs describe)."""
        kwargs["trusted"] = (*spec.entry.trusted, *kwargs.get("trusted", ()))
        return cls(from_spec(spec), input_size, mask_ratio=mask_ratio, **kwargs)

    def prepare_for_fit(self) -> None:
        """Before the first step, on every rank alike: repair converted layers, then decide the compute path
        (the float64 exactness check runs here, never under DDP/FSDP hooks mid-training)."""
        self.resparsify()  # if anything swapped layers (e.g. a SyncBatchNorm conversion by hand), make them sparse again
        if self.compute != "masked-dense":
            self.compute_path(self.random_mask(2, generator=torch.Generator().manual_seed(0)))

    def resparsify(self) -> None:
        """Convert encoder, densify norms and decoder (the decoder runs dense but syncs BatchNorm on any
        device); idempotent, so it also repairs layers something replaced (e.g. a SyncBatchNorm swap)."""
        sparsify(self.encoder.network, self.ctx, only=self.encoder.participating, trusted=self._trusted,
                 trace=self.encoder.op_trace)
        sparsify(self.densify_norms, self.ctx)
        sparsify(self.decoder, self.ctx, check=False)  # never runs under a mask: nothing to judge

    def set_batchnorm_sync(self, enabled: bool = True) -> int:
        """Sum BatchNorm statistics (visible sites only) over DDP processes, on CPU or GPU."""
        return set_batchnorm_sync(self, enabled)

    # ---------------------------------------------------------------------------------- masks
    def random_mask(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh mask ``(B, 1, *mask_grid)``, True = visible, same visible count in every sample."""
        device = self.mask_tokens[0].device
        mask = random_mask(batch_size, self.mask_grid, self.mask_ratio, generator=generator, device=device)
        return mask.to(device)

    def full_mask(self, batch_size: int) -> torch.Tensor:
        """A mask with every cell visible."""
        return torch.ones(batch_size, 1, *self.mask_grid, dtype=torch.bool, device=self.mask_tokens[0].device)

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        expected = (self.encoder.in_channels, *self.input_size)
        if x.ndim != 2 + len(self.input_size) or tuple(x.shape[1:]) != expected:
            raise ValueError(f"SparK expects input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if mask is not None and tuple(mask.shape) != (x.shape[0], 1, *self.mask_grid):
            raise ValueError(f"mask must have shape ({x.shape[0]}, 1, {', '.join(map(str, self.mask_grid))}), got {tuple(mask.shape)}")

    # ---------------------------------------------------------------------------------- model
    def compute_path(self, mask: torch.Tensor) -> str:
        """``"sparse"`` or ``"masked-dense"``: how the encoder computes under ``mask`` (from ``compute``).

        ``auto`` says once, in one line, which path it chose and why; ``sparse`` refuses (one line naming the
        layer or the difference) where the packed flow would not be exactly masked-dense.
        """
        if self.compute == "masked-dense":
            return "masked-dense"
        visible = int(mask[0].sum())
        if self.compute == "auto" and visible > AUTO_MAX_VISIBLE * mask[0].numel():
            self._say(f"masked-dense: {visible}/{mask[0].numel()} cells visible (sparse only at most "
                      f"{AUTO_MAX_VISIBLE:.0%} visible)")
            return "masked-dense"
        report = self._verdict(mask)
        reason = report.reason(EXACT_TOL)
        if report.exact(EXACT_TOL) and not report.dense_layers():
            self._say(reason)
            return "sparse"
        if self.compute == "sparse":
            raise ConfigError(f"compute='sparse' refused: {reason.removeprefix('masked-dense: ')}; use compute='auto' "
                              "or 'masked-dense'")
        self._say(reason)
        return "masked-dense"

    def compute_plan(self, mask: torch.Tensor) -> list[PlanEntry]:
        """Per converted encoder layer, the strategy the packed flow runs under a mask like ``mask`` (direct /
        sites / blocks / dense, and why for dense), as the one-time exactness check recorded it."""
        return list(self._verdict(mask).plan)

    def sparse_check(self, mask: torch.Tensor) -> CheckReport:
        """The one-time exactness check (float64, perturbed weights) for masks like ``mask``: differences, plan."""
        return self._verdict(mask)

    def _say(self, line: str) -> None:
        """Print a compute decision once per model (one line)."""
        self.compute_decision = line
        if line not in self._said:
            self._said.add(line)
            print(f"spark3d: compute={self.compute}: {line}", file=sys.stderr)

    def _verdict(self, mask: torch.Tensor) -> CheckReport:
        """The exactness check for masks of this visible count (made once per count and encoder structure)."""
        network = self.encoder.network
        key = (tuple(type(m) for m in network.modules()), int(mask[0].sum()), tuple(mask.shape[2:]))
        if key not in self._verdicts:
            self._verdicts[key] = self._check_sparse_path(int(mask[0].sum()))
        return self._verdicts[key]

    def _check_sparse_path(self, visible: int) -> CheckReport:
        """Packed flow against masked-dense on a perturbed float64 copy of the encoder (weights that cannot hide
        a difference; see :mod:`spark3d.sparse.verify`), at most 3 cells per axis with training's visible
        fraction, train and eval mode, features and gradients; the plan it ran comes with it."""
        grid = tuple(min(g, 3) for g in self.mask_grid)
        total, check_total = math.prod(self.mask_grid), math.prod(grid)
        k = min(check_total, max(1, round(visible * check_total / total)))
        gen = torch.Generator().manual_seed(0)
        device = self.mask_tokens[0].device
        x = torch.randn(2, self.encoder.in_channels, *[g * p for g, p in zip(grid, self.patch_size)], generator=gen,
                        dtype=torch.float64)
        order = torch.stack([torch.randperm(check_total, generator=gen) for _ in range(2)])
        mask = (order < k).view(2, 1, *grid)
        twin, ctx = perturbed_copy(self.encoder, self.ctx)
        return exactness_check(twin, twin.network, ctx, x.to(device), mask.to(device))

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Sparse encoder features (finest first) of ``x`` under ``mask`` (None: every cell visible)."""
        self._check_input(x, mask)
        mask = self.full_mask(x.shape[0]) if mask is None else mask
        with self.ctx.use(mask):
            self.last_path = self.compute_path(mask)
            if self.last_path == "sparse":
                with packed_flow(self.ctx) as layout:
                    self.last_layout = layout  # (its setup_s: what this mask's index tables cost)
                    return [layout.unpack(f) for f in self.encoder(layout.pack(x))]
            return self.encoder(mask_input(x, mask))

    def densify(self, feats: Sequence[torch.Tensor], mask: torch.Tensor,
                layout: PackedLayout | None = None) -> list[torch.Tensor]:
        """Visible-only norm, mask tokens at masked sites, projection to the decoder width, per level
        (``feats`` packed when ``layout`` is given: the sparse path)."""
        out = []
        with self.ctx.use(mask):
            for feat, norm, token, proj in zip(feats, self.densify_norms, self.mask_tokens, self.densify_projs):
                if layout is not None:
                    feat = layout.unpack(norm(feat), fill=token)
                else:
                    feat = torch.where(self.ctx.mask_at(feat.shape[2:]), norm(feat), token.to(feat.dtype))
                out.append(proj(feat))
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MaskedModelOutput:
        """Mask, encode, densify, decode and compute the masked-patch loss."""
        self._check_input(x, mask)
        if getattr(self, "_is_replica", False):
            raise ConfigError("nn.DataParallel over a SparK model is not supported (its replicas would share one mask "
                              "context); use DDP (Lightning strategy 'ddp') or one device")
        mask = self.random_mask(x.shape[0]) if mask is None else mask.to(x.device)
        with self.ctx.use(mask):  # one context for both: per-resolution masks and indices are computed once
            self.last_path = self.compute_path(mask)
            if self.last_path == "sparse":
                with packed_flow(self.ctx) as layout:  # only the visible cells flow through the encoder
                    self.last_layout = layout
                    dense = self.densify(self.encoder(layout.pack(x)), mask, layout)
            else:
                dense = self.densify(self.encode(x, mask), mask)
        pred = self.decoder(dense)
        return MaskedModelOutput(loss=self.loss(x, pred, mask), pred=pred, mask=mask)

    # ---------------------------------------------------------------------------------- benchmark parts
    def compute_modes(self) -> tuple[str, ...]:
        return ("masked-dense", "sparse")

    @contextlib.contextmanager
    def computing(self, mode: str) -> Iterator[None]:
        if mode not in self.compute_modes():
            raise ValueError(f"SparK computes {self.compute_modes()}, not '{mode}'")
        previous, self.compute = self.compute, mode
        try:
            yield
        finally:
            self.compute = previous

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        if mask is None:  # the dense network: no mask anywhere
            return self.encoder(x)
        return self.encode(x, mask)

    def forward_decoder(self, latent: Sequence[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return self.decoder([proj(norm(f)) for f, norm, proj in zip(latent, self.densify_norms, self.densify_projs)])
        return self.decoder(self.densify(latent, mask))

    # ---------------------------------------------------------------------------------- loss
    def target_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Target ``(B, L, P)``: patches, normalised by their own mean and variance when norm-pix is on."""
        target = patchify(x, self.patch_size)
        return norm_pix_target(target) if self.norm_pix_loss else target

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch, averaged over masked patches only."""
        return masked_patch_loss(patchify(pred, self.patch_size), self.target_patches(x), mask.flatten(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, out: MaskedModelOutput) -> torch.Tensor:
        """The prediction in input units (norm-pix undone with each patch's statistics), visible cells pasted back."""
        return reconstruct_from_patches(x, patchify(out.pred, self.patch_size), out.mask, self.patch_size,
                                        self.norm_pix_loss)

    # ---------------------------------------------------------------------------------- export
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights in the dense network's own key names (loads with ``load_state_dict``)."""
        return {k: v.detach().clone() for k, v in self.encoder.dense_state_dict().items()}

    def encoder_meta(self) -> dict[str, Any]:
        """The exported encoder's levels: tap names, channels and per-axis strides, finest first."""
        enc = self.encoder
        return {"taps": list(enc.taps), "channels": [int(c) for c in enc.channels],
                "strides": [list(s) for s in enc.strides]}

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exempt from weight decay: norms, biases and mask tokens (SparK recipe)."""
        names = set()
        for name, p in self.named_parameters():
            if p.ndim <= 1 or name.startswith("mask_tokens."):
                names.add(name)
        return names

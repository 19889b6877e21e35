"""ConvMAE: masked convolution meets masked autoencoders (Gao et al., NeurIPS 2022), 2D and 3D.

block-wise mask on the stride-16 token grid → masked conv stages (visible sites only) → transformer on
the visible tokens only → multi-scale fusion → MAE decoder (mask tokens, sin-cos positions) → norm-pix
loss on masked tokens. The whole method reads in :class:`ConvMAE`; the network is
:class:`spark3d.backbones.hybrid.HybridEncoder`. Its conv part computes either on the visible cells only
(``compute="sparse"``, :mod:`spark3d.backbones.hybrid_sparse`) or masked-dense (the converted layers of
:mod:`spark3d.sparse` on whole maps, masked sites zeroed after every layer); both give the same numbers.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..backbones import BackboneSpec, build_network
from ..backbones.hybrid import HybridEncoder, preset, sincos_position_embedding, tokens_of, transformer_block
from ..backbones.hybrid_sparse import cell_layout, conv_stages, sparse_problem, token_parts
from ..errors import ConfigError
from ..masking import mask_grid, random_mask
from ..sparse import MaskContext, sparsify
from .common import (
    MaskedModelingMethod, MaskedModelOutput, mask_input, masked_patch_loss, norm_pix_target, patchify,
    reconstruct_from_patches, unpatchify,
)

__all__ = ["ConvMAE", "COMPUTE_MODES"]

COMPUTE_MODES = ("auto", "sparse", "masked-dense")


class ConvMAE(MaskedModelingMethod):
    """ConvMAE pretraining model around a :class:`HybridEncoder` (its conv part converted to sparse in place).

    Args:
        encoder: the dense hybrid network; owned by this model from now on.
        input_size: spatial input size, divisible by the encoder's total stride (16) per axis.
        mask_ratio: fraction of masked tokens (ConvMAE: 0.75).
        decoder_width, decoder_depth, decoder_heads: the MAE decoder (ConvMAE-B: 512, 8, 16).
        mlp_ratio: MLP width of the decoder blocks relative to ``decoder_width``.
        norm_pix_loss: normalise each target patch by its own mean and variance (off: raw MSE).
        compute: how the conv part computes under a mask. ``"sparse"``: only the visible cells flow through
            stages 1-2, the token embedding and the fusion convs (work follows the visible fraction; with
            every token visible, whole maps through the same code). ``"masked-dense"``: the whole maps with
            masked sites zeroed after every layer. ``"auto"`` (default): sparse (for ConvMAE-B on CPU far faster
            than masked-dense at any mask ratio: the zero-padded depthwise conv's weight gradient is torch's slow
            part), unless the network's conv part is not the structure the sparse code knows (a replaced
            module, a hook): then masked-dense, said in one line. Both compute the same numbers.
    """

    def __init__(
        self,
        encoder: HybridEncoder,
        input_size: Sequence[int],
        mask_ratio: float = 0.75,
        decoder_width: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        compute: str = "auto",
    ) -> None:
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ConfigError(f"compute must be one of {', '.join(COMPUTE_MODES)}, got '{compute}'")
        self.compute = compute
        self._said: str | None = None  # the last path line printed (auto says which path it takes, once)
        if not isinstance(encoder, HybridEncoder):
            raise TypeError(f"ConvMAE needs a HybridEncoder (a 'hybrid' backbone), got {type(encoder).__name__}")
        input_size = tuple(int(s) for s in input_size)
        encoder.check_size(input_size)
        self.encoder = encoder
        self.input_size = input_size
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size = tuple(encoder.total_stride)  # a token's patch: prod(patch_size) pixels x C
        self.mask_grid = mask_grid(input_size, self.patch_size)  # the token grid
        self.ctx = MaskContext()
        sparsify(encoder, self.ctx, only=encoder.conv_modules())  # the conv part reads visible sites only

        width = encoder.widths[-1]
        self.decoder_width = int(decoder_width)
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
        self.decoder_blocks = nn.ModuleList(
            [transformer_block(decoder_width, decoder_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_width, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_width, math.prod(self.patch_size) * encoder.in_channels)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_decoder)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def from_backbone(cls, spec: BackboneSpec, input_size: Sequence[int], mask_ratio: float, **kwargs: Any) -> "ConvMAE":
        """ConvMAE over a backbone-table hybrid network (what configs describe); the decoder defaults to the preset's."""
        if "convmae" not in spec.entry.methods:
            raise ConfigError(f"method 'convmae' needs a hybrid backbone (convmae_tiny, convmae_small, convmae_base), "
                              f"got {spec.describe()}")
        p = preset(spec.name)
        defaults = {"decoder_width": p.decoder_width, "decoder_depth": p.decoder_depth, "decoder_heads": p.decoder_heads}
        kwargs = {**defaults, **{k: v for k, v in kwargs.items() if v is not None}}
        return cls(build_network(spec), input_size, mask_ratio=mask_ratio, **kwargs)

    @classmethod
    def from_preset(cls, name: str, spatial_dims: int = 3, in_channels: int = 1, input_size: Sequence[int] = (96, 96, 96),
                    mask_ratio: float = 0.75, **kwargs: Any) -> "ConvMAE":
        """ConvMAE of a preset (``tiny``, ``small``, ``base``); ``kwargs`` are ConvMAE options or HybridEncoder arguments."""
        preset(name)  # a clear error for unknown names
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "encoder", "input_size", "mask_ratio"}
        network_args = set(inspect.signature(HybridEncoder.__init__).parameters) - {"self", "spatial_dims", "in_channels"}
        unknown = sorted(set(kwargs) - own - network_args)
        if unknown:
            raise TypeError(f"ConvMAE.from_preset got unknown options {unknown}; "
                            f"method options: {sorted(own)}; network options: {sorted(network_args)}")
        key = name if name.startswith("convmae_") else f"convmae_{name}"
        spec = BackboneSpec(key, "hybrid", spatial_dims, in_channels, {k: v for k, v in kwargs.items() if k in network_args})
        return cls.from_backbone(spec, input_size, mask_ratio, **{k: v for k, v in kwargs.items() if k in own})

    def prepare_for_fit(self) -> None:
        # idempotent: makes layers something replaced sparse again
        sparsify(self.encoder, self.ctx, only=self.encoder.conv_modules())

    # ---------------------------------------------------------------------------------- masks
    def random_mask(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A block-wise mask ``(B, 1, *token_grid)``, True = visible, the same visible count in every sample."""
        device = self.mask_token.device
        return random_mask(batch_size, self.mask_grid, self.mask_ratio, generator=generator, device=device).to(device)

    def full_mask(self, batch_size: int) -> torch.Tensor:
        """A mask with every token visible."""
        return torch.ones(batch_size, 1, *self.mask_grid, dtype=torch.bool, device=self.mask_token.device)

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        expected = (self.encoder.in_channels, *self.input_size)
        if x.ndim != 2 + len(self.input_size) or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ConvMAE expects input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if mask is not None and tuple(mask.shape) != (x.shape[0], 1, *self.mask_grid):
            raise ValueError(f"mask must have shape ({x.shape[0]}, 1, {', '.join(map(str, self.mask_grid))}), "
                             f"got {tuple(mask.shape)}")

    def visible_index(self, mask: torch.Tensor) -> torch.Tensor:
        """Raster indices ``(B, K)`` of each sample's visible tokens."""
        with self.ctx.use(mask):
            return self.ctx.visible_index(self.mask_grid)[:, 0]

    # ---------------------------------------------------------------------------------- compute path
    def compute_plan(self, mask: torch.Tensor) -> dict[str, Any]:
        """How the conv part computes under ``mask``: ``path`` (``sparse`` / ``masked-dense``), ``reason``, and for
        sparse the ``layout`` (``visible cells`` of the token grid, or ``whole maps`` when every token is visible)
        with its ``cells`` per sample. ``compute="sparse"`` on a network the sparse code does not know: an error."""
        if self.compute == "masked-dense":
            return {"path": "masked-dense", "reason": "compute='masked-dense'"}
        problem = sparse_problem(self.encoder)
        if problem is not None:
            if self.compute == "sparse":
                raise ConfigError(f"compute='sparse' cannot run: {problem}; use compute='masked-dense'")
            return {"path": "masked-dense", "reason": problem}
        visible, total = int(mask[0].sum()), mask[0].numel()
        whole = visible == total
        return {"path": "sparse", "reason": f"compute='{self.compute}'", "layout": "whole maps" if whole else "visible cells",
                "cells": 1 if whole else visible, "visible_tokens": visible, "tokens": total}

    def compute_path(self, mask: torch.Tensor) -> str:
        """``"sparse"`` or ``"masked-dense"`` under ``mask``; ``compute="auto"`` says its choice in one line (once)."""
        plan = self.compute_plan(mask)
        if self.compute == "auto":
            line = ("spark3d: ConvMAE computes sparse (conv stages, token embedding and fusion on the visible cells only)"
                    if plan["path"] == "sparse" else f"spark3d: ConvMAE computes masked-dense: {plan['reason']}")
            if line != self._said:
                print(line, file=sys.stderr)
                self._said = line
        return plan["path"]

    def compute_modes(self) -> tuple[str, ...]:
        return ("masked-dense", "sparse")

    @contextlib.contextmanager
    def computing(self, mode: str) -> Iterator[None]:
        if mode not in self.compute_modes():
            raise ValueError(f"ConvMAE computes {self.compute_modes()}, not '{mode}'")
        previous, self.compute = self.compute, mode
        try:
            yield
        finally:
            self.compute = previous

    # ---------------------------------------------------------------------------------- encoder
    def forward_conv_stages(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked convolution: the stride-4 and stride-8 features on the visible sites only (masked sites zero)."""
        with self.ctx.use(mask):
            if self.compute_path(mask) == "sparse":
                layout = self._layout()
                return tuple(layout.unpack(f) for f in conv_stages(self.encoder, layout.pack(x), layout))
            f4 = self.encoder.stage1(mask_input(x, mask))
            return f4, self.encoder.stage2(f4)

    def _layout(self):
        """The packed layout of the context's current mask (made once per mask)."""
        return self.ctx.cached(("hybrid-cells",), lambda: cell_layout(self.ctx.mask, self.ctx.visible_cells))

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The fused visible tokens ``(B, K, D)`` of ``x`` under ``mask`` (None: every token visible)."""
        self._check_input(x, mask)
        mask = self.full_mask(x.shape[0]) if mask is None else mask.to(x.device)
        enc = self.encoder
        with self.ctx.use(mask):
            idx_bk = self.visible_index(mask)
            if self.compute_path(mask) == "sparse":  # only the visible cells flow through the conv part
                layout = self._layout()
                f4, f8 = conv_stages(enc, layout.pack(x), layout)
                embedded_bkd, fusion_bkd = token_parts(enc, f4, f8, layout)
            else:
                f4, f8 = self.forward_conv_stages(x, mask)
                gather = lambda t_bcg: _gather(tokens_of(t_bcg), idx_bk)  # noqa: E731
                embedded_bkd, fusion_bkd = gather(enc.stage3.embed(f8)), gather(enc.fuse1(f4) + enc.fuse2(f8))
            pos_bkd = sincos_position_embedding(self.mask_grid, enc.stage3.dim, device=x.device)[idx_bk]
            tokens_bkd = enc.stage3.forward_tokens(embedded_bkd, pos_bkd)  # visible tokens only
        return enc.norm(tokens_bkd + fusion_bkd)  # multi-scale fusion

    # ---------------------------------------------------------------------------------- decoder
    def decode(self, tokens_bkd: torch.Tensor, idx_bk: torch.Tensor) -> torch.Tensor:
        """MAE decoder: embed, mask tokens at the masked positions, sin-cos positions, blocks → ``(B, L, P)`` pixels."""
        y_bkw = self.decoder_embed(tokens_bkd)
        b, k, w = y_bkw.shape
        full_blw = self.mask_token.to(y_bkw.dtype).repeat(b, math.prod(self.mask_grid), 1)
        full_blw = full_blw.scatter(1, idx_bk[..., None].expand(b, k, w), y_bkw)
        x = full_blw + sincos_position_embedding(self.mask_grid, w, device=y_bkw.device).to(y_bkw.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MaskedModelOutput:
        """Mask, encode the visible tokens, decode every token, and compute the loss on the masked ones."""
        self._check_input(x, mask)
        mask = self.random_mask(x.shape[0]) if mask is None else mask.to(x.device)
        with self.ctx.use(mask):  # one context for both: per-resolution masks and indices are computed once
            pred_blp = self.decode(self.encode(x, mask), self.visible_index(mask))
        pred = unpatchify(pred_blp, self.patch_size, self.mask_grid, self.encoder.in_channels)
        return MaskedModelOutput(loss=self.loss(x, pred_blp, mask), pred=pred, mask=mask)

    # ---------------------------------------------------------------------------------- benchmark parts
    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The visible tokens and their indices (``mask=None``: every token, the dense cost)."""
        mask = self.full_mask(x.shape[0]) if mask is None else mask.to(x.device)
        return self.encode(x, mask), self.visible_index(mask)

    def forward_decoder(self, latent: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """The prediction ``(B, C, *S)`` from :meth:`forward_encoder`'s tokens."""
        return unpatchify(self.decode(*latent), self.patch_size, self.mask_grid, self.encoder.in_channels)

    # ---------------------------------------------------------------------------------- loss
    def target_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Target ``(B, L, P)``: each token's patch, normalised by its own mean and variance when norm-pix is on."""
        target = patchify(x, self.patch_size)
        return norm_pix_target(target) if self.norm_pix_loss else target

    def loss(self, x: torch.Tensor, pred_blp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per token patch, averaged over masked tokens only."""
        return masked_patch_loss(pred_blp.float(), self.target_patches(x.float()), mask.flatten(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, out: MaskedModelOutput) -> torch.Tensor:
        """The prediction in input units (norm-pix undone with each patch's statistics), visible cells pasted back."""
        return reconstruct_from_patches(x, patchify(out.pred, self.patch_size), out.mask, self.patch_size,
                                        self.norm_pix_loss)

    # ---------------------------------------------------------------------------------- export
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, in the key names of the segmentation network's ``encoder`` (a dense HybridEncoder)."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def encoder_meta(self) -> dict[str, Any]:
        """The exported encoder's levels (tap names, channels, per-axis strides, finest first) and its token grid."""
        enc = self.encoder
        return {"taps": ["stage1", "stage2", "stage3"], "channels": list(enc.widths),
                "strides": [list(s) for s in enc.strides], "token_grid": list(self.mask_grid),
                "position_embedding": "sincos, made for the input's token grid"}

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: norms, biases and the mask token."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or name == "mask_token"}


def _gather(tokens_bld: torch.Tensor, idx_bk: torch.Tensor) -> torch.Tensor:
    """The tokens at ``idx_bk`` of each sample: ``(B, L, D)`` → ``(B, K, D)``."""
    return tokens_bld.gather(1, idx_bk[..., None].expand(-1, -1, tokens_bld.shape[2]))


def _init_decoder(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

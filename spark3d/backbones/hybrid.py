"""ConvMAE's hybrid network (Gao et al., NeurIPS 2022), 2D and 3D: conv stages at strides 4 and 8, a ViT at 16.

:class:`HybridEncoder` is the dense encoder ConvMAE pretrains; :class:`HybridUNETR` holds it unmodified
(as ``encoder.``) under a UNETR-style decoder of MONAI blocks for fine-tuning. Both work at any input
size divisible by the total stride per axis: the sin-cos position embeddings are made on the fly for
the actual token grid, so nothing is tied to the pretraining size. Registered in the backbone table
as source ``hybrid``, names ``convmae_tiny``, ``convmae_small``, ``convmae_base``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn

from ..layers import ChannelLayerNorm, conv_nd
from ..masking import mask_grid
from .registry import Backbone, Example, register

__all__ = ["HybridPreset", "PRESETS", "preset", "sincos_position_embedding", "PatchEmbed", "ConvBlock", "ConvStage",
           "TransformerStage", "HybridEncoder", "HybridUNETR", "transformer_block", "tokens_of", "map_of"]


@dataclass(frozen=True)
class HybridPreset:
    """One ConvMAE size: the encoder (widths, depths, heads per stage) and the MAE decoder pretraining puts on it."""

    widths: tuple[int, int, int]
    depths: tuple[int, int, int]
    num_heads: int
    decoder_width: int
    decoder_depth: int
    decoder_heads: int


PRESETS: dict[str, HybridPreset] = {
    # ConvMAE-B as published: 256/384/768, 2/2/11 blocks, 12 heads; decoder 512 x 8 blocks (16 heads)
    "convmae_base": HybridPreset((256, 384, 768), (2, 2, 11), 12, 512, 8, 16),
    # small sizes of our own, for CPU runs: small trains on CPU in minutes, tiny in seconds
    "convmae_small": HybridPreset((32, 64, 128), (1, 1, 4), 4, 128, 2, 4),
    "convmae_tiny": HybridPreset((16, 32, 64), (1, 1, 2), 4, 64, 2, 4),
}


def preset(name: str) -> HybridPreset:
    """The preset ``convmae_<size>`` (``<size>`` alone works too); a clear error listing the presets otherwise."""
    key = name if name in PRESETS else f"convmae_{name}"
    if key not in PRESETS:
        raise ValueError(f"unknown ConvMAE preset '{name}'; presets: {', '.join(p.removeprefix('convmae_') for p in PRESETS)}")
    return PRESETS[key]


def sincos_position_embedding(grid: Sequence[int], dim: int, device: torch.device | str | None = None,
                              temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos embeddings ``(prod(grid), dim)`` of a token grid in raster order, any number of axes.

    Each axis gets ``2 * (dim // (2 * ndim))`` channels (sines then cosines of its integer position
    at geometric frequencies, as in MAE); leftover channels are zero. Integer positions make a larger
    grid extend a smaller one, so another input size needs no interpolation.
    """
    nd = len(grid)
    freqs = dim // (2 * nd)
    if freqs == 0:
        raise ValueError(f"width {dim} is too small for sin-cos position embeddings over {nd} axes (needs >= {2 * nd})")
    omega = 1.0 / temperature ** (torch.arange(freqs, dtype=torch.float64, device=device) / freqs)
    coords = torch.meshgrid(*[torch.arange(int(g), dtype=torch.float64, device=device) for g in grid], indexing="ij")
    parts = []
    for coord in coords:
        angles = coord.reshape(-1, 1) * omega
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()


def tokens_of(x_bcg: torch.Tensor) -> torch.Tensor:
    """``(B, C, *grid)`` → ``(B, L, C)`` in raster order of the grid."""
    return x_bcg.flatten(2).transpose(1, 2)


def map_of(tokens_blc: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``(B, L, C)`` → ``(B, C, *grid)`` (inverse of :func:`tokens_of`)."""
    return tokens_blc.transpose(1, 2).reshape(tokens_blc.shape[0], tokens_blc.shape[2], *grid)


def _as_stride(value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    return (int(value),) * spatial_dims if isinstance(value, int) else tuple(int(v) for v in value)


def transformer_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> nn.Module:
    """A pre-norm ViT block (timm's ``Block``: qkv bias, LayerNorm eps 1e-6), as in MAE and ConvMAE."""
    from timm.models.vision_transformer import Block

    return Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path, norm_layer=partial(nn.LayerNorm, eps=1e-6))


class PatchEmbed(nn.Module):
    """A conv with kernel = stride, then LayerNorm over channels and GELU (ConvMAE's patch embedding)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.proj = conv_nd(spatial_dims)(in_channels, out_channels, kernel_size=tuple(stride), stride=tuple(stride))
        self.norm = ChannelLayerNorm(out_channels, eps=1e-6)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class ConvBlock(nn.Module):
    """ConvMAE's conv block: ``x + conv2(dwconv(conv1(norm1(x))))``, then ``x + mlp(norm2(x))`` with 1x1 convs.

    The depthwise ``kernel_size`` conv is its only operator that mixes positions.
    """

    def __init__(self, spatial_dims: int, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 5,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        hidden = int(dim * mlp_ratio)
        self.norm1 = ChannelLayerNorm(dim, eps=1e-6)
        self.conv1 = conv(dim, dim, 1)
        self.dwconv = conv(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.conv2 = conv(dim, dim, 1)
        self.norm2 = ChannelLayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=conv(dim, hidden, 1), act=nn.GELU(), fc2=conv(hidden, dim, 1)))
        if drop_path > 0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.conv2(self.dwconv(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvStage(nn.Module):
    """Patch embedding by ``stride``, then ``depth`` conv blocks."""

    def __init__(self, spatial_dims: int, in_channels: int, dim: int, stride: Sequence[int], depth: int,
                 mlp_ratio: float, kernel_size: int, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.embed = PatchEmbed(spatial_dims, in_channels, dim, stride)
        self.blocks = nn.Sequential(*[ConvBlock(spatial_dims, dim, mlp_ratio, kernel_size, dp) for dp in drop_paths[:depth]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.embed(x))


class TransformerStage(nn.Module):
    """Patch embedding to the token grid, a linear token projection, sin-cos positions, ViT blocks.

    ``forward`` runs every token of a map; :meth:`forward_tokens` runs any token subset (ConvMAE's
    visible tokens) given their position embeddings.
    """

    def __init__(self, spatial_dims: int, in_channels: int, dim: int, stride: Sequence[int], depth: int,
                 num_heads: int, mlp_ratio: float, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.dim = int(dim)
        self.embed = PatchEmbed(spatial_dims, in_channels, dim, stride)
        self.proj = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([transformer_block(dim, num_heads, mlp_ratio, dp) for dp in drop_paths[:depth]])

    def forward_tokens(self, tokens_bkd: torch.Tensor, pos_bkd: torch.Tensor) -> torch.Tensor:
        """Project tokens, add their position embeddings, run the blocks."""
        x = self.proj(tokens_bkd) + pos_bkd.to(tokens_bkd.dtype)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x_bcg: torch.Tensor) -> torch.Tensor:
        t = self.embed(x_bcg)
        grid = t.shape[2:]
        pos = sincos_position_embedding(grid, self.dim, device=t.device)[None]
        return map_of(self.forward_tokens(tokens_of(t), pos), grid)


class HybridEncoder(nn.Module):
    """ConvMAE's encoder, dense: ``forward(x)`` returns its stride 4, 8 and 16 features (all tokens), finest first.

    The stride-16 output is the fused one: transformer output plus the stage 1 and 2 features projected
    to the token grid by strided convs (``fuse1``, ``fuse2``), then LayerNorm (``norm``) — what ConvMAE
    pretrains and what the segmentation decoder reads.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        widths, depths: per stage (two conv stages, one transformer stage).
        num_heads: attention heads of the transformer stage.
        strides: per-stage strides, each an int or a per-axis tuple (default 4, 2, 2: total 16).
        mlp_ratio: hidden width of every MLP relative to its block's width.
        kernel_size: the depthwise conv's kernel (5 in ConvMAE).
        drop_path_rate: stochastic depth, rising linearly over all blocks (fine-tuning; 0 for pretraining).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        widths: Sequence[int] = (256, 384, 768),
        depths: Sequence[int] = (2, 2, 11),
        num_heads: int = 12,
        strides: Sequence[int | Sequence[int]] = (4, 2, 2),
        mlp_ratio: float = 4.0,
        kernel_size: int = 5,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or len(depths) != 3 or len(strides) != 3:
            raise ValueError(f"a hybrid encoder has 3 stages; got widths {widths}, depths {depths}, strides {strides}")
        sd = int(spatial_dims)
        self.spatial_dims, self.in_channels = sd, int(in_channels)
        self.widths = tuple(int(w) for w in widths)
        self.depths = tuple(int(d) for d in depths)
        stage_strides = [_as_stride(s, sd) for s in strides]
        self.strides = [tuple(math.prod(s[a] for s in stage_strides[: k + 1]) for a in range(sd)) for k in range(3)]
        self.total_stride = self.strides[-1]
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        w1, w2, w3 = self.widths
        d1, d2, _ = self.depths
        self.stage1 = ConvStage(sd, in_channels, w1, stage_strides[0], d1, mlp_ratio, kernel_size, dpr[:d1])
        self.stage2 = ConvStage(sd, w1, w2, stage_strides[1], d2, mlp_ratio, kernel_size, dpr[d1:d1 + d2])
        self.stage3 = TransformerStage(sd, w2, w3, stage_strides[2], self.depths[2], num_heads, mlp_ratio,
                                       dpr[d1 + d2:])
        conv = conv_nd(sd)
        to_tokens_1 = tuple(t // s for t, s in zip(self.total_stride, self.strides[0]))
        to_tokens_2 = stage_strides[2]
        self.fuse1 = conv(w1, w3, kernel_size=to_tokens_1, stride=to_tokens_1)
        self.fuse2 = conv(w2, w3, kernel_size=to_tokens_2, stride=to_tokens_2)
        self.norm = nn.LayerNorm(w3, eps=1e-6)
        self.apply(_init_weights)

    def conv_modules(self) -> list[str]:
        """Paths of every module of the conv part (stages 1-2, the token patch embedding, the fusion convs):
        what ConvMAE makes sparse. The transformer blocks and the final norm work on gathered tokens."""
        roots = ("stage1", "stage2", "stage3.embed", "fuse1", "fuse2")
        return [name for name, _ in self.named_modules() if any(name == r or name.startswith(r + ".") for r in roots)]

    def check_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """The token grid of an input of this spatial size; a clear error if it does not divide by the total stride."""
        if len(size) != self.spatial_dims:
            raise ValueError(f"hybrid encoder is {self.spatial_dims}D but got an input of spatial size {tuple(size)}")
        return mask_grid(size, self.total_stride)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        grid = self.check_size(x.shape[2:])
        f4 = self.stage1(x)
        f8 = self.stage2(f4)
        t = self.stage3(f8) + self.fuse1(f4) + self.fuse2(f8)
        return [f4, f8, map_of(self.norm(tokens_of(t)), grid)]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class HybridUNETR(nn.Module):
    """The hybrid encoder (as ``encoder``, unmodified) under a UNETR-style decoder of MONAI blocks, 2D or 3D.

    Skips: the image (stride 1) and the encoder's stride 4, 8 and 16 features, each through a
    ``UnetrBasicBlock``; ``UnetrUpBlock`` s go 16 → 8 → 4 → 1 by the stage strides; ``UnetOutBlock``.

    Args:
        feature_size: decoder width at stride 1 (x2 at stride 4, x4 at 8, x8 at 16), as in MONAI's UNETR.
        norm_name: the decoder blocks' norm (``"instance"``, ``"batch"``, …).
        encoder_kwargs: :class:`HybridEncoder` arguments.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, feature_size: int = 16,
                 norm_name: str | tuple = "instance", **encoder_kwargs: Any) -> None:
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock

        self.encoder = HybridEncoder(spatial_dims, in_channels, **encoder_kwargs)
        sd, fs = spatial_dims, int(feature_size)
        w1, w2, w3 = self.encoder.widths
        s = self.encoder.strides
        up = [s[0], tuple(b // a for a, b in zip(s[0], s[1])), tuple(b // a for a, b in zip(s[1], s[2]))]
        basic = partial(UnetrBasicBlock, sd, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)
        upblock = partial(UnetrUpBlock, sd, kernel_size=3, norm_name=norm_name, res_block=True)
        self.skip0 = basic(in_channels, fs)
        self.skip1 = basic(w1, 2 * fs)
        self.skip2 = basic(w2, 4 * fs)
        self.bottleneck = basic(w3, 8 * fs)
        self.up2 = upblock(8 * fs, 4 * fs, upsample_kernel_size=up[2])
        self.up1 = upblock(4 * fs, 2 * fs, upsample_kernel_size=up[1])
        self.up0 = upblock(2 * fs, fs, upsample_kernel_size=up[0])
        self.out = UnetOutBlock(sd, fs, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f4, f8, f16 = self.encoder(x)
        d = self.up2(self.bottleneck(f16), self.skip2(f8))
        d = self.up1(d, self.skip1(f4))
        d = self.up0(d, self.skip0(x))
        return self.out(d)


_SEGMENTATION_ONLY = ("feature_size", "norm_name")  # decoder options: the segmentation network reads them


def _encoder_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    p = preset(name)
    return {"widths": p.widths, "depths": p.depths, "num_heads": p.num_heads, **kwargs}


def _build(name: str, spatial_dims: int, in_channels: int, **kwargs: Any) -> HybridEncoder:
    """The dense encoder of preset ``name`` (``backbone_kwargs`` override its arguments)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _SEGMENTATION_ONLY}
    return HybridEncoder(spatial_dims, in_channels, **_encoder_kwargs(name, kwargs))


def _build_segmentation(name: str, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> HybridUNETR:
    return HybridUNETR(spatial_dims, in_channels, out_channels, **_encoder_kwargs(name, kwargs))


register(Backbone(
    family="convmae", source="hybrid", names=tuple(PRESETS), spatial_dims=(2, 3), build=_build,
    taps=lambda net: ["stage1", "stage2", "stage3"], segmentation=_build_segmentation, seg_encoder_prefix="encoder.",
    recognises=lambda net: isinstance(net, HybridEncoder), methods=("convmae",),
    examples=(Example("hybrid-convmae_tiny-3d", "convmae_tiny", 3, 1, (64, 64, 32)),
              Example("hybrid-convmae_tiny-2d", "convmae_tiny", 2, 3, (96, 64))),
))

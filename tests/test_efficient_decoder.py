"""The efficient decoder learns in 2D and 3D, and costs at most half the encoder's FLOPs on the shipped 3D configs."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from spark3d import SparK
from spark3d.backbones import BackboneSpec
from spark3d.methods.decoders import EfficientDecoder, pixel_shuffle

from test_spark import smooth_volume, tiny, train_steps

CONFIGS = Path(__file__).parents[1] / "configs" / "pretrain"
SHIPPED_3D = sorted(CONFIGS.glob("ct_*.yaml"))


def test_pixel_shuffle_puts_each_channel_block_at_its_sub_position():
    x = torch.arange(2 * 12 * 3 * 5, dtype=torch.float32).view(2, 12, 3, 5)  # 3 channels × (2, 2) sub-positions
    y = pixel_shuffle(x, (2, 2))
    assert y.shape == (2, 3, 6, 10)
    assert torch.equal(y[1, 2, 2 * 1 + 1, 2 * 4 + 0], x[1, 2 * 4 + 1 * 2 + 0, 1, 4])
    z = pixel_shuffle(torch.randn(1, 8, 2, 3, 4), (2, 2, 2))
    assert z.shape == (1, 1, 4, 6, 8)


def test_decodes_to_the_head_stride_with_anisotropic_strides():
    strides = [(1, 1, 1), (2, 2, 1), (4, 4, 2), (8, 8, 2)]
    dec = EfficientDecoder(strides, out_channels=1, width=32, spatial_dims=3)
    assert dec.head_stride == (4, 4, 2) and len(dec.blocks) == 1
    projs = dec.projections([4, 8, 16, 32])
    feats = [torch.randn(2, c, 16 // s[0], 16 // s[1], 8 // s[2]) for c, s in zip([4, 8, 16, 32], strides)]
    pred = dec([p(f) for p, f in zip(projs, feats)])
    assert pred.shape == (2, 1, 16, 16, 8)


@pytest.mark.parametrize("sd", [3, 2])
def test_efficient_decoder_learns_loss_halves(sd):
    model, size = tiny(sd, mask_ratio=0.6, decoder="efficient")
    x = smooth_volume(size)[None, None].repeat(2, 1, *[1] * sd)
    losses = train_steps(model, x, 200, stop_at_half=True)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses[::20]


def _networks():
    """The shipped 3D SparK pretraining configs, DynUNet (default) at 96³ and SegResNet (default) at 64³."""
    cases = []
    for path in SHIPPED_3D:
        config = yaml.safe_load(path.read_text())
        args = config["model"]["init_args"]
        if args.get("method", "spark") != "spark":
            continue  # ConvMAE's decoder is an MAE transformer, not SparK's
        spec = BackboneSpec(args["backbone"], args.get("source", "monai"), args.get("spatial_dims", 3),
                            args.get("in_channels", 1), dict(args.get("backbone_kwargs") or {}))
        cases.append((path.stem, spec, tuple(config["data"]["init_args"]["roi_size"]), args.get("decoder_width")))
    cases.append(("dynunet-default", BackboneSpec("dynunet"), (96, 96, 96), None))
    cases.append(("segresnet-default", BackboneSpec("segresnet"), (64, 64, 64), None))
    return cases


@pytest.mark.parametrize("name,spec,size,width", _networks(), ids=[c[0] for c in _networks()])
def test_densify_and_decoder_flops_at_most_half_the_encoders(name, spec, size, width):
    """Counted on the meta device (shapes only, nothing computed): densify + decoder ≤ 0.5 × encoder FLOPs, where
    the faithful decoder costs more (on most configs: more than the encoder)."""
    ratios = {}
    for decoder in ("spark", "efficient"):
        with torch.device("meta"):
            model = SparK.from_backbone(spec, size, 0.75, decoder=decoder, decoder_width=width)
            x = torch.empty(1, spec.in_channels, *size)
        with torch.no_grad(), FlopCounterMode(display=False) as enc:
            feats = model.forward_encoder(x, None)  # masked-dense does the dense network's convolutions
        with torch.no_grad(), FlopCounterMode(display=False) as dec:
            pred = model.forward_decoder(feats, None)
        assert tuple(pred.shape) == (1, spec.in_channels, *size)
        ratios[decoder] = dec.get_total_flops() / enc.get_total_flops()
    assert ratios["efficient"] < ratios["spark"], ratios  # the faithful decoder costs more (most: more than the encoder)
    assert ratios["efficient"] <= 0.5, ratios
    assert math.isfinite(ratios["efficient"])

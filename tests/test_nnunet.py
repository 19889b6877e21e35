"""nnU-Net's networks as encoders: the ResEnc recipe, conversion with no `trusted=`, no leak, dense equality,
weights by key into the ResidualEncoderUNet itself, and a CLI pretraining whose encoder.pt fine-tunes it."""

import copy
from pathlib import Path

import torch
import yaml

# dynamic-network-architectures is a declared dev dependency: imported, never skipped (a broken install fails here)
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from spark3d import SparK
from spark3d.backbones import BackboneSpec, build_network, examples, nnunet_kwargs, nnunet_topology
from spark3d.check import dense_difference, leak_difference
from spark3d.cli import main
from spark3d.data.phantoms import write_btcv_phantoms
from spark3d.encoders import from_nnunet

SMALL = {"features_per_stage": [2, 4, 8, 8, 8, 8]}  # ResEnc-L's depth (blocks 1,3,4,6,6,6) at small widths
CONFIG = Path(__file__).parents[1] / "configs" / "pretrain" / "demo_ct.yaml"


def test_the_backbone_table_holds_the_nnunet_examples():
    """The tests parameterised over the table run the nnU-Net networks too (they vanish when the package is missing)."""
    names = {ex.id for ex, _ in examples(method=None)}
    assert {"nnunet-resenc-3d-aniso", "nnunet-plainconv-2d"} <= names


def test_resenc_presets_follow_nnunet_and_nnssl():
    """ResEnc-L as nnssl defines it (nnssl's get_res_enc_l), and nnU-Net's topology rule for other spacings."""
    args = nnunet_kwargs("resenc_l", 3, 1)
    assert args["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert args["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6] and args["n_conv_per_stage_decoder"] == [1] * 5
    assert args["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5 and args["kernel_sizes"] == [[3, 3, 3]] * 6
    assert args["conv_op"] is nn.Conv3d and args["norm_op"] is nn.InstanceNorm3d and args["conv_bias"]
    assert args["norm_op_kwargs"] == {"eps": 1e-5, "affine": True} and args["nonlin"] is nn.LeakyReLU
    for preset in ("resenc_m", "resenc_xl"):  # one recipe; the planners only target more GPU memory
        assert nnunet_kwargs(preset, 3, 1) == args
    assert nnunet_kwargs("resenc_l", 2, 1)["features_per_stage"] == [32, 64, 128, 256, 512, 512]
    plain = nnunet_kwargs("plainconv", 3, 1)
    assert plain["n_conv_per_stage"] == [2] * 6 and plain["n_conv_per_stage_decoder"] == [2] * 5
    net = build_network(BackboneSpec("resenc_l", "nnunet", 3, 1, {"features_per_stage": [2] * 6}))  # cheap widths
    assert isinstance(net, ResidualEncoderUNet)
    assert [len(stage.blocks) for stage in net.encoder.stages] == [1, 3, 4, 6, 6, 6]
    # nnU-Net's rule: an isotropic 160³ patch gives ResEnc-L's topology; thick slices keep their axis unpooled
    assert nnunet_topology([160, 160, 160]) == (args["strides"], args["kernel_sizes"])
    strides, kernels = nnunet_topology([40, 192, 160], [3.0, 0.8, 0.8])
    assert strides[:3] == [[1, 1, 1], [1, 2, 2], [2, 2, 2]] and kernels[0] == [1, 3, 3] and kernels[1] == [3, 3, 3]
    aniso = nnunet_kwargs("resenc_l", 3, 1, patch_size=[40, 192, 160], spacing=[3.0, 0.8, 0.8])
    assert aniso["strides"] == strides and aniso["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6][: len(strides)]


def test_resenc_l_converts_without_trusted_is_leak_free_dense_equal_and_round_trips():
    encoder = from_nnunet("resenc_l", spatial_dims=3, in_channels=1, probe_size=(64, 64, 32), **SMALL)
    assert encoder.taps == [f"encoder.stages.{i}" for i in range(6)]
    assert encoder.strides == [(2**i,) * 3 for i in range(6)] and encoder.channels == SMALL["features_per_stage"]
    size = (64, 64, 32)  # a 2 x 2 x 1 mask grid at ResEnc-L's total stride 32 (2 cells visible)
    assert not encoder.op_trace.select("refused")  # every block only composes covered layers and per-position ops
    dense = copy.deepcopy(encoder)
    model = SparK(encoder, size, mask_ratio=0.5, decoder_width=16)  # no trusted=
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *size, generator=gen)
    mask = model.random_mask(2, generator=gen)
    # InstanceNorm keeps no running statistics: train and eval compute the same, one mode is enough
    assert leak_difference(model, x, mask) < 1e-5
    assert dense_difference(model, dense, x) < 1e-4
    fresh = build_network(BackboneSpec("resenc_l", "nnunet", 3, 1, SMALL))
    exported = model.encoder_state_dict()
    result = fresh.load_state_dict(exported, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys
    assert all(k.startswith("decoder.") for k in result.missing_keys)  # only the U-Net decoder's own tensors
    loaded, trained = fresh.state_dict(), encoder.network.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in exported)  # every encoder tensor, by key


def test_plainconv_2d_anisotropic_and_instances():
    encoder = from_nnunet("plainconv", spatial_dims=2, in_channels=3, features_per_stage=[4, 8, 16],
                          strides=[1, [2, 1], 2])
    assert encoder.strides == [(1, 1), (2, 1), (4, 2)] and encoder.channels == [4, 8, 16]
    net = PlainConvUNet(1, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, [2, 2, 1]], 2, 2, [1, 1], norm_op=nn.InstanceNorm3d,
                        norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)
    wrapped = from_nnunet(net, spatial_dims=3, in_channels=1, probe_size=32)
    assert wrapped.taps == ["encoder.stages.0", "encoder.stages.1", "encoder.stages.2"]
    assert wrapped.strides[-1] == (4, 4, 2)
    SparK(wrapped, (32, 32, 16), decoder_width=16)


def test_cli_pretraining_writes_encoder_that_loads_into_residual_encoder_unet(tmp_path):
    from spark3d.train import SegmentationModule

    datalist = write_btcv_phantoms(tmp_path / "phantoms", n_train=2, n_val=1, n_test=0, shape=(64, 64, 32), seed=2)
    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["init_args"].update(backbone="resenc_l", source="nnunet", backbone_kwargs=SMALL, decoder_width=16)
    config["data"]["init_args"].update(roi_size=[64, 64, 32], batch_size=1, num_samples=1)
    path = tmp_path / "resenc_demo.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(path), "--data.init_args.datalist", str(datalist),
                 "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
                 "--trainer.enable_progress_bar", "false", "--model.init_args.figure_every_n_epochs", "100"]) == 0
    export = torch.load(run / "encoder.pt", weights_only=True)
    assert export["meta"]["backbone"] == "resenc_l" and export["meta"]["source"] == "nnunet"
    assert export["meta"]["taps"] == [f"encoder.stages.{i}" for i in range(6)]
    module = SegmentationModule(backbone="resenc_l", source="nnunet", backbone_kwargs=SMALL, num_classes=14,
                                pretrained=str(run / "encoder.pt"), roi_size=(64, 64, 32))
    assert isinstance(module.network, ResidualEncoderUNet) and not module.network.decoder.deep_supervision
    assert module.pretrained_report["matched"] == len(export["state_dict"])
    own = module.network.state_dict()
    assert all(torch.equal(own[k], v) for k, v in export["state_dict"].items())
    with torch.no_grad():
        assert module(torch.randn(1, 1, 64, 64, 32)).shape == (1, 14, 64, 64, 32)

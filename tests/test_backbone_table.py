"""One table entry is all a new backbone needs: pretraining, export and fine-tuning read it; layer decay by level."""

import pytest
import torch
from torch import nn

from spark3d.backbones import Backbone, BackboneSpec, Example, register, unregister
from spark3d.checkpoint import read_encoder
from spark3d.cli import main
from spark3d.data.phantoms import write_btcv_phantoms
from spark3d.train import SegmentationModule

from pathlib import Path

CONFIGS = Path(__file__).parents[1] / "configs"


class TinyEncoderNet(nn.Module):
    """A plain torch network defined here: a stem and three strided stages, plus a head that never runs."""

    def __init__(self, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU())
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv3d(width * 2**i, width * 2 ** (i + 1), 3, stride=2, padding=1),
                          nn.BatchNorm3d(width * 2 ** (i + 1)), nn.ReLU())
            for i in range(3)
        ])
        self.head = nn.Linear(width * 8, 2)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3, 4)))


class TinySegNet(nn.Module):
    """The fine-tuning network: the same encoder (as ``encoder``) and a small upsampling decoder."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 8) -> None:
        super().__init__()
        self.encoder = TinyEncoderNet(in_channels, width)
        self.decoder = nn.Sequential(nn.Upsample(scale_factor=8, mode="trilinear"), nn.Conv3d(width * 8, out_channels, 1))

    def forward(self, x):
        x = self.encoder.stem(x)
        for stage in self.encoder.stages:
            x = stage(x)
        return self.decoder(x)


@pytest.fixture
def tiny_entry():
    entry = register(Backbone(
        family="tiny", source="test", names=("tinynet",), spatial_dims=(3,),
        build=lambda name, sd, ic, **kw: TinyEncoderNet(ic, **kw),
        taps=lambda net: ["stages.0", "stages.1", "stages.2"],
        segmentation=lambda name, sd, ic, oc, **kw: TinySegNet(ic, oc, **kw),
        seg_encoder_prefix="encoder.",
        examples=(Example("test-tinynet", "tinynet", 3, 1, (32, 32, 32)),),
    ))
    yield entry
    unregister("tiny", "test")


def test_a_backbone_added_by_one_entry_pretrains_exports_and_finetunes(tiny_entry, tmp_path):
    datalist = write_btcv_phantoms(tmp_path / "data", n_train=2, n_val=1, n_test=0, shape=(40, 40, 20), seed=4)
    backbone = ["--model.init_args.backbone", "tinynet", "--model.init_args.source", "test",
                "--model.init_args.backbone_kwargs", "{}"]
    common = ["--data.init_args.datalist", str(datalist), "--data.init_args.roi_size", "[32, 32, 32]",
              "--data.init_args.spacing", "[6.0, 6.0, 6.0]", "--trainer.enable_progress_bar", "false", *backbone]
    pre = tmp_path / "pre"
    assert main(["pretrain", "--config", str(CONFIGS / "pretrain" / "demo_ct.yaml"), *common,
                 "--data.init_args.batch_size", "1", "--trainer.max_steps", "2",
                 "--trainer.default_root_dir", str(pre)]) == 0
    state, meta = read_encoder(pre / "encoder.pt")
    assert meta["backbone"] == "tinynet" and meta["source"] == "test" and meta["strides"][-1] == [8, 8, 8]
    assert set(state) == {k for k in TinyEncoderNet().state_dict() if not k.startswith("head.")}

    ft = tmp_path / "ft"
    assert main(["finetune", "--config", str(CONFIGS / "finetune" / "demo_ct.yaml"), *common,
                 "--model.init_args.pretrained", str(pre / "encoder.pt"), "--trainer.max_steps", "1",
                 "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
                 "--trainer.default_root_dir", str(ft)]) == 0
    module = SegmentationModule(backbone="tinynet", source="test", num_classes=14, roi_size=(32, 32, 32),
                                pretrained=str(pre / "encoder.pt"))
    assert module.pretrained_report["matched"] == len(state)
    for key, value in state.items():
        assert torch.equal(module.network.state_dict()[f"encoder.{key}"], value)


def test_layer_decay_scales_each_encoder_level(tiny_entry):
    module = SegmentationModule(backbone="tinynet", source="test", num_classes=3, roi_size=(32, 32, 32),
                                lr=1.0, layer_decay=0.5)
    scale_of = {}
    for group in module._param_groups():
        for p in group["params"]:
            scale_of[id(p)] = group["lr_scale"]
    net = module.network
    # three levels (stages.0..2); the stem runs before the first level's output, so it is level 0
    assert scale_of[id(net.encoder.stem[0].weight)] == 0.5**3
    assert scale_of[id(net.encoder.stages[0][0].weight)] == 0.5**3
    assert scale_of[id(net.encoder.stages[1][0].weight)] == 0.5**2
    assert scale_of[id(net.encoder.stages[2][1].bias)] == 0.5**1
    assert scale_of[id(net.decoder[1].weight)] == 1.0
    assert scale_of[id(net.encoder.head.weight)] == 1.0  # never runs while encoding: not an encoder level


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown monai backbone 'segresnot'; known: .*segresnet"):
        BackboneSpec("segresnot", "monai").entry

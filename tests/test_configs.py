"""Every shipped config parses and builds its model (no data, no GPU needed)."""

from pathlib import Path

import pytest
import yaml

from spark3d import ConvMAE
from spark3d.train import PretrainModule, SegmentationModule, SparKPretrain

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "pretrain").glob("*.yaml"))
FINETUNE = sorted((Path(__file__).parents[1] / "configs" / "finetune").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo_ct", "ct_segresnet", "ct_mednext", "ct_resnet50", "imagenet_resnet50", "imagenet_convnext_small"} <= names
    assert {"demo_convmae_ct", "ct_convmae", "imagenet_convmae_base"} <= names
    assert {"btcv_convmae", "demo_convmae_ct"} <= {p.stem for p in FINETUNE}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_model(path, tmp_path):
    text = path.read_text()
    assert text.startswith("#"), "each config opens with a comment on the hardware and data it expects"
    config = yaml.safe_load(text)
    kwargs = dict(config["model"]["init_args"])
    if "plans" in (kwargs.get("backbone_kwargs") or {}):  # a plan's network: the config's path stands for the user's plan
        from nnunet_plans_example import write_example_plans

        plans = write_example_plans(tmp_path / "plans.json", config["data"]["init_args"]["roi_size"])
        kwargs["backbone_kwargs"] = {**kwargs["backbone_kwargs"], "plans": str(plans)}
    kwargs["input_size"] = config["data"]["init_args"]["roi_size"]
    if "convmae" in path.stem:  # ConvMAE configs name the method through the method-agnostic module
        assert config["model"]["class_path"] == "spark3d.train.PretrainModule"
        assert kwargs["method"] == "convmae" and kwargs["source"] == "hybrid"
        module = PretrainModule(**kwargs)
        assert isinstance(module.model, ConvMAE)
    else:
        assert config["model"]["class_path"] == "spark3d.train.SparKPretrain"
        module = SparKPretrain(**kwargs)
    grid = module.model.mask_grid
    assert all(g >= 2 for g in grid)


@pytest.mark.parametrize("path", FINETUNE, ids=[p.stem for p in FINETUNE])
def test_finetune_config_builds_its_network(path):
    text = path.read_text()
    assert text.startswith("#")
    config = yaml.safe_load(text)
    assert config["model"]["class_path"] == "spark3d.train.SegmentationModule"
    assert config["data"]["class_path"] == "spark3d.data.SegmentationData"
    kwargs = dict(config["model"]["init_args"])
    kwargs["roi_size"] = config["data"]["init_args"]["roi_size"]
    kwargs["num_classes"] = config["data"]["init_args"]["num_classes"]
    module = SegmentationModule(**kwargs)
    assert sum(p.numel() for p in module.parameters()) > 0


def test_btcv_recipe_is_the_standard_one():
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "finetune" / "btcv.yaml").read_text())
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    assert data["spacing"] == [1.5, 1.5, 2.0] and data["intensity_range"] == [-175.0, 250.0]
    assert data["roi_size"] == [96, 96, 96] and data["num_samples"] == 4 and data["num_classes"] == 14
    assert model["sw_overlap"] == 0.5


def test_imagenet_convmae_recipe_is_the_published_one():
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "pretrain" / "imagenet_convmae_base.yaml").read_text())
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert model["backbone"] == "convmae_base" and model["mask_ratio"] == 0.75 and model["method_args"]["norm_pix_loss"]
    assert model["optimizer"] == "adamw" and model["betas"] == [0.9, 0.95] and model["base_lr"] == 1.5e-4
    assert model["weight_decay"] == model["weight_decay_end"] == 0.05 and model["warmup_epochs"] == 40
    assert trainer["max_epochs"] == 1600 and data["roi_size"] == [224, 224] and data["scale"] == [0.2, 1.0]
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] == 2048

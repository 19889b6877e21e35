"""Every shipped pretraining config parses and builds its model (no data, no GPU needed)."""

from pathlib import Path

import pytest
import yaml

from spark3d.train import SparKPretrain

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "pretrain").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo_ct", "ct_segresnet", "ct_mednext", "ct_resnet50", "imagenet_resnet50", "imagenet_convnext_small"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_model(path):
    text = path.read_text()
    assert text.startswith("#"), "each config opens with a comment on the hardware and data it expects"
    config = yaml.safe_load(text)
    assert config["model"]["class_path"] == "spark3d.train.SparKPretrain"
    kwargs = dict(config["model"]["init_args"])
    kwargs["input_size"] = config["data"]["init_args"]["roi_size"]
    module = SparKPretrain(**kwargs)
    grid = module.model.mask_grid
    assert all(g >= 2 for g in grid)

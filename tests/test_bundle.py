"""`spark3d export-bundle`: the MONAI bundle runs with MONAI alone and reproduces `spark3d predict` exactly."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spark3d.cli import main
from spark3d.data.phantoms import write_btcv_phantoms

REPO = Path(__file__).parents[1]
FT_CONFIG = REPO / "configs" / "finetune" / "demo_ct.yaml"

# Runs `python -m monai.bundle <command> …` for each argv list, in a process where spark3d cannot be imported
# (it is installed in the venv, so a finder refuses it): the bundle's configs must not need spark3d.
_WITHOUT_SPARK3D = """
import importlib.abc, json, runpy, sys

class RefuseSpark3d(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "spark3d":
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
        return None

sys.meta_path.insert(0, RefuseSpark3d())
try:
    import spark3d  # noqa: F401
    raise SystemExit("spark3d is importable: the isolation does not work")
except ModuleNotFoundError:
    pass
for argv in json.loads(sys.argv[1]):
    sys.argv = ["monai.bundle", *argv]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
assert not [m for m in sys.modules if m.split(".")[0] == "spark3d"]
"""

# What the MONAI Bundle Specification (docs.monai.io/en/latest/mb_specification.html, "metadata.json File") makes
# mandatory, written from its text: the keys of metadata.json, and the keys every tensor format specifier of
# network_data_format's inputs and outputs must hold at least. The spec's `optional_packages_version` is what MONAI
# itself now calls `required_packages_version` (monai.bundle.utils.DEPRECATED_ID_MAPPING): either name counts.
REQUIRED_METADATA = ["version", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version",
                     "task", "description", "authors", "copyright", "network_data_format"]
REQUIRED_TENSOR = ["type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                   "is_patch_data", "channel_def"]


def metadata_schema() -> dict:
    """A JSON schema of the specification's mandatory fields (for `verify_metadata --filepath`, so nothing is
    downloaded; MONAI's own schema is not vendored)."""
    from monai.bundle.utils import DEPRECATED_ID_MAPPING

    tensor = {"type": "object", "required": REQUIRED_TENSOR,
              "properties": {"num_channels": {"type": "integer"}, "spatial_shape": {"type": "array"},
                             "value_range": {"type": "array"}, "is_patch_data": {"type": "boolean"},
                             "channel_def": {"type": "object"}}}
    names = {"type": "object", "minProperties": 1, "additionalProperties": tensor}
    plain = [k for k in REQUIRED_METADATA if k not in DEPRECATED_ID_MAPPING]
    renamed = [{"anyOf": [{"required": [old]}, {"required": [new]}]} for old, new in DEPRECATED_ID_MAPPING.items()
               if old in REQUIRED_METADATA]
    return {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "required": plain, "allOf": renamed,
            "properties": {"version": {"type": "string"}, "task": {"type": "string"},
                           "network_data_format": {"type": "object", "required": ["inputs", "outputs"],
                                                   "properties": {"inputs": names, "outputs": names}}}}


def required_paths(meta: dict) -> list[tuple[str, ...]]:
    """Every mandatory field of ``meta`` as a key path (the package-versions key under the name ``meta`` uses)."""
    paths = []
    for key in REQUIRED_METADATA:
        if key == "optional_packages_version" and key not in meta:
            key = "required_packages_version"
        paths.append((key,))
    for side in ("inputs", "outputs"):
        paths.append(("network_data_format", side))
        for name in meta["network_data_format"][side]:
            paths += [("network_data_format", side, name, k) for k in REQUIRED_TENSOR]
    return paths


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    datalist = write_btcv_phantoms(root / "data", n_train=2, n_val=1, n_test=2, shape=(48, 48, 24), seed=3)
    # 4 mm: the volumes are larger than the ROI, so the sliding window takes several overlapping windows
    common = ["--config", str(FT_CONFIG), "--data.init_args.datalist", str(datalist),
              "--data.init_args.roi_size", "[32, 32, 32]", "--data.init_args.spacing", "[4.0, 4.0, 4.0]"]
    run = root / "run"
    assert main(["finetune", *common, "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
                 "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0",
                 "--trainer.enable_progress_bar", "false"]) == 0
    return root, common, str(run / "checkpoints" / "last.ckpt")


def test_bundle_runs_without_spark3d_and_equals_predict(finetuned, tmp_path):
    root, common, ckpt = finetuned
    images = root / "data" / "RawData" / "Testing" / "img"
    assert main(["predict", *common, "--ckpt_path", ckpt, "--input", str(images), "--out", str(tmp_path / "pred")]) == 0
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"split": "validation", "cases": 1, "mean_dice": 0.25,
                                   "per_organ": {"spleen": {"mean": 0.5, "cases": 1}, "liver": {"mean": 0.0, "cases": 1}}}))
    bundle = tmp_path / "bundle"
    assert main(["export-bundle", *common, "--ckpt_path", ckpt, "--out", str(bundle), "--summary", str(summary)]) == 0
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
                 "docs/README.md", "LICENSE"):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["6"] == "liver"
    assert meta["monai_version"] and meta["pytorch_version"] and meta["numpy_version"]
    readme = (bundle / "docs" / "README.md").read_text()
    assert "| spleen | 0.500 | 1 |" in readme and "SegResNet" in readme

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(metadata_schema()))
    import copy

    import jsonschema

    jsonschema.validate(meta, metadata_schema())  # every mandatory field is there …
    for path in required_paths(meta):  # … and the check notices each one missing
        broken = copy.deepcopy(meta)
        parent = broken
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, metadata_schema())
    out = tmp_path / "bundle_out"
    commands = [["run", "--config_file", str(bundle / "configs" / "inference.json"), "--dataset_dir", str(images),
                 "--output_dir", str(out)],
                ["verify_metadata", "--meta_file", str(bundle / "configs" / "metadata.json"), "--filepath", str(schema)],
                ["verify_net_in_out", "network_def", "--meta_file", str(bundle / "configs" / "metadata.json"),
                 "--config_file", str(bundle / "configs" / "inference.json")]]
    proc = subprocess.run([sys.executable, "-I", "-c", _WITHOUT_SPARK3D, json.dumps(commands)], cwd=bundle,
                          capture_output=True, text=True, timeout=900)  # a loaded 2-core CI machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "metadata is verified with no error" in proc.stdout + proc.stderr
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr

    for case in ("img0061", "img0062"):
        ours, theirs = nib.load(tmp_path / "pred" / f"{case}_seg.nii.gz"), nib.load(out / f"{case}_seg.nii.gz")
        a, b = np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)
        assert len(np.unique(a)) >= 3  # a label map with several organs, so equality says something
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
        assert np.array_equal(a, b), f"{case}: {(a != b).sum()} voxels differ"
        assert np.array_equal(ours.affine, theirs.affine)

    # the metadata the schema does not check: the declared I/O is what the network does
    from monai.data import load_net_with_metadata
    from monai.networks.nets import SegResNet

    scripted, ts_meta, extra = load_net_with_metadata(str(bundle / "models" / "model.ts"),
                                                      more_extra_files=("inference.json",))
    definition = {k: v for k, v in json.loads((bundle / "configs" / "inference.json").read_text())["network_def"].items()
                  if k != "_target_"}
    eager = SegResNet(**definition).eval()
    eager.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-5)
    assert ts_meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 14
    assert json.loads(extra["inference.json"])["inferer"]["roi_size"] == [32, 32, 32]


def test_export_refuses_networks_that_need_spark3d_and_foreign_folders(tmp_path):
    from spark3d.data import SegmentationData
    from spark3d.errors import ConfigError
    from spark3d.export import export_bundle
    from spark3d.train import SegmentationModule

    data = SegmentationData(str(tmp_path / "unused.json"), num_classes=3, roi_size=(64, 64))
    timm_unet = SegmentationModule(backbone="resnet18", source="timm", spatial_dims=2, in_channels=3, num_classes=3,
                                   roi_size=(64, 64))
    with pytest.raises(ConfigError, match="needs spark3d code to build"):
        export_bundle(timm_unet, data, None, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    module = SegmentationModule(backbone="segresnet", backbone_kwargs={"init_filters": 8}, num_classes=3)
    with pytest.raises(ConfigError, match="is not a spark3d bundle"):
        export_bundle(module, data, None, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1

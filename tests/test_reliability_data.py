"""Data errors are one line naming the file, wherever they happen: NaN, all-NaN and constant volumes,
truncated .nii.gz, a wrong channel count — up front, when training reads them (main process and data-loader
workers), in evaluate, predict and data_prep; predict writes nothing unless every input is fine and refuses
its own input folder; per-axis values must fit the run's dimensionality."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spark3d.cli import main
from spark3d.data.datalist import check_volume
from spark3d.data.phantoms import make_phantom, write_btcv_phantoms
from spark3d.errors import ConfigError, DataError

REPO = Path(__file__).parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "demo_ct.yaml"
FINETUNE = REPO / "configs" / "finetune" / "demo_ct.yaml"
SHAPE = (40, 40, 20)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Phantoms (BTCV layout) plus bad volumes beside them."""
    root = tmp_path_factory.mktemp("data")
    datalist = write_btcv_phantoms(root, n_train=2, n_val=1, n_test=1, shape=SHAPE, seed=4)
    hu, label, affine = make_phantom(7, SHAPE)
    bad = {}
    nan = hu.astype(np.float32)
    nan[np.random.default_rng(0).random(nan.shape) < 0.05] = np.nan
    bad["nan"] = root / "nan.nii.gz"
    nib.save(nib.Nifti1Image(nan, affine), bad["nan"])
    bad["two_channels"] = root / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([hu, hu], -1), affine), bad["two_channels"])
    good = root / "good.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), good)
    raw = good.read_bytes()
    bad["truncated"] = root / "truncated.nii.gz"
    bad["truncated"].write_bytes(raw[: int(len(raw) * 0.6)])  # header intact, voxels cut
    nib.save(nib.Nifti1Image(label, affine), root / "label.nii.gz")
    return {"root": root, "datalist": datalist, "good": good, "label": root / "label.nii.gz", **bad}


def _list(root: Path, name: str, training: list[dict], validation: list[dict] | None = None) -> Path:
    content = json.loads((root / "dataset.json").read_text())
    content["training"], content["validation"] = training, validation or []
    path = root / f"{name}.json"
    path.write_text(json.dumps(content))
    return path


def _pretrain(datalist: Path, run: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(PRETRAIN), "--data.init_args.datalist", str(datalist), "--data.init_args.roi_size",
            "[16, 16, 16]", "--data.init_args.spacing", "[6.0, 6.0, 6.0]", "--data.init_args.batch_size", "1",
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run),
            *extra]


def _seg(command: str, datalist: Path, run: Path, *extra: str) -> list[str]:
    return [command, "--config", str(FINETUNE), "--data.init_args.datalist", str(datalist), "--data.init_args.roi_size",
            "[16, 16, 16]", "--data.init_args.spacing", "[6.0, 6.0, 6.0]", "--trainer.default_root_dir", str(run), *extra]


def _one_line_error(code: int, err: str, name: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2, err
    assert len(lines) == 1 and name in lines[0], err
    assert "Traceback" not in err and "applying transform" not in err
    return lines[0]


def test_volume_checks_name_the_file(data, tmp_path):
    hu, _, affine = make_phantom(1, SHAPE)
    for name, values in {"all_nan": np.full(SHAPE, np.nan, np.float32), "constant": np.full(SHAPE, -1000, np.int16)}.items():
        nib.save(nib.Nifti1Image(values, affine), tmp_path / f"{name}.nii.gz")
        with pytest.raises(DataError, match=f"{name}.nii.gz.*(every voxel is NaN|constant)"):
            check_volume(tmp_path / f"{name}.nii.gz", full=True)
    with pytest.raises(DataError, match="truncated.nii.gz: truncated or corrupt"):
        check_volume(data["truncated"], full=True)
    check_volume(data["truncated"])  # the header alone looks fine: that is why "full" is the default
    with pytest.raises(DataError, match="2 channel"):
        check_volume(data["two_channels"], channels=1)
    with pytest.raises(DataError, match="NaN"):
        check_volume(data["nan"], full=True)
    check_volume(data["good"], channels=1, full=True)


def test_nan_volume_is_refused_in_pretraining_finetuning_evaluate_predict(data, tmp_path, capsys):
    from spark3d.train.segment import SegmentationModule

    root = data["root"]
    pretrain_list = _list(root, "nan_pretrain", [{"image": "good.nii.gz"}, {"image": "nan.nii.gz"}])
    seg_list = _list(root, "nan_seg", [{"image": "good.nii.gz", "label": "label.nii.gz"}],
                     [{"image": "nan.nii.gz", "label": "label.nii.gz"}])
    ckpt = tmp_path / "model.ckpt"
    module = SegmentationModule(backbone_kwargs={"init_filters": 8, "blocks_down": [1, 2, 2, 2]}, roi_size=(16, 16, 16))
    torch.save({"state_dict": module.state_dict()}, ckpt)
    predict_in = tmp_path / "inputs"
    predict_in.mkdir()
    (predict_in / "a_good.nii.gz").write_bytes(data["good"].read_bytes())
    (predict_in / "b_nan.nii.gz").write_bytes(data["nan"].read_bytes())
    runs = {
        "pretrain (up front)": (_pretrain(pretrain_list, tmp_path / "p1"), "nan.nii.gz"),
        "pretrain (when read)": (_pretrain(pretrain_list, tmp_path / "p2", "--data.init_args.check", "header"), "nan.nii.gz"),
        "finetune": (_seg("finetune", seg_list, tmp_path / "f"), "nan.nii.gz"),
        "evaluate": (_seg("evaluate", seg_list, tmp_path / "e", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "eval")),
                     "nan.nii.gz"),
        "predict": (_seg("predict", data["datalist"], tmp_path / "q", "--ckpt_path", str(ckpt), "--input", str(predict_in),
                         "--out", str(tmp_path / "pred")), "b_nan.nii.gz"),
    }
    before = sorted(p.name for p in tmp_path.iterdir())  # every run folder and output folder is in tmp_path
    for what, (argv, name) in runs.items():
        line = _one_line_error(main(argv), capsys.readouterr().err, name)
        assert "NaN" in line, what
        assert sorted(p.name for p in tmp_path.iterdir()) == before, f"{what} wrote something"
    assert not any((tmp_path / d).exists() for d in ("p1", "p2", "f", "e", "eval", "q", "pred")), "nothing written"


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_and_wrong_channel_volumes_fail_in_one_line(data, tmp_path, capsys, workers):
    root = data["root"]
    truncated = _list(root, "truncated", [{"image": "good.nii.gz"}, {"image": "truncated.nii.gz"}])
    channels = _list(root, "channels", [{"image": "good.nii.gz"}, {"image": "two_channels.nii.gz"}])
    w = ["--data.init_args.num_workers", str(workers)]
    # the up-front check decompresses every voxel (default) / reads the header (channels)
    _one_line_error(main(_pretrain(truncated, tmp_path / "a", *w)), capsys.readouterr().err, "truncated.nii.gz")
    line = _one_line_error(main(_pretrain(channels, tmp_path / "b", *w, "--data.init_args.check", "header")),
                           capsys.readouterr().err, "two_channels.nii.gz")
    assert "2 channel(s)" in line and "takes 1" in line
    # header-only check: the truncation surfaces when training reads the file (in a worker with workers=2),
    # through MONAI's transform wrapper and the worker's re-raise: still one line, non-zero exit, no run folder
    run = tmp_path / "c"
    argv = _pretrain(truncated, run, *w, "--data.init_args.check", "header", "--data.init_args.cache", "none")
    if workers:
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        out = subprocess.run([sys.executable, "-m", "spark3d.cli", *argv], capture_output=True, text=True, env=env)
        line = _one_line_error(out.returncode, out.stderr, "truncated.nii.gz")
        assert "worker" in line
    else:
        _one_line_error(main(argv), capsys.readouterr().err, "truncated.nii.gz")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


def test_data_prep_reports_a_truncated_image(data, tmp_path, capsys):
    import importlib.util

    raw = tmp_path / "RawData"
    for sub in ("Training/img", "Training/label"):
        (raw / sub).mkdir(parents=True)
    (raw / "Training/img/img0001.nii.gz").write_bytes(data["truncated"].read_bytes())
    (raw / "Training/label/label0001.nii.gz").write_bytes(data["label"].read_bytes())
    spec = importlib.util.spec_from_file_location("btcv_prep", REPO / "data_prep" / "btcv.py")
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    code = prep.main(["--raw", str(raw), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "img0001.nii.gz" in err and "truncated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_predict_refuses_its_own_input_folder_and_name_collisions(data, tmp_path, capsys):
    from spark3d.train.segment import SegmentationModule

    ckpt = tmp_path / "model.ckpt"
    module = SegmentationModule(backbone_kwargs={"init_filters": 8, "blocks_down": [1, 2, 2, 2]}, roi_size=(16, 16, 16))
    torch.save({"state_dict": module.state_dict()}, ckpt)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "case.nii.gz").write_bytes(data["good"].read_bytes())
    before = sorted(p.name for p in inputs.iterdir())
    written = sorted(p.name for p in tmp_path.iterdir())  # the run folder "r" and the outputs would land here
    for out in (inputs, inputs / "predictions"):
        argv = _seg("predict", data["datalist"], tmp_path / "r", "--ckpt_path", str(ckpt), "--input", str(inputs),
                    "--out", str(out))
        line = _one_line_error(main(argv), capsys.readouterr().err, str(inputs))
        assert "input folder" in line
    nib.save(nib.load(data["good"]), inputs / "case.nii")  # case.nii beside case.nii.gz: the same output name
    argv = _seg("predict", data["datalist"], tmp_path / "r", "--ckpt_path", str(ckpt), "--input", str(inputs),
                "--out", str(tmp_path / "pred"))
    line = _one_line_error(main(argv), capsys.readouterr().err, "case_seg.nii.gz")
    assert "case.nii" in line and not (tmp_path / "pred").exists() and not (tmp_path / "r").exists()
    assert sorted(p.name for p in inputs.iterdir()) == sorted(before + ["case.nii"])
    assert sorted(p.name for p in tmp_path.iterdir()) == written, "nothing written beside the inputs"


def test_per_axis_values_must_fit_the_dimensionality(data, tmp_path, capsys):
    from jsonargparse import Namespace

    from spark3d.cli.runs import check_axes

    line = _one_line_error(main(_pretrain(data["datalist"], tmp_path / "run", "--data.init_args.spacing", "[1.5, 2.0]")),
                           capsys.readouterr().err, "data.init_args.spacing")
    assert "a 3D run needs one value or 3" in line and not (tmp_path / "run").exists()
    config = Namespace()
    config["model.init_args.spatial_dims"] = 3
    config["data.init_args.roi_size"] = [32]
    config["model.init_args.backbone_kwargs"] = {"strides": [1, 2, [2, 2, 1]]}
    check_axes(config)
    assert config["data.init_args.roi_size"] == [32, 32, 32]
    config["model.init_args.backbone_kwargs"] = {"strides": [1, [2, 2]]}
    with pytest.raises(ConfigError, match=r"strides\[1\] is \[2, 2\]"):
        check_axes(config)

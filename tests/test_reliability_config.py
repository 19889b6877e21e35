"""A run's own config.yaml is a valid --config of every command; every bad value and every config mistake is one
line naming the key (the real reason first), exit code 2, before anything is written; inference needs no training
datalist; folders, an unresumable run and bad benchmark arguments are named plainly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from spark3d.cli import main
from spark3d.data.phantoms import make_phantom, write_btcv_phantoms

REPO = Path(__file__).parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "demo_ct.yaml"
FINETUNE = REPO / "configs" / "finetune" / "demo_ct.yaml"
SHAPE = (40, 40, 20)
SMALL = ["--data.init_args.roi_size", "[16, 16, 16]", "--trainer.enable_progress_bar", "false",
         "--trainer.max_steps", "1"]


def _error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Union subtypes" not in err
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfgdata")
    return write_btcv_phantoms(root, n_train=2, n_val=1, n_test=1, shape=SHAPE, seed=4)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """A tiny pretraining run and a tiny fine-tuning run, each with its written config.yaml."""
    root = tmp_path_factory.mktemp("cfgruns")
    pre, ft = root / "pre", root / "ft"
    assert main(["pretrain", "--config", str(PRETRAIN), "--data.init_args.datalist", str(data), *SMALL,
                 "--data.init_args.batch_size", "1", "--trainer.default_root_dir", str(pre)]) == 0
    assert main(["finetune", "--config", str(FINETUNE), "--data.init_args.datalist", str(data), *SMALL,
                 "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(ft)]) == 0
    return {"root": root, "pre": pre, "ft": ft}


def test_a_runs_config_yaml_is_a_valid_config_of_every_command(runs, data, tmp_path, capsys):
    pre_cfg, ft_cfg = runs["pre"] / "config.yaml", runs["ft"] / "config.yaml"
    recorded = yaml.safe_load(pre_cfg.read_text())
    assert "overwrite" in recorded and "ckpt_path" in recorded  # what made evaluate/predict/export refuse it
    # pretraining run: resume, preprocess, benchmark
    assert main(["pretrain", "--config", str(pre_cfg), "--ckpt_path", "last", "--trainer.max_steps", "2"]) == 0
    assert (runs["pre"] / "encoder.pt").is_file()
    assert main(["preprocess", "--config", str(pre_cfg), "--out", str(tmp_path / "store"), "--no-progress"]) == 0
    assert (tmp_path / "store" / "manifest.json").is_file()
    assert main(["benchmark", "--config", str(pre_cfg), "--batch", "1", "--repeats", "1", "--warmup", "0",
                 "--no-memory", "--modes", "dense", "--json", str(tmp_path / "bench.json")]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())
    # fine-tuning run: resume, evaluate, predict, export-bundle
    assert main(["finetune", "--config", str(ft_cfg), "--ckpt_path", "last", "--trainer.max_steps", "2"]) == 0
    ckpt = str(runs["ft"] / "checkpoints" / "last.ckpt")
    assert main(["evaluate", "--config", str(ft_cfg), "--ckpt_path", ckpt, "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "summary.json").is_file()
    test_dir = Path(data).parent / "RawData" / "Testing" / "img"
    assert main(["predict", "--config", str(ft_cfg), "--ckpt_path", ckpt, "--input", str(test_dir),
                 "--out", str(tmp_path / "pred")]) == 0
    assert list((tmp_path / "pred").glob("*_seg.nii.gz"))
    assert main(["export-bundle", "--config", str(ft_cfg), "--ckpt_path", ckpt, "--out", str(tmp_path / "bundle")]) == 0
    assert (tmp_path / "bundle" / "configs" / "inference.json").is_file()
    # a recorded `overwrite: true` / `ckpt_path` never carries into another command from a config file
    risky = dict(yaml.safe_load(ft_cfg.read_text()), overwrite=True, ckpt_path=ckpt)
    other = tmp_path / "risky.yaml"
    other.write_text(yaml.safe_dump(risky))
    capsys.readouterr()
    before = (runs["ft"] / "checkpoints" / "last.ckpt").read_bytes()
    code = main(["finetune", "--config", str(other), "--trainer.default_root_dir", str(runs["ft"])])
    err = capsys.readouterr().err
    assert code == 2 and "'overwrite: True' is not used (--overwrite is taken from the command line only)" in err
    assert "already holds a run" in err
    assert (runs["ft"] / "checkpoints" / "last.ckpt").read_bytes() == before  # refused, not overwritten


def _pre(data, run, *extra):
    return ["pretrain", "--config", str(PRETRAIN), "--data.init_args.datalist", str(data),
            "--trainer.default_root_dir", str(run), *extra]


def _ft(data, run, *extra):
    return ["finetune", "--config", str(FINETUNE), "--data.init_args.datalist", str(data),
            "--trainer.default_root_dir", str(run), *extra]


VALUES = [  # (command, override, the key the line must name)
    ("pretrain", ["--model.init_args.mask_ratio", "0"], "mask_ratio"),
    ("pretrain", ["--model.init_args.mask_ratio", "1"], "mask_ratio"),
    ("pretrain", ["--model.init_args.mask_ratio", "1.5"], "mask_ratio"),
    ("pretrain", ["--model.init_args.mask_ratio", "-0.1"], "mask_ratio"),
    ("pretrain", ["--data.init_args.batch_size", "0"], "batch_size"),
    ("pretrain", ["--data.init_args.num_samples", "0"], "num_samples"),
    ("pretrain", ["--model.init_args.lr", "-0.001"], "lr"),
    ("pretrain", ["--trainer.max_steps", "0"], "max_steps"),
    ("pretrain", ["--trainer.max_steps", "-2"], "max_steps"),
    ("pretrain", ["--data.init_args.spacing", "[0]"], "spacing"),
    ("pretrain", ["--data.init_args.spacing", "[-6, -6, -6]"], "spacing"),
    ("pretrain", ["--data.init_args.intensity_range", "[250, -175]"], "intensity_range"),
    ("pretrain", ["--data.init_args.roi_size", "30"], "data.init_args.roi_size"),  # linked to input_size
    ("finetune", ["--data.init_args.batch_size", "0"], "batch_size"),
    ("finetune", ["--data.init_args.num_samples", "0"], "num_samples"),
    ("finetune", ["--model.init_args.lr", "-1"], "lr"),
    ("finetune", ["--data.init_args.spacing", "[1.5, 0, 2]"], "spacing"),
    ("finetune", ["--data.init_args.intensity_range", "[250, -175]"], "intensity_range"),
    ("finetune", ["--trainer.max_epochs", "0"], "max_epochs"),
]


@pytest.mark.parametrize("command,override,key", VALUES, ids=[f"{c}{''.join(o)}" for c, o, _ in VALUES])
def test_bad_values_are_refused_in_one_line_before_anything_is_written(data, tmp_path, capsys, command, override, key):
    run = tmp_path / "run"
    argv = (_pre if command == "pretrain" else _ft)(data, run, *override)
    line = _error_line(capsys, main(argv))
    assert key in line
    assert not run.exists()


def _volume(path: Path, voxel_mm: float, label: bool = False) -> Path:
    hu, lab, _ = make_phantom(3, SHAPE)
    nib.save(nib.Nifti1Image((lab if label else hu).astype(np.float32), np.diag([voxel_mm] * 3 + [1.0])), path)
    return path


@pytest.mark.parametrize("voxel_mm,what", [(0.01, "single voxel"), (1e5, "more than")])
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_volume_resampled_to_one_voxel_or_overflowing_is_refused(tmp_path, capsys, command, voxel_mm, what):
    image = _volume(tmp_path / "img.nii.gz", voxel_mm)
    label = _volume(tmp_path / "lab.nii.gz", voxel_mm, label=True)
    listing = tmp_path / "list.json"
    entry = {"image": image.name, "label": label.name}
    listing.write_text(json.dumps({"labels": {"0": "background"}, "training": [entry], "validation": [entry]}))
    run = tmp_path / "run"
    line = _error_line(capsys, main((_pre if command == "pretrain" else _ft)(listing, run, *SMALL)))
    assert what in line and "img.nii.gz" in line
    assert not run.exists()


def test_one_value_for_a_per_axis_option_is_repeated(data, tmp_path):
    from spark3d.cli.lightning import PRETRAIN_LINKS, make_cli
    from spark3d.train.pretrain import PretrainModule

    argv = _pre(data, tmp_path / "run", "--data.init_args.roi_size", "16", "--data.init_args.spacing", "6")[1:]
    cli = make_cli(PretrainModule, "spark3d pretrain", "", argv, "runs/x", links=PRETRAIN_LINKS)
    assert cli.datamodule.roi_size == (16, 16, 16) and cli.datamodule.spacing == (6.0, 6.0, 6.0)
    assert tuple(cli.model.model.input_size) == (16, 16, 16)


CONFIG_ERRORS = [  # (argv after the command's config, the start of the one line)
    ("pretrain", ["--model.init_args.backbone", "segresnett"], "unknown monai backbone 'segresnett'; known: "),
    ("pretrain", ["--model.init_args.mask_ratoi", "0.5"],
     "mask_ratoi is not an option of SparKPretrain; did you mean mask_ratio?"),
    ("pretrain", ["--data.init_args.batch_sise", "2"], "batch_sise is not an option of CTPretrainData; did you mean "),
    ("pretrain", ["--model.init_args.mask_ratio", "abc"], "model.init_args.mask_ratio: expected a float, got 'abc'"),
    ("pretrain", ["--trainer.max_step", "3"], "--trainer.max_step is not an option of spark3d pretrain; did you mean "
     "--trainer.max_steps?"),
    ("pretrain", ["--model.init_args.decoder", "effishent"], "model.init_args.decoder: expected one of 'spark', "),
    ("pretrain", ["--config", str(FINETUNE)], "model.class_path is spark3d.train.SegmentationModule, not a "
     "PretrainModule: spark3d pretrain takes a pretraining config; this is a fine-tuning config"),
    ("finetune", ["--config", str(PRETRAIN)], "model.class_path is spark3d.train.SparKPretrain, not a "
     "SegmentationModule"),
]


@pytest.mark.parametrize("command,extra,start", CONFIG_ERRORS, ids=[" ".join(e) for _, e, _ in CONFIG_ERRORS])
def test_config_errors_read_as_one_line_with_the_reason_first(data, tmp_path, capsys, command, extra, start):
    run = tmp_path / "run"
    if extra[0] == "--config":  # the wrong kind of config
        argv = [command, *extra, "--data.init_args.datalist", str(data), "--trainer.default_root_dir", str(run)]
    else:
        argv = (_pre if command == "pretrain" else _ft)(data, run, *extra)
    line = _error_line(capsys, main(argv))
    assert line.split(": error: ", 1)[1].startswith(start), line
    assert not run.exists()


def test_an_override_before_config_is_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["pretrain", "--data.init_args.datalist", str(data), "--config", str(PRETRAIN),
            "--trainer.default_root_dir", str(run)]
    line = _error_line(capsys, main(argv))
    assert "--data.init_args.datalist is given before --config" in line and not run.exists()


def test_inference_needs_no_training_datalist(runs, data, tmp_path, capsys):
    config = yaml.safe_load((runs["ft"] / "config.yaml").read_text())
    config["data"]["init_args"]["datalist"] = str(tmp_path / "gone" / "dataset.json")  # moved away
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    ckpt = str(runs["ft"] / "checkpoints" / "last.ckpt")
    test_dir = Path(data).parent / "RawData" / "Testing" / "img"
    capsys.readouterr()
    assert main(["predict", "--config", str(cfg), "--ckpt_path", ckpt, "--input", str(test_dir),
                 "--out", str(tmp_path / "pred")]) == 0
    assert "names no classes" not in capsys.readouterr().err  # the class names came from the checkpoint
    assert main(["evaluate", "--config", str(cfg), "--ckpt_path", ckpt, "--input", str(data),
                 "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert "spleen" in summary["per_organ"] and summary["cases"] == 1


def test_a_folder_as_checkpoint_or_encoder_is_named_as_a_folder(runs, data, tmp_path, capsys):
    code = main(["evaluate", "--config", str(runs["ft"] / "config.yaml"), "--ckpt_path", str(runs["ft"]),
                 "--out", str(tmp_path / "ev")])
    assert "is a folder" in _error_line(capsys, code)
    code = main(_ft(data, tmp_path / "run", "--model.init_args.pretrained", str(runs["pre"])))
    assert "is a folder" in _error_line(capsys, code) and not (tmp_path / "run").exists()


def test_a_run_without_a_checkpoint_says_one_thing_with_or_without_ckpt_path_last(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")  # a fresh run that died before a checkpoint
    lines = []
    for extra in ([], ["--ckpt_path", "last"]):
        lines.append(_error_line(capsys, main(_pre(data, run, *SMALL, *extra))))
    assert lines[0] == lines[1] and "--overwrite true" in lines[0] and "no last.ckpt" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv"]


@pytest.mark.parametrize("extra,key", [(["--batch", "0"], "--batch"), (["--mask-ratio", "1.5"], "--mask-ratio"),
                                       (["--json", "/nonexistent/dir/bench.json"], "--json")])
def test_benchmark_refuses_bad_arguments_before_it_runs(capsys, extra, key):
    line = _error_line(capsys, main(["benchmark", "--config", str(PRETRAIN), *extra]))
    assert key in line

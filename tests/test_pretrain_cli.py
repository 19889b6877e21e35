"""`spark3d pretrain` end to end on phantoms: outputs, resume, encoder export, bad input."""

import csv
import json
from pathlib import Path

import pytest
import torch

from spark3d.cli import main
from spark3d.data.phantoms import write_btcv_phantoms

CONFIG = Path(__file__).parents[1] / "configs" / "pretrain" / "demo_ct.yaml"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    return write_btcv_phantoms(root, n_train=3, n_val=1, n_test=0, shape=(64, 64, 32), seed=1)


def _args(datalist, run_dir, *extra):
    return ["pretrain", "--config", str(CONFIG), "--data.init_args.datalist", str(datalist),
            "--data.init_args.roi_size", "[32, 32, 32]", "--data.init_args.batch_size", "1",
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--model.init_args.figure_every_n_epochs", "1", *extra]


def test_pretrain_outputs_resume_and_encoder_export(phantoms, tmp_path):
    run = tmp_path / "run"
    assert main(_args(phantoms, run, "--trainer.max_steps", "3")) == 0
    for name in ("checkpoints/last.ckpt", "encoder.pt", "metrics.csv", "config.yaml"):
        assert (run / name).is_file(), name
    assert list((run / "figures").glob("*.png"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert "train/loss" in rows[0] and "train/loss_epoch" in rows[0] and any(r["train/loss"] for r in rows)
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 3

    # resume continues the step count, and the metrics of the first part are kept
    assert main(_args(phantoms, run, "--trainer.max_steps", "5", "--ckpt_path", "last")) == 0
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 5
    with (run / "metrics.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["train/loss"]]
    assert steps[:3] == [0, 1, 2] and len(steps) == 5 and steps == sorted(set(steps))

    # encoder.pt: weights-only loadable, into the dense MONAI network by key, exactly the trained tensors
    export = torch.load(run / "encoder.pt", weights_only=True)
    meta = export["meta"]
    assert meta["backbone"] == "segresnet" and meta["spatial_dims"] == 3 and meta["input_size"] == [32, 32, 32]
    assert meta["spacing"] == [6.0, 6.0, 6.0] and meta["strides"][-1] == [8, 8, 8]  # the demo config's spacing
    from monai.networks.nets import SegResNet

    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, **meta["backbone_kwargs"])
    result = net.load_state_dict(export["state_dict"], strict=False)
    assert result.unexpected_keys == [] and all(k.startswith(("up_", "conv_final")) for k in result.missing_keys)
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    for key, value in export["state_dict"].items():
        assert torch.equal(net.state_dict()[key], value)
        assert torch.equal(ckpt[f"model.encoder.network.{key}"], value)


def test_print_config_resolves_links(phantoms, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(_args(phantoms, "unused", "--print_config"))
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "backbone: segresnet" in out and "roi_size:\n    - 32" in out


@pytest.mark.parametrize("problem", ["missing_file", "empty", "unknown_key", "corrupt", "flat"])
def test_bad_input_clear_message_nothing_written(phantoms, tmp_path, capsys, problem):
    import nibabel as nib
    import numpy as np

    datalist = tmp_path / "list.json"
    run = tmp_path / "run"
    extra = []
    if problem == "missing_file":
        datalist.write_text(json.dumps({"training": [{"image": "gone/img0001.nii.gz"}]}))
    elif problem == "empty":
        datalist.write_text(json.dumps({"training": []}))
    elif problem == "corrupt":
        (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
        datalist.write_text(json.dumps({"training": [{"image": "broken.nii.gz"}]}))
    elif problem == "flat":
        nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), tmp_path / "slice.nii.gz")
        datalist.write_text(json.dumps({"training": [{"image": "slice.nii.gz"}]}))
    else:
        datalist = phantoms
        extra = ["--model.init_args.mask_ration", "0.5"]
    try:
        code = main(_args(datalist, run, "--trainer.max_steps", "1", *extra))
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert not run.exists()
    expected = {"missing_file": "gone/img0001.nii.gz", "empty": "no 'training' cases", "unknown_key": "mask_ration",
                "corrupt": "broken.nii.gz", "flat": "expected a 3D volume"}[problem]
    assert expected in err
    assert "Traceback" not in err

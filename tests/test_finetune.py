"""Fine-tuning end to end on BTCV- and MSD-layout trees of small phantoms, encoder loading, bad input."""

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spark3d.cli import main
from spark3d.data.phantoms import make_phantom

REPO = Path(__file__).parents[1]
FT_CONFIG = REPO / "configs" / "finetune" / "demo_ct.yaml"
SHAPE = (40, 40, 20)


def _run(module_path: str, argv: list[str]) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("prep", REPO / module_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def btcv_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("btcv") / "RawData"
    for sub in ("Training/img", "Training/label", "Testing/img"):
        (raw / sub).mkdir(parents=True)
    for case in (1, 2, 21, 35, 36):
        hu, lab, aff = make_phantom(case, SHAPE)
        nib.save(nib.Nifti1Image(hu, aff), raw / f"Training/img/img{case:04d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), raw / f"Training/label/label{case:04d}.nii.gz")
    hu, _, aff = make_phantom(61, SHAPE)
    nib.save(nib.Nifti1Image(hu, aff), raw / "Testing/img/img0061.nii.gz")
    return raw


def _ft_args(datalist, run, *extra):
    return ["--config", str(FT_CONFIG), "--data.init_args.datalist", str(datalist),
            "--data.init_args.roi_size", "[32, 32, 32]", "--data.init_args.spacing", "[6.0, 6.0, 6.0]",
            "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false", *extra]


def test_btcv_prep_finetune_evaluate_predict(btcv_raw, tmp_path):
    before = _digest(btcv_raw)
    assert _run("data_prep/btcv.py", ["--raw", str(btcv_raw), "--out", str(tmp_path)]) == 0
    assert _digest(btcv_raw) == before  # raw data only read
    datalist = tmp_path / "dataset_0.json"
    content = json.loads(datalist.read_text())
    names = lambda key: [Path(e["image"]).name for e in content[key]]  # noqa: E731
    assert names("training") == ["img0001.nii.gz", "img0002.nii.gz", "img0021.nii.gz"]
    assert names("validation") == ["img0035.nii.gz", "img0036.nii.gz"]
    assert names("test") == ["img0061.nii.gz"] and content["labels"]["1"] == "spleen"

    run = tmp_path / "run"
    assert main(["finetune", *_ft_args(datalist, run, "--trainer.limit_train_batches", "2", "--trainer.check_val_every_n_epoch", "1",
                                       "--trainer.max_epochs", "1")]) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/mean_dice" in header and "val/dice/liver" in header

    ckpt = str(run / "checkpoints" / "last.ckpt")
    out = tmp_path / "eval"
    common = ["--config", str(FT_CONFIG), "--data.init_args.datalist", str(datalist),
              "--data.init_args.roi_size", "[32, 32, 32]", "--data.init_args.spacing", "[6.0, 6.0, 6.0]"]
    assert main(["evaluate", *common, "--ckpt_path", ckpt, "--out", str(out)]) == 0
    with (out / "dice_per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["img0035", "img0036"]
    assert list(rows[0])[1:4] == ["spleen", "right kidney", "left kidney"] and "mean" in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_organ"]) >= {"liver", "aorta"} and 0.0 <= summary["mean_dice"] <= 1.0
    assert abs(summary["per_organ"]["liver"]["mean"] - np.mean([float(r["liver"]) for r in rows])) < 1e-3

    pred_dir = tmp_path / "pred"
    test_img = btcv_raw / "Testing/img/img0061.nii.gz"
    assert main(["predict", *common, "--ckpt_path", ckpt, "--input", str(test_img.parent), "--out", str(pred_dir)]) == 0
    seg = nib.load(pred_dir / "img0061_seg.nii.gz")
    original = nib.load(test_img)
    assert seg.shape == original.shape and np.allclose(seg.affine, original.affine)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= set(range(14))
    assert (pred_dir / "img0061_overlay.png").stat().st_size > 1000


def _write_msd_task(root: Path, channels: int, n_cases: int = 5) -> Path:
    task = root / ("Task01_BrainTumour" if channels > 1 else "Task09_Spleen")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    rng = np.random.default_rng(channels)
    affine = np.diag([1.2, 1.2, 2.5, 1.0])
    training = []
    for i in range(n_cases + 1):
        lab = np.zeros(SHAPE, np.uint8)
        c = rng.integers(10, 30, size=3)
        lab[c[0] - 6:c[0] + 6, c[1] - 6:c[1] + 6, 5:15] = 1
        lab[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, 8:12] = min(3, channels)
        base = rng.normal(0, 1, SHAPE).astype(np.float32)
        img = np.stack([base + lab * (k + 1) for k in range(channels)], -1) if channels > 1 else (base * 20 + lab * 100).astype(np.int16)
        name = f"case_{i:03d}.nii.gz"
        if i == n_cases:
            nib.save(nib.Nifti1Image(img, affine), task / "imagesTs" / name)
            continue
        nib.save(nib.Nifti1Image(img, affine), task / "imagesTr" / name)
        nib.save(nib.Nifti1Image(lab, affine), task / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"} if channels > 1 \
        else {"0": "background", "1": "spleen"}
    meta = {"name": task.name, "description": "test task", "modality": {str(k): f"m{k}" for k in range(channels)},
            "labels": labels, "numTraining": n_cases, "training": training, "test": [f"./imagesTs/case_{n_cases:03d}.nii.gz"]}
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


@pytest.mark.parametrize("channels", [1, 4])
def test_msd_prep_finetune_evaluate_predict(tmp_path, channels):
    task = _write_msd_task(tmp_path, channels)
    assert _run("data_prep/msd.py", ["--task", str(task), "--out", str(tmp_path), "--val-fraction", "0.4", "--seed", "3"]) == 0
    datalist = tmp_path / f"{task.name}_datalist.json"
    content = json.loads(datalist.read_text())
    assert len(content["training"]) == 3 and len(content["validation"]) == 2
    assert content["split"]["seed"] == 3 and len(content["split"]["validation_cases"]) == 2
    # the same seed gives the same split; another seed another split (recorded)
    assert _run("data_prep/msd.py", ["--task", str(task), "--out", str(tmp_path / "again"), "--val-fraction", "0.4", "--seed", "3"]) == 0
    again = json.loads((tmp_path / "again" / f"{task.name}_datalist.json").read_text())
    assert again["split"]["validation_cases"] == content["split"]["validation_cases"]

    num_classes = 4 if channels > 1 else 2
    extra = ["--model.init_args.in_channels", str(channels), "--data.init_args.num_classes", str(num_classes),
             "--data.init_args.spacing", "[2.0, 2.0, 2.0]", "--data.init_args.roi_size", "[16, 16, 16]"]
    if channels > 1:
        extra += ["--data.init_args.intensity", "mri"]
    base = ["--config", str(FT_CONFIG), "--data.init_args.datalist", str(datalist), *extra]
    run = tmp_path / "run"
    assert main(["finetune", *base, "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
                 "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
                 "--trainer.enable_progress_bar", "false"]) == 0
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert main(["evaluate", *base, "--ckpt_path", ckpt, "--out", str(tmp_path / "eval")]) == 0
    header = (tmp_path / "eval" / "dice_per_case.csv").read_text().splitlines()[0].split(",")
    assert header[1:-1] == [content["labels"][str(i)] for i in range(1, num_classes)]
    assert main(["predict", *base, "--ckpt_path", ckpt, "--input", str(task / "imagesTs"), "--out", str(tmp_path / "pred")]) == 0
    original = nib.load(task / "imagesTs" / "case_005.nii.gz")
    seg = nib.load(tmp_path / "pred" / "case_005_seg.nii.gz")
    assert seg.shape == original.shape[:3] and np.allclose(seg.affine, original.affine)


def _encoder_file(tmp_path, **backbone_kwargs):
    from spark3d.train import SparKPretrain

    module = SparKPretrain(backbone="segresnet", backbone_kwargs=backbone_kwargs, input_size=(32, 32, 32), decoder_width=16)
    for p in module.model.encoder.network.parameters():
        p.data.normal_(0, 0.3)
    path = tmp_path / f"encoder_{backbone_kwargs.get('init_filters', 0)}.pt"
    module.save_encoder(path)
    return path


def test_pretrained_encoder_loads_exactly_and_mismatch_fails(tmp_path):
    from spark3d.checkpoint import CheckpointError as PretrainedMismatch
    from spark3d.train import SegmentationModule

    path = _encoder_file(tmp_path, init_filters=8, blocks_down=[1, 2, 2, 2])
    saved = torch.load(path, weights_only=True)["state_dict"]
    kwargs = dict(backbone="segresnet", backbone_kwargs={"init_filters": 8, "blocks_down": [1, 2, 2, 2]}, roi_size=(32, 32, 32))
    scratch = SegmentationModule(**kwargs)
    module = SegmentationModule(**kwargs, pretrained=str(path))
    assert module.pretrained_report["matched"] == len(saved) > 20
    net_state = module.network.state_dict()
    for key, value in saved.items():
        assert torch.equal(net_state[key], value)
        assert not torch.equal(scratch.network.state_dict()[key], value) or value.numel() < 2 or key.endswith("num_batches_tracked")
    # decoder weights are untouched (not in the file)
    assert "conv_final.2.conv.weight" not in saved

    with pytest.raises(PretrainedMismatch, match="other shapes"):
        SegmentationModule(backbone="segresnet", backbone_kwargs={"init_filters": 16, "blocks_down": [1, 2, 2, 2]},
                           pretrained=str(path))
    with pytest.raises(PretrainedMismatch, match="pretrained with backbone='segresnet'"):
        SegmentationModule(backbone="dynunet", pretrained=str(path))
    torch.save({"state_dict": {"nothing.weight": torch.zeros(1)}, "meta": {}}, tmp_path / "foreign.pt")
    with pytest.raises(PretrainedMismatch, match="matches none"):
        SegmentationModule(**kwargs, pretrained=str(tmp_path / "foreign.pt"))


def test_resnet_encoder_loads_into_flexible_unet(tmp_path):
    from spark3d.encoders import from_monai
    from spark3d.train import SegmentationModule

    enc = from_monai("resnet10", spatial_dims=3, in_channels=1)
    for p in enc.network.parameters():
        p.data.normal_()
    torch.save({"state_dict": enc.dense_state_dict(), "meta": {"backbone": "resnet10", "spatial_dims": 3, "in_channels": 1}},
               tmp_path / "r10.pt")
    module = SegmentationModule(backbone="resnet10", pretrained=str(tmp_path / "r10.pt"), roi_size=(64, 64, 64))
    assert type(module.network).__name__ == "FlexibleUNet"
    for key, value in enc.dense_state_dict().items():
        assert torch.equal(module.network.encoder.state_dict()[key], value)


@pytest.mark.parametrize("problem", ["shape", "missing_label", "label_range"])
def test_btcv_prep_bad_pairs_named_nothing_written(btcv_raw, tmp_path, capsys, problem):
    import shutil

    raw = tmp_path / "RawData"
    shutil.copytree(btcv_raw, raw)
    victim = raw / "Training/label/label0021.nii.gz"
    if problem == "shape":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), victim)
    elif problem == "missing_label":
        victim.unlink()
    else:
        lab = nib.load(victim)
        data = np.asanyarray(lab.dataobj).copy()
        data[0, 0, 0] = 20
        nib.save(nib.Nifti1Image(data, lab.affine), victim)
    out = tmp_path / "out"
    assert _run("data_prep/btcv.py", ["--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "label0021" in err
    assert {"shape": "has shape", "missing_label": "does not exist", "label_range": "expected integers 0..13"}[problem] in err
    assert not (out / "dataset_0.json").exists()


def test_finetune_without_validation_cases_is_refused(btcv_raw, tmp_path, capsys):
    assert _run("data_prep/btcv.py", ["--raw", str(btcv_raw), "--out", str(tmp_path)]) == 0
    content = json.loads((tmp_path / "dataset_0.json").read_text())
    content["validation"] = []
    (tmp_path / "noval.json").write_text(json.dumps(content))
    run = tmp_path / "run"
    assert main(["finetune", *_ft_args(tmp_path / "noval.json", run, "--trainer.max_steps", "1")]) == 2
    assert "no 'validation' cases" in capsys.readouterr().err
    assert not run.exists()


def test_timm_resnet_encoder_gets_a_monai_unet_decoder(tmp_path):
    """2D: a SparK-pretrained timm ResNet loads by key into a FlexibleUNet encoder and segments."""
    from spark3d import SparK
    from spark3d.encoders import from_timm
    from spark3d.backbones import BackboneSpec
    from spark3d.networks import encoder_module_of
    from spark3d.train import SegmentationModule

    spark = SparK(from_timm("resnet18"), (64, 64), decoder_width=32)
    for p in spark.encoder.network.parameters():
        p.data.normal_(0, 0.05)
    state = spark.encoder_state_dict()
    path = tmp_path / "timm_r18.pt"
    torch.save({"state_dict": state, "meta": {"backbone": "resnet18", "spatial_dims": 2, "in_channels": 3}}, path)
    module = SegmentationModule(backbone="resnet18", source="timm", spatial_dims=2, in_channels=3, num_classes=3,
                                roi_size=(64, 64), pretrained=str(path))
    assert type(module.network).__name__ == "FlexibleUNet"
    target, prefix = encoder_module_of(module.network, BackboneSpec("resnet18", "timm", 2, 3))
    assert prefix == "encoder.network." and module.pretrained_report["matched"] == len(state)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value)
    assert module(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)

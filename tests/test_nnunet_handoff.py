"""The hand-off to nnU-Net, against nnU-Net itself: a fake raw dataset → nnUNetv2_plan_and_preprocess (ResEnc-L
planner, CPU) → spark3d's plan-style preprocessing equals nnU-Net's arrays → spark3d pretrain on the plan's network
reading the raw folder → spark3d export-nnunet → nnU-Net's load_pretrained_weights into nnUNetTrainer's network and
one train_step. Refusals are one line, exit code 2, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import nnunetv2  # noqa: F401  (the dev extra installs it: the hand-off is tested against nnU-Net itself, never skipped)
from spark3d.checkpoint import write_encoder
from spark3d.cli import main
from spark3d.data import CTPretrainData
from spark3d.data.store import open_store
from spark3d.data.nnunet_prep import PlanPreprocessing, nnunet_raw_datalist, preprocess_case
from spark3d.encoders import from_nnunet
from spark3d.errors import ConfigError

CONFIG = Path(__file__).parents[1] / "configs" / "pretrain" / "nnunet_plan.yaml"
DATASET = "Dataset501_Handoff"
Z_SPACINGS = (2.0, 2.5, 3.0)  # unequal: nnU-Net resamples every case to the median, spark3d must too
SMALL = {"features_per_stage": [4, 8, 8, 8]}  # the network kept small through the plan itself


def _write_raw(root: Path) -> Path:
    """Three CT-like labelled cases (air around a body, an organ) of (x, y, z) 48 × 40 × 20 and one test case."""
    import nibabel as nib

    folder = root / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    shape = np.array([48, 40, 20])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    for i, dz in enumerate((*Z_SPACINGS, 2.0)):
        image = rng.normal(-950, 20, shape).astype(np.float32)
        body = (((grid - shape[:, None, None, None] / 2) / (shape[:, None, None, None] * 0.42)) ** 2).sum(0) < 1
        image[body] = rng.normal(40, 25, body.sum())
        centre = shape // 2 + rng.integers(-3, 4, 3)
        organ = ((grid - centre[:, None, None, None]) ** 2).sum(0) < 30
        image[organ] = rng.normal(160, 15, organ.sum())
        affine = np.diag([1.5, 1.5, dz, 1.0])
        split, name = ("imagesTs", f"test{i:03d}") if i == 3 else ("imagesTr", f"case{i:03d}")
        nib.save(nib.Nifti1Image(image, affine), folder / split / f"{name}_0000.nii.gz")
        if split == "imagesTr":
            nib.save(nib.Nifti1Image(organ.astype(np.uint8), affine), folder / "labelsTr" / f"{name}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                     "organ": 1}, "numTraining": 3, "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """nnU-Net's own planning and preprocessing of the fake dataset (run once for the module)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}
    raw = _write_raw(root / "raw")
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tool = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    done = subprocess.run([str(tool), "-d", "501", "-pl", "nnUNetPlannerResEncL", "-c", "3d_fullres", "-np", "1",
                           "-npfp", "1"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    plans = root / "preprocessed" / DATASET / "nnUNetResEncUNetLPlans.json"
    content = json.loads(plans.read_text())
    content["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"].update(SMALL)  # small through the plan
    plans.write_text(json.dumps(content, indent=1))
    yield {"root": root, "raw": raw, "plans": plans, "content": content}
    for k, v in before.items():  # the environment as it was
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _nnunet_case(planned, case: str) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's preprocessed image and segmentation of a case (its blosc2 files)."""
    import blosc2

    folder = planned["root"] / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    return (blosc2.open(str(folder / f"{case}.b2nd"), mode="r")[:],
            blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")[:])


def test_plan_network_is_the_one_get_network_from_plans_builds(planned):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = planned["content"]["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    ours = from_nnunet(plans=str(planned["plans"]), configuration="3d_fullres", in_channels=1).network
    torch.manual_seed(0)
    theirs = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 2,
                                    allow_init=True, deep_supervision=False)
    assert type(ours) is type(theirs) and repr(ours) == repr(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in b)  # same kwargs, same init, same draws


def test_store_of_the_plan_equals_nnunets_preprocessed_arrays(planned, tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    plan = PlanPreprocessing.from_plans(planned["plans"])
    assert plan.spacing == tuple(planned["content"]["configurations"]["3d_fullres"]["spacing"])
    config["data"]["init_args"].update(plans=str(planned["plans"]), roi_size=list(plan.patch_size))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    store = tmp_path / "store"
    assert main(["preprocess", "--config", str(path), "--out", str(store), "--no-progress",
                 "--data.init_args.datalist", str(planned["raw"])]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["settings"]["plan"]["transpose_forward"] == planned["content"]["transpose_forward"]
    assert manifest["settings"]["plan"]["normalization_schemes"] == ["CTNormalization"]
    records = {Path(r["source"]).name.split("_")[0]: r for r in manifest["volumes"].values()}
    assert sorted(records) == ["case000", "case001", "case002", "test003"]  # imagesTr and imagesTs, labels ignored
    shapes = set()
    for case in ("case000", "case001", "case002"):
        ours = np.load(store / records[case]["file"], allow_pickle=False).astype(np.float32)
        theirs, _ = _nnunet_case(planned, case)
        assert ours.shape == theirs.shape
        shapes.add(ours.shape)
        # float16 storage: within half a float16 step of nnU-Net's float32 value
        assert np.all(np.abs(ours - theirs) <= np.abs(theirs) * 2.0 ** -11 + 2.0 ** -24)
        exact, _ = preprocess_case(nnunet_raw_datalist(planned["raw"])[int(case[-1])]["image"], plan)
        assert np.array_equal(exact, theirs)  # before the float16 storage: nnU-Net's array exactly
    assert len(shapes) == 3  # the cases were resampled to one spacing from three
    data = CTPretrainData(datalist=str(planned["raw"]), plans=str(planned["plans"]), spacing=None, intensity_range=None,
                          roi_size=plan.patch_size)
    open_store(store).check_agrees(data.store_settings(), None)  # pretraining from the store takes it as the plan's


def test_pretrain_export_and_nnunet_fine_tunes_from_it(planned, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    content = planned["content"]
    patch = content["configurations"]["3d_fullres"]["patch_size"]
    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["init_args"].update(backbone_kwargs={"plans": str(planned["plans"]), "configuration": "3d_fullres"},
                                        decoder_width=16)
    config["data"]["init_args"].update(plans=str(planned["plans"]), roi_size=patch, batch_size=1, num_samples=1,
                                       cache="none", num_workers=0)
    config["trainer"].update(precision="32-true", accelerator="cpu", devices=1)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(path), "--data.init_args.datalist", str(planned["raw"]),
                 "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
                 "--trainer.enable_progress_bar", "false", "--model.init_args.figure_every_n_epochs", "100"]) == 0
    encoder = torch.load(run / "encoder.pt", weights_only=True)
    assert encoder["meta"]["spacing"] == content["configurations"]["3d_fullres"]["spacing"]
    out = tmp_path / "pretrained.pth"
    assert main(["export-nnunet", "--encoder", str(run / "encoder.pt"), "--plans", str(planned["plans"]),
                 "--configuration", "3d_fullres", "--out", str(out)]) == 0
    exported = torch.load(out, weights_only=True)  # nnU-Net master / nnssl read it weights-only
    assert set(exported) == {"network_weights", "nnssl_adaptation_plan"}
    assert exported["nnssl_adaptation_plan"]["key_to_encoder"] == "encoder.stages"

    plans = json.loads(planned["plans"].read_text())
    plans["continue_training"] = False  # run_training sets it; the trainer pops it
    dataset_json = json.loads((planned["raw"] / "dataset.json").read_text())
    trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.enable_deep_supervision = False  # one output, one target
    trainer.initialize()
    load_pretrained_weights(trainer.network, str(out))  # 2.8.1's loader (weights_only=False inside)
    own = trainer.network.state_dict()
    stem_and_stages = [k for k in encoder["state_dict"] if k.startswith(("encoder.stem.", "encoder.stages."))]
    assert stem_and_stages and all(torch.equal(own[k], v) for k, v in encoder["state_dict"].items())
    image, seg = _nnunet_case(planned, "case000")
    crop = tuple(slice(0, min(p, s)) for p, s in zip(patch, image.shape[1:]))
    pad = [(0, 0)] + [(0, p - (c.stop - c.start)) for p, c in zip(patch, crop)]
    x = np.pad(image[(slice(None), *crop)], pad)[None]
    y = np.pad(np.maximum(seg[(slice(None), *crop)], 0), pad)[None]
    result = trainer.train_step({"data": torch.from_numpy(x).float(), "target": torch.from_numpy(y).long()})
    assert np.isfinite(result["loss"])


def _refusal(capsys, argv, out):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not out.exists()
    return err[0]


def test_export_refuses_other_networks_channels_and_files(planned, tmp_path, capsys):
    plans = str(planned["plans"])
    out = tmp_path / "x.pth"
    args = ["export-nnunet", "--plans", plans, "--configuration", "3d_fullres", "--out", str(out), "--encoder"]
    meta = {"backbone": "resenc_l", "source": "nnunet", "spatial_dims": 3, "in_channels": 1}
    other = from_nnunet("resenc_l", in_channels=1, probe_size=(16, 32, 32), features_per_stage=[4, 16, 8, 8],
                        strides=[1, 2, 2, [1, 2, 2]], n_blocks_per_stage=[1, 3, 4, 6])
    write_encoder(tmp_path / "other.pt", other.dense_state_dict(), meta)
    line = _refusal(capsys, args + [str(tmp_path / "other.pt")], out)
    assert "another network" in line and "encoder.stages.1" in line  # stage 0 alike (4 features), stage 1 not
    plan_net = from_nnunet(plans=plans, in_channels=1)
    write_encoder(tmp_path / "two.pt", plan_net.dense_state_dict(), {**meta, "in_channels": 2})
    assert "2 input channel(s)" in _refusal(capsys, args + [str(tmp_path / "two.pt")], out)
    torch.save({"network_weights": {}}, tmp_path / "foreign.pt")
    assert "not a spark3d encoder.pt" in _refusal(capsys, args + [str(tmp_path / "foreign.pt")], out)
    write_encoder(tmp_path / "ok.pt", plan_net.dense_state_dict(), {**meta, "strides": [list(s) for s in plan_net.strides]})
    assert main(args + [str(tmp_path / "ok.pt")]) == 0 and out.is_file()  # the plan's own network goes through


def test_a_plan_that_is_not_ct_normalised_is_refused(planned, tmp_path):
    content = json.loads(planned["plans"].read_text())
    content["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]
    path = tmp_path / "mri_plans.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match="normalises channel 0 with ZScoreNormalization") as err:
        CTPretrainData(datalist=str(planned["raw"]), plans=str(path), spacing=None, intensity_range=None)
    assert "\n" not in str(err.value)


def test_raw_dataset_folder_gives_every_case_with_its_channels_stacked(tmp_path):
    import nibabel as nib

    from spark3d.errors import DataError

    folder = tmp_path / "Dataset502_TwoChannel"
    rng = np.random.default_rng(1)
    for sub, cases in (("imagesTr", ("a", "b")), ("imagesTs", ("c",))):
        (folder / sub).mkdir(parents=True)
        for case in cases:
            for channel in range(2):
                volume = rng.normal(100 * channel, 10, (16, 12, 8)).astype(np.float32)
                nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / sub / f"{case}_{channel:04d}.nii.gz")
    (folder / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((16, 12, 8), np.uint8), np.eye(4)), folder / "labelsTr" / "a.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "CT"}, "file_ending": ".nii.gz",
                                                     "labels": {"background": 0, "x": 1}, "numTraining": 2}))
    entries = nnunet_raw_datalist(folder)
    assert [[Path(f).name for f in e["image"]] for e in entries] == [
        ["a_0000.nii.gz", "a_0001.nii.gz"], ["b_0000.nii.gz", "b_0001.nii.gz"], ["c_0000.nii.gz", "c_0001.nii.gz"]]
    data = CTPretrainData(datalist=str(folder), roi_size=(8, 8, 8), channels=2, spacing=None, cache="none")
    train, _ = data.source_files()  # the folder read as the datalist, each channel file checked
    assert train == entries
    image = data.preprocess()(train[0])["image"]
    assert image.shape[0] == 2 and float(image[1].mean()) > float(image[0].mean())  # channel order kept
    (folder / "imagesTs" / "c_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case c has no channel file\(s\) c_0001.nii.gz"):
        nnunet_raw_datalist(folder)

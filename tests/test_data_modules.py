"""CT and image-folder data modules on real files written here."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from spark3d.data import CTPretrainData, DataError, ImageFolderData


def _write(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.fixture
def ct_files(tmp_path):
    """int16 HU volumes: non-RAS affine (LPS, axes permuted), anisotropic spacing, one smaller than the ROI."""
    vol = np.full((40, 30, 12), -1000, np.int16)  # axes: A→P? see affine below
    vol[5:35, 5:25, 2:10] = 40  # body
    vol[5:12, 5:25, 2:10] = 300  # a bright slab at low i
    # i runs posterior→anterior (+y) at 1 mm, j runs right→left (−x) at 1.2 mm, k superior at 4 mm
    affine = np.array([[0, -1.2, 0, 0], [1.0, 0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1]])
    _write(tmp_path / "big.nii.gz", vol, affine)
    small = np.full((10, 8, 3), 100, np.int16)
    small[:, :, 0] = 60  # not constant: a constant volume is refused as data
    _write(tmp_path / "small.nii.gz", small, np.diag([2.0, 2.0, 5.0, 1]))
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "big.nii.gz"}, {"image": "small.nii.gz"}],
                                                    "validation": [{"image": "big.nii.gz"}]}))
    return tmp_path


def test_ct_preprocessing_ras_spacing_window(ct_files):
    dm = CTPretrainData(str(ct_files / "list.json"), roi_size=(16, 16, 16), spacing=(2.0, 2.0, 2.0),
                        intensity_range=(-100.0, 400.0), num_workers=0, cache="none")
    dm.validate()
    out = dm.preprocess()({"image": str(ct_files / "big.nii.gz")})
    img = out["image"]
    assert img.dtype == torch.float32 and float(img.min()) >= 0 and float(img.max()) <= 1
    # body 30 (i, posterior→anterior, 1 mm) × 20 (j, 1.2 mm) × 8 (k, 4 mm) voxels -> RAS at 2 mm:
    # x (right) extent 24 mm = 12 voxels, y 30 mm = 15, z 32 mm = 16 (+margin 2 each side)
    expected = (12 + 4, 15 + 4, 16 + 4)  # resampling may round an edge slice either way
    assert all(abs(a - b) <= 1 for a, b in zip(img.shape[1:], expected)), img.shape
    # the bright slab sat at the posterior side (low i): in RAS it is at low y
    profile = img[0].mean(dim=(0, 2))
    assert profile[: len(profile) // 2].mean() > profile[len(profile) // 2 :].mean()
    # HU 40 windowed to (40 + 100) / 500
    assert torch.isclose(img[0, 8, -5, 10], torch.tensor(140 / 500), atol=0.02)


def test_ct_data_module_crops_and_pads(ct_files):
    dm = CTPretrainData(str(ct_files / "list.json"), roi_size=(16, 16, 16), num_samples=3, batch_size=2,
                        spacing=(2.0, 2.0, 2.0), num_workers=0, cache="ram")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 1, 16, 16, 16)  # 2 volumes × 3 crops, the small one padded
    assert type(batch["image"]) is torch.Tensor
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[1:] == (1, 16, 16, 16)
    assert dm.metadata()["spacing"] == (2.0, 2.0, 2.0)


def test_ct_folder_source(ct_files):
    dm = CTPretrainData(str(ct_files), roi_size=(8, 8, 8), spacing=None, num_workers=0)
    dm.validate()
    assert len(dm.train_files) == 2 and dm.val_files == []


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("corrupt", "cannot read"),
    ("flat", "expected a 3D volume"),
    ("empty", "no 'training' cases"),
])
def test_ct_bad_inputs_name_the_culprit(tmp_path, case, match):
    entries = []
    if case == "missing":
        entries = [{"image": "nowhere.nii.gz"}]
    elif case == "corrupt":
        (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
        entries = [{"image": "bad.nii.gz"}]
    elif case == "flat":
        _write(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.int16), np.eye(4))
        entries = [{"image": "flat.nii.gz"}]
    (tmp_path / "list.json").write_text(json.dumps({"training": entries}))
    dm = CTPretrainData(str(tmp_path / "list.json"), roi_size=(8, 8, 8), num_workers=0)
    with pytest.raises(DataError, match=match) as err:
        dm.validate()
    if case != "empty":
        assert entries[0]["image"] in str(err.value)


def test_truncated_nifti_fails_at_load_with_its_name(tmp_path):
    good = tmp_path / "v.nii.gz"
    _write(good, np.zeros((16, 16, 16), np.int16), np.eye(4))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "v.nii.gz"}]}))
    dm = CTPretrainData(str(tmp_path / "list.json"), roi_size=(8, 8, 8), num_workers=0, cache="ram")
    with pytest.raises(DataError, match="v.nii.gz"):
        dm.validate()
        dm.setup("fit")


def test_image_folder_module(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "cats").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "cats" / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (64, 48), dtype=np.uint8)).save(tmp_path / "flat.jpg")  # grey JPEG
    dm = ImageFolderData(str(tmp_path), roi_size=(32, 32), batch_size=2, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_files) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    # ImageNet normalisation: a uniform-noise image has values well below 0 and above 1 after it
    assert batch["image"].min() < -1.0 and batch["image"].max() > 1.5
    (tmp_path / "broken.png").write_bytes(b"not a png")
    dm2 = ImageFolderData(str(tmp_path), roi_size=(32, 32), batch_size=1, num_workers=0)
    dm2.setup("fit")
    idx = [str(f) for f in dm2.train_ds.files].index(str(tmp_path / "broken.png"))
    with pytest.raises(DataError, match="broken.png"):
        dm2.train_ds[idx]
    with pytest.raises(DataError, match="holds no images"):
        ImageFolderData(str(tmp_path / "cats" / "none"), num_workers=0).validate() if (tmp_path / "cats" / "none").mkdir() is None else None


def test_ram_cache_holds_preprocessed_volumes(ct_files):
    dm = CTPretrainData(str(ct_files / "list.json"), roi_size=(16, 16, 16), spacing=(2.0, 2.0, 2.0), num_workers=0)
    dm.setup("fit")
    cached = dm.train_ds._cache[0]["image"]
    assert isinstance(cached, torch.Tensor) and cached.ndim == 4 and float(cached.max()) <= 1.0

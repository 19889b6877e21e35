import json

import nibabel as nib
import numpy as np

from spark3d.data.datasets import BTCV_LABELS
from spark3d.data.phantoms import make_phantom, write_btcv_phantoms


def test_phantom_is_deterministic_and_labelled():
    a_hu, a_lab, a_aff = make_phantom(7, shape=(64, 64, 32))
    b_hu, b_lab, b_aff = make_phantom(7, shape=(64, 64, 32))
    c_hu, _, _ = make_phantom(8, shape=(64, 64, 32))
    assert np.array_equal(a_hu, b_hu) and np.array_equal(a_lab, b_lab) and np.array_equal(a_aff, b_aff)
    assert not np.array_equal(a_hu, c_hu)
    assert a_hu.dtype == np.int16 and a_lab.dtype == np.uint8
    assert set(np.unique(a_lab)) == set(range(14))  # background and all 13 organs
    # HU plausibility: air outside, fat below water, contrast-enhanced aorta bright, liver soft tissue
    assert np.median(a_hu[:3, :3, :]) < -900
    assert 150 < np.median(a_hu[a_lab == 8]) < 260
    assert 30 < np.median(a_hu[a_lab == 6]) < 90
    # anisotropic spacing, LPS storage (negative x/y in the affine)
    sx, sy, sz = np.abs(np.diag(a_aff)[:3])
    assert sz > sx and a_aff[0, 0] < 0 and a_aff[1, 1] < 0


def test_liver_on_the_patient_right_in_world_coordinates():
    hu, lab, aff = make_phantom(1)
    ijk = np.argwhere(lab == 6).mean(0)
    world = aff[:3, :3] @ ijk + aff[:3, 3]
    assert world[0] > 20  # RAS: +x is the patient's right
    spleen = aff[:3, :3] @ np.argwhere(lab == 1).mean(0) + aff[:3, 3]
    assert spleen[0] < -20


def test_btcv_layout_and_datalist(tmp_path):
    path = write_btcv_phantoms(tmp_path, n_train=3, n_val=1, n_test=1, shape=(48, 48, 24), seed=2)
    assert (tmp_path / "RawData/Training/img/img0001.nii.gz").is_file()
    assert (tmp_path / "RawData/Training/label/label0004.nii.gz").is_file()
    assert (tmp_path / "RawData/Testing/img/img0061.nii.gz").is_file()
    datalist = json.loads(path.read_text())
    assert len(datalist["training"]) == 3 and len(datalist["validation"]) == 1 and len(datalist["test"]) == 1
    assert datalist["labels"]["6"] == "liver" and len(datalist["labels"]) == len(BTCV_LABELS) == 14
    img = nib.load(tmp_path / datalist["training"][0]["image"])
    lab = nib.load(tmp_path / datalist["training"][0]["label"])
    assert img.shape == lab.shape == (48, 48, 24)
    assert np.allclose(img.affine, lab.affine)
    assert img.get_data_dtype() == np.int16

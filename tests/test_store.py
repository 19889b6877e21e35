"""The CT store: equal to the MONAI chain, resumable after a kill, shardable, read by pretraining, safe to open."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai import transforms as mt

from spark3d.cli import main
from spark3d.data import CTPretrainData, DataError
from spark3d.data.phantoms import write_btcv_phantoms
from spark3d.data.store import (StoreSettings, StoreVolume, check_preprocessed_volume, merge_shards, open_store,
                                open_volume, write_store)
from spark3d.data.store_dataset import StoreCropDataset, read_crop
from spark3d.data.transforms import ct_preprocess

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "pretrain" / "demo_ct.yaml"
_DEMO = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]
SETTINGS = StoreSettings(spacing=tuple(_DEMO["spacing"]), intensity_range=tuple(_DEMO["intensity_range"]))  # the demo's
N_TRAIN, N_VAL = 7, 1


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_btcv_phantoms(tmp_path_factory.mktemp("phantoms"), n_train=N_TRAIN, n_val=N_VAL, n_test=0,
                               shape=(64, 64, 32), seed=3)


def _splits(datalist):
    content = json.loads(Path(datalist).read_text())
    return {name: [str(Path(datalist).parent / e["image"]) for e in content[name]] for name in ("training", "validation")}


@pytest.fixture(scope="module")
def store(phantoms, tmp_path_factory):
    """An uninterrupted, unsharded store of the phantoms (the reference of the tests below)."""
    out = tmp_path_factory.mktemp("store") / "store"
    write_store(_splits(phantoms), out, SETTINGS, str(phantoms))
    return out


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_store_holds_the_monai_chain_output_with_its_affine_and_spacing(phantoms, store):
    manifest = json.loads((store / "manifest.json").read_text())
    sources = _splits(phantoms)
    assert [manifest["volumes"][v]["source"] for v in manifest["splits"]["training"]] == sources["training"]
    chain = ct_preprocess(("image",), SETTINGS.spacing, SETTINGS.intensity_range, None, track_meta=True)
    for record in manifest["volumes"].values():
        expected = chain({"image": record["source"]})["image"]
        stored = np.load(store / record["file"], allow_pickle=False)
        assert stored.dtype == np.float16 and stored.shape == tuple(expected.shape)
        assert np.abs(stored.astype(np.float32) - expected.numpy()).max() <= 2.5e-4  # float16 rounding of [0, 1]
        assert np.allclose(record["affine"], expected.affine.numpy(), atol=1e-5)
        assert np.allclose(record["spacing"], SETTINGS.spacing, atol=1e-5)


def test_manifest_affine_maps_store_voxels_onto_the_raw_voxels(phantoms, tmp_path):
    """Independent of MONAI: at native spacing each stored voxel, through the manifest's affine and the raw
    file's inverse affine, lands on an integer raw voxel whose windowed HU it holds."""
    source = _splits(phantoms)["training"][0]
    native = StoreSettings(spacing=None, intensity_range=(-175.0, 250.0))
    write_store({"training": [source]}, tmp_path / "native", native)
    record = next(iter(json.loads((tmp_path / "native" / "manifest.json").read_text())["volumes"].values()))
    raw = nib.load(source)
    assert np.allclose(record["spacing"], np.abs(np.diag(raw.affine)[:3]), atol=1e-5)
    stored = np.load(tmp_path / "native" / record["file"])[0].astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in stored.shape], indexing="ij"), -1).reshape(-1, 3)
    to_raw = np.linalg.inv(raw.affine) @ np.array(record["affine"])
    ijk = grid @ to_raw[:3, :3].T + to_raw[:3, 3]
    assert np.abs(ijk - np.round(ijk)).max() < 1e-3
    hu = np.asarray(raw.dataobj, dtype=np.float32)[tuple(np.round(ijk).astype(int).T)]
    windowed = np.clip((hu + 175.0) / 425.0, 0.0, 1.0)
    assert np.abs(stored.reshape(-1) - windowed).max() <= 2.5e-4


def test_interrupted_preprocess_resumes_without_redoing_and_equals_one_run(phantoms, store, tmp_path, capsys):
    out = tmp_path / "store"
    args = ["preprocess", "--config", str(CONFIG), "--out", str(out), "--data.init_args.datalist", str(phantoms),
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "spark3d.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / "volumes").glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.stem: p.stat().st_mtime_ns for p in (out / "volumes").glob("*.npy")
            if (out / "volumes" / f"{p.stem}.json").is_file()}
    assert 1 <= len(done) < N_TRAIN + N_VAL, "the kill came too late to interrupt anything"
    assert not (out / "manifest.json").exists()

    assert main(args) == 0
    assert f"({N_TRAIN + N_VAL - len(done)} written, {len(done)} already done)" in capsys.readouterr().out
    for vid, mtime in done.items():
        assert (out / "volumes" / f"{vid}.npy").stat().st_mtime_ns == mtime  # not redone
    assert _files(out) == _files(store)  # no .partial left, every byte as in an uninterrupted run


def test_two_shards_and_merge_equal_one_run(phantoms, store, tmp_path):
    out = tmp_path / "sharded"
    write_store(_splits(phantoms), out, SETTINGS, str(phantoms), shard=(1, 2))
    with pytest.raises(DataError, match=r"shards \[0\] of 2 have not finished"):
        merge_shards(out)
    with pytest.raises(DataError, match="run `spark3d preprocess --out .* --merge`"):
        open_store(out)
    counts = write_store(_splits(phantoms), out, SETTINGS, str(phantoms), shard=(0, 2))
    assert counts["volumes"] == (N_TRAIN + N_VAL + 1) // 2
    assert main(["preprocess", "--out", str(out), "--merge"]) == 0
    sharded = {k: v for k, v in _files(out).items() if not k.startswith("manifest-shard-")}
    assert sharded == _files(store)


@pytest.mark.parametrize("hu,other,match", [(-1000, -990, "empty after preprocessing"), (300, 400, "constant volume")])
def test_preprocess_refuses_an_empty_or_constant_volume_in_one_line(tmp_path, capsys, hu, other, match):
    """Not constant as read (that is the data module's own check), but empty or constant in the HU window."""
    volume = np.full((20, 20, 10), hu, np.int16)
    volume[10:, :, :] = other  # both outside the window −175..250: one value after clipping
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "flat.nii.gz")
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "flat.nii.gz"}]}))
    code = main(["preprocess", "--config", str(CONFIG), "--out", str(tmp_path / "s"), "--no-progress",
                 "--data.init_args.datalist", str(tmp_path / "list.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "flat.nii.gz" in err and match in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "s" / "volumes").glob("*.npy"))


@pytest.mark.parametrize("bad,match", [
    (np.full((1, 8, 8), 0.5, np.float32) * np.arange(8), "expected \\(channels, 3 spatial axes\\)"),
    (np.stack([np.linspace(0, 1, 512).reshape(8, 8, 8)] * 2), "2 channels; expected 1"),
    (np.where(np.eye(8)[None, :, :, None] > 0, np.nan, 0.5) * np.ones((1, 8, 8, 8)), "non-finite"),
    (np.full((1, 8, 8, 8), 0.25), "every voxel is 0.25"),
    (np.linspace(0, 1, 64).reshape(1, 8, 8, 1), "single-voxel spatial axis"),
    (np.zeros((1, 8, 0, 8)), "empty after preprocessing"),
])
def test_preprocessed_volume_check_names_what_is_wrong(bad, match):
    with pytest.raises(DataError, match=match):
        check_preprocessed_volume(bad, "vol.nii.gz", spatial_dims=3, channels=1)
    check_preprocessed_volume(np.linspace(0, 1, 512).reshape(1, 8, 8, 8), "vol.nii.gz", 3, 1)


def test_pretraining_from_the_store_runs_through_the_cli(phantoms, store, tmp_path):
    run = tmp_path / "run"
    code = main(["pretrain", "--config", str(CONFIG), "--data.init_args.datalist", str(phantoms),
                 "--data.init_args.store", str(store), "--data.init_args.roi_size", "[32, 32, 32]",
                 "--data.init_args.batch_size", "1", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(run),
                 "--trainer.enable_progress_bar", "false", "--model.init_args.figure_every_n_epochs", "100"])
    assert code == 0 and (run / "encoder.pt").is_file()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


@pytest.mark.parametrize("override,match", [
    ({"spacing": (4.0, 4.0, 4.0)}, "spacing \\[6.0, 6.0, 6.0\\] vs \\[4.0, 4.0, 4.0\\]"),
    ({"intensity_range": (-1000.0, 1000.0)}, "intensity_range"),
    ({"channels": 2}, "channels 1 vs 2"),
    ({"datalist": "/elsewhere/dataset.json"}, "was made from datalist"),
])
def test_config_that_disagrees_with_the_store_is_refused(phantoms, store, override, match):
    kwargs = {"datalist": str(phantoms), "spacing": SETTINGS.spacing, "intensity_range": SETTINGS.intensity_range,
              "store": str(store), "num_workers": 0, **override}
    with pytest.raises(DataError, match=match):
        CTPretrainData(**kwargs).validate()
    CTPretrainData(None, spacing=SETTINGS.spacing, intensity_range=SETTINGS.intensity_range, store=str(store)).validate()


def _epoch_crops(store, seed, rank, world=2, epoch=0):
    torch.manual_seed(seed)
    dm = CTPretrainData(None, roi_size=(16, 16, 16), num_samples=2, batch_size=1, spacing=SETTINGS.spacing,
                        intensity_range=SETTINGS.intensity_range, store=str(store), num_workers=2, intensity_jitter=0.1)
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    crops = torch.cat([batch["image"] for batch in loader])
    keys = list(loader.sampler)
    return crops, dm.train_ds, keys


def test_two_workers_same_crops_for_same_seed_differ_between_ranks(store):
    a, ds, keys = _epoch_crops(store, seed=7, rank=0)
    b, _, _ = _epoch_crops(store, seed=7, rank=0)
    assert a.shape == (len(keys) * 2, 1, 16, 16, 16) and torch.equal(a, b)
    # an item is a function of its key (index, sample seed), the seed and the rank: the main process recomputes
    # what the workers made
    again = torch.cat([torch.stack([c["image"] for c in ds[key]]) for key in keys])
    assert torch.equal(a, again)
    other_rank, ds_rank1, _ = _epoch_crops(store, seed=7, rank=1)
    other_seed, _, _ = _epoch_crops(store, seed=8, rank=0)
    next_epoch, _, _ = _epoch_crops(store, seed=7, rank=0, epoch=1)
    for other in (other_rank, other_seed, next_epoch):
        assert other.shape == a.shape and not torch.equal(other, a)
    # ranks read disjoint volumes (7 training volumes, padded to 8: only the padding repeats)
    files = [{v.path for v in d.volumes} for d in (ds, ds_rank1)]
    assert len(files[0] | files[1]) == N_TRAIN and len(files[0] & files[1]) <= 1


@pytest.mark.parametrize("damage", ["truncated", "pickle", "object_array"])
def test_damaged_volume_is_refused_in_one_line_and_runs_no_code(store, tmp_path, capsys, damage):
    copy = tmp_path / "store"
    for rel, data in _files(store).items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    victim = sorted((copy / "volumes").glob("*.npy"))[2]
    marker = tmp_path / "pwned"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-1000])
    elif damage == "pickle":
        class Payload:
            def __reduce__(self):
                return os.mkdir, (str(marker),)
        victim.write_bytes(pickle.dumps(Payload()))
    else:
        np.save(victim, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    run = tmp_path / "run"
    code = main(["pretrain", "--config", str(CONFIG), "--data.init_args.store", str(copy), "--data.init_args.datalist", "null",
                 "--data.init_args.roi_size", "[32, 32, 32]", "--trainer.max_steps", "1",
                 "--trainer.default_root_dir", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and victim.name in err[0] and "re-run spark3d preprocess" in err[0]
    assert damage != "pickle" or "never loaded" in err[0]
    assert not marker.exists() and not run.exists()


def test_resume_redoes_a_damaged_volume_only(phantoms, store, tmp_path):
    copy = tmp_path / "store"
    for rel, data in _files(store).items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    victim = sorted((copy / "volumes").glob("*.npy"))[0]
    victim.write_bytes(pickle.dumps(np.zeros(3)))
    counts = write_store(_splits(phantoms), copy, SETTINGS, str(phantoms))
    assert counts["written"] == 1 and _files(copy) == _files(store)


def test_intensity_jitter_scales_and_shifts_each_crop_within_bounds(store):
    volumes = open_store(store).volumes("training")
    plain = StoreCropDataset(volumes, (16, 16, 16), num_samples=1, flip_prob=0.0)
    jittered = StoreCropDataset(volumes, (16, 16, 16), num_samples=1, flip_prob=0.0, intensity_jitter=0.2)
    fits = []
    for index in range(len(volumes)):
        x, y = plain[(0, index)][0]["image"].flatten().double(), jittered[(0, index)][0]["image"].flatten().double()
        scale, shift = np.polyfit(x.numpy(), y.numpy(), 1)  # same crop position: the first draw precedes the jitter's
        assert torch.allclose(y, scale * x + shift, atol=1e-5)
        fits.append((scale - 1.0, shift))
    fits = np.array(fits)
    assert np.abs(fits).max() <= 0.2 and np.abs(fits).min(axis=0).max() > 0 and len(set(fits[:, 0])) == len(volumes)


_PAGE_READ_JOB = """
import json, sys
from pathlib import Path
import numpy as np
from spark3d.data.store import StoreVolume, open_volume
from spark3d.data.store_dataset import StoreCropDataset, read_crop

def kb(key):
    if key == "VmHWM" and not Path("/proc/self/status").exists():  # not Linux: the peak so far, of this process alone
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1 if sys.platform != "darwin" else 1024)
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))

path = Path(sys.argv[1])
if Path("/proc/self/clear_refs").exists():
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts at the current RSS: imports do not count
before = kb("VmRSS" if Path("/proc/self/status").exists() else "VmHWM")
ds = StoreCropDataset([StoreVolume(path, (1, 1024, 1024, 512))], (32, 32, 32), num_samples=4)
crops = [c["image"] for epoch in range(4) for c in ds[(0, epoch)]]  # volume 0, 4 sample seeds
centre = read_crop(open_volume(path), (690, 490, 290), (32, 32, 32))
print(json.dumps({"crops": len(crops), "centre_sum": float(centre.sum()), "grown_mb": (kb("VmHWM") - before) / 1024}))
"""


def test_a_crop_reads_only_its_bytes_of_a_volume_larger_than_it_could_load(tmp_path):
    path = tmp_path / "huge.npy"  # 1 GiB on paper, a sparse file on disk
    volume = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(1, 1024, 1024, 512))
    volume[0, 700:710, 500:510, 300:310] = 1.0
    del volume
    # a fresh process: its peak resident memory is this reader's alone (every touched page of the memory map
    # counts, as does a copy of the whole volume), not the peak of whatever ran before in the test session
    done = subprocess.run([sys.executable, "-c", _PAGE_READ_JOB, str(path)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["crops"] == 16 and result["centre_sum"] == 1000.0
    assert result["grown_mb"] < 200, f"reading 17 crops of 32³ grew the peak resident memory by {result['grown_mb']:.0f} MB"


def test_crop_reader_equals_monai_pad_crop_and_flip():
    rng = np.random.default_rng(0)
    volume = rng.random((1, 20, 9, 14)).astype(np.float16)  # shorter than the ROI along y
    roi, start, flips = (12, 16, 10), (5, 0, 3), (True, True, False)
    padded = mt.SpatialPad(roi)(torch.from_numpy(volume.astype(np.float32)))
    expected = padded[:, 5:17, :, 3:13]
    for axis, f in enumerate(flips):
        if f:
            expected = mt.Flip(spatial_axis=axis)(expected)
    got = read_crop(volume, start, roi, flips)
    assert got.dtype == torch.float32 and torch.equal(got, torch.as_tensor(np.asarray(expected)))

"""Files never run code: a hostile checkpoint, encoder.pt or cache entry given to any command that loads
one is refused with one line naming it, and its payload (which would create a marker file) never runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spark3d.checkpoint import load_weights_only, write_encoder
from spark3d.cli import main
from spark3d.data.phantoms import write_btcv_phantoms
from spark3d.errors import CheckpointError, UnsafeFileError

REPO = Path(__file__).parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "demo_ct.yaml"
FINETUNE = REPO / "configs" / "finetune" / "demo_ct.yaml"


class RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_btcv_phantoms(tmp_path_factory.mktemp("phantoms"), n_train=2, n_val=1, n_test=1, shape=(40, 40, 20), seed=2)


def _common(config: Path, datalist: Path, run: Path) -> list[str]:
    return ["--config", str(config), "--data.init_args.datalist", str(datalist), "--data.init_args.roi_size",
            "[16, 16, 16]", "--data.init_args.spacing", "[6.0, 6.0, 6.0]", "--trainer.default_root_dir", str(run)]


def _segmentation_checkpoint(path: Path, marker: Path | None) -> Path:
    """A genuine-looking fine-tuning checkpoint (the demo network's weights), plus one pickled payload."""
    from spark3d.train.segment import SegmentationModule

    module = SegmentationModule(backbone_kwargs={"init_filters": 8, "blocks_down": [1, 2, 2, 2]}, roi_size=(16, 16, 16))
    content = {"state_dict": module.state_dict(), "global_step": 0, "epoch": 0, "pytorch-lightning_version": "2.6.0"}
    if marker is not None:
        content["extra"] = RunsCode(marker)
    torch.save(content, path)
    return path


def _assert_refused(code: int, err: str, path: Path, marker: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip() and "Seed set" not in line]
    assert code == 2
    assert not marker.exists(), "the file's code ran"
    assert len(lines) == 1 and str(path) in lines[0] and "posix.system" in lines[0], err


def test_every_command_refuses_a_hostile_checkpoint(phantoms, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = _segmentation_checkpoint(tmp_path / "last.ckpt", marker)  # a real checkpoint with one extra pickled key
    commands = {
        "pretrain": ["pretrain", *_common(PRETRAIN, phantoms, tmp_path / "p"), "--ckpt_path", str(evil)],
        "finetune": ["finetune", *_common(FINETUNE, phantoms, tmp_path / "f"), "--ckpt_path", str(evil)],
        "evaluate": ["evaluate", *_common(FINETUNE, phantoms, tmp_path / "e"), "--ckpt_path", str(evil),
                     "--out", str(tmp_path / "eval")],
        "predict": ["predict", *_common(FINETUNE, phantoms, tmp_path / "q"), "--ckpt_path", str(evil),
                    "--input", str(phantoms.parent / "RawData" / "Testing" / "img"), "--out", str(tmp_path / "pred")],
    }
    for name, argv in commands.items():
        code = main(argv)
        _assert_refused(code, capsys.readouterr().err, evil, marker)
        assert not any((tmp_path / d).exists() for d in ("p", "f", "e", "q", "eval", "pred")), name


def test_finetune_refuses_a_hostile_encoder_in_one_line(phantoms, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "encoder.pt"
    torch.save({"state_dict": {"convInit.conv.weight": torch.zeros(8, 1, 3, 3, 3)}, "meta": {"x": RunsCode(marker)}}, evil)
    code = main(["finetune", *_common(FINETUNE, phantoms, tmp_path / "run"), "--model.init_args.pretrained", str(evil)])
    _assert_refused(code, capsys.readouterr().err, evil, marker)
    assert "Union" not in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_hostile_disk_cache_entry_is_refused(phantoms, tmp_path, capsys):
    from spark3d.data.ct import CTPretrainData

    marker, cache = tmp_path / "MARKER", tmp_path / "cache"
    data = CTPretrainData(str(phantoms), roi_size=(16, 16, 16), spacing=(6.0, 6.0, 6.0), cache="disk", cache_dir=str(cache),
                          num_workers=0, intensity_range=(-175.0, 250.0))
    data.in_channels = 1
    data.setup()
    planted = []
    for ds in (data.train_ds, data.val_ds):  # plant an entry where the cache would look for every case
        for item in ds.data:
            planted.append(ds.cache_file(item))
            planted[-1].parent.mkdir(parents=True, exist_ok=True)
            torch.save({"image": torch.zeros(1, 16, 16, 16), "x": RunsCode(marker)}, planted[-1])
    run = tmp_path / "run"
    code = main(["pretrain", *_common(PRETRAIN, phantoms, run), "--data.init_args.cache", "disk",
                 "--data.init_args.cache_dir", str(cache), "--trainer.max_steps", "1",
                 "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("spark3d pretrain: error")]
    assert code == 2 and not marker.exists()
    assert len(lines) == 1 and "cache entry" in lines[0] and "posix.system" in lines[0] and "Traceback" not in err
    assert any(str(p) in lines[0] for p in planted)
    assert not run.exists(), "a refused fresh run leaves no run folder"


def test_weights_only_loader_names_the_object_for_raw_pickles_and_reads_honest_files(tmp_path):
    import pickle

    marker = tmp_path / "MARKER"
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": {}, "x": RunsCode(marker)}, protocol=4))
    with pytest.raises(UnsafeFileError, match="posix.system"):
        load_weights_only(raw)
    honest = write_encoder(tmp_path / "encoder.pt", {"w": torch.ones(2)}, {"backbone": "segresnet"})
    assert torch.equal(load_weights_only(honest)["state_dict"]["w"], torch.ones(2))
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_weights_only(tmp_path / "text.ckpt")
    assert not marker.exists()

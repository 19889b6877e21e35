"""The encoder.pt format: written once, read weights-only, refused in one line when it does not fit."""

import pytest
import torch

from spark3d.checkpoint import ENCODER_FORMAT, CheckpointError, read_encoder, write_encoder
from spark3d.cli import main
from spark3d.data.phantoms import write_btcv_phantoms
from spark3d.train import SparKPretrain

from pathlib import Path

FT_CONFIG = Path(__file__).parents[1] / "configs" / "finetune" / "demo_ct.yaml"


def test_written_file_has_the_format_version_and_reads_back(tmp_path):
    path = write_encoder(tmp_path / "e.pt", {"w": torch.arange(3.0)}, {"backbone": "segresnet"})
    state, meta = read_encoder(path)
    assert meta["format"] == ENCODER_FORMAT and meta["backbone"] == "segresnet"
    assert torch.equal(state["w"], torch.arange(3.0))
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no leftovers


def test_unknown_format_version_is_refused(tmp_path):
    torch.save({"state_dict": {}, "meta": {"format": "spark3d-encoder-v99"}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 'spark3d-encoder-v99'"):
        read_encoder(tmp_path / "future.pt")


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return write_btcv_phantoms(tmp_path_factory.mktemp("d"), n_train=2, n_val=1, n_test=0, shape=(40, 40, 20), seed=5)


@pytest.mark.parametrize("problem", ["version", "network"])
def test_cli_refuses_an_unfit_encoder_file_in_one_line(tmp_path, capsys, datalist, problem):
    if problem == "version":
        path = tmp_path / "future.pt"
        torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": {"format": "spark3d-encoder-v99"}}, path)
        expected = "has encoder format 'spark3d-encoder-v99'"
    else:
        path = tmp_path / "resnet.pt"
        SparKPretrain(backbone="resnet10", input_size=(32, 32, 32), decoder_width=16).save_encoder(path)
        expected = "was pretrained with backbone='resnet10', but the network has backbone='segresnet'"
    run = tmp_path / "run"
    code = main(["finetune", "--config", str(FT_CONFIG), "--data.init_args.datalist", str(datalist),
                 "--model.init_args.pretrained", str(path), "--trainer.default_root_dir", str(run)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err and "Union" not in err
    assert not run.exists()

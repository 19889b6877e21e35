"""Pretraining writes its reconstruction figures to TensorBoard too: the same pixels as the PNG in figures/."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from spark3d.cli import main
from spark3d.data.phantoms import write_btcv_phantoms

CONFIG = Path(__file__).parents[1] / "configs" / "pretrain" / "demo_ct.yaml"


def test_reconstruction_figure_is_logged_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    datalist = write_btcv_phantoms(tmp_path / "data", n_train=2, n_val=0, n_test=0, shape=(48, 48, 24), seed=4)
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(CONFIG), "--data.init_args.datalist", str(datalist),
                 "--data.init_args.roi_size", "[32, 32, 32]", "--data.init_args.batch_size", "1",
                 "--data.init_args.spacing", "[6.0, 6.0, 6.0]", "--trainer.default_root_dir", str(run),
                 "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0",
                 "--trainer.enable_progress_bar", "false", "--model.init_args.figure_every_n_epochs", "1"]) == 0
    pngs = sorted((run / "figures").glob("*.png"))
    assert pngs
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    assert "reconstruction" in events.Tags()[IMAGES]
    logged = events.Images("reconstruction")
    assert len(logged) == len(pngs)
    tb_rgb = np.asarray(Image.open(io.BytesIO(logged[-1].encoded_image_string)).convert("RGB"))
    png_rgb = np.asarray(Image.open(pngs[-1]).convert("RGB"))
    assert tb_rgb.shape == png_rgb.shape and np.array_equal(tb_rgb, png_rgb)

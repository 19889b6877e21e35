"""benchmarks/label_efficiency.py on a tiny budget: a CSV row for every size, initialisation and seed, and both plots."""

import csv
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "label_efficiency.py"


def test_label_efficiency_writes_every_seed_row_and_the_plots(tmp_path):
    spec = importlib.util.spec_from_file_location("label_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "docs" / "label_eff"
    argv = ["--n", "1", "2", "--seeds", "0", "1", "--steps", "2", "--pretrain-steps", "2", "--roi", "32",
            "--spacing", "8", "--val-cases", "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert module.main(argv) == 0

    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["labelled_volumes"], r["init"], r["seed"]) for r in rows) == sorted(
        (n, init, seed) for n in ("1", "2") for init in ("scratch", "pretrained") for seed in ("0", "1"))
    assert {"liver", "left adrenal gland", "mean_dice"} <= set(rows[0])
    for r in rows:
        assert 0.0 <= float(r["mean_dice"]) <= 1.0 and r["steps"] == "2"
    # each run is its own fine-tuning: scratch runs of different seeds do not share weights
    a, b = (tmp_path / "work" / f"n1_scratch_seed{s}" / "checkpoints" / "last.ckpt" for s in (0, 1))
    assert a.read_bytes() != b.read_bytes()

    for png in (out.with_suffix(".png"), out.with_name(out.name + "_organs.png")):
        image = np.asarray(Image.open(png).convert("RGB"))
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert image.std() > 10  # not a blank canvas

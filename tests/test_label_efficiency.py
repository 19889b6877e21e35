"""benchmarks/label_efficiency.py on a tiny budget: a CSV row for every size, initialisation and seed, and both plots."""

import csv
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spark3d.checkpoint import load_weights_only

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "label_efficiency.py"


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The fine-tuned network's parameters and buffers in a run's last checkpoint (weights-only read)."""
    state = load_weights_only(run / "checkpoints" / "last.ckpt")["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


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
    # each run is its own fine-tuning, seeded: the same seed again (a second study in another folder, the same
    # phantoms and encoder) gives the same weights, another seed other weights — compared tensor by tensor
    again = ["--n", "1", "--seeds", "0", "--steps", "2", "--roi", "32", "--spacing", "8",
             "--encoder", str(tmp_path / "work" / "pretrain" / "encoder.pt"),
             "--datalist", str(tmp_path / "work" / "data" / "dataset.json"),
             "--work", str(tmp_path / "again"), "--out", str(tmp_path / "again" / "label_eff")]
    assert module.main(again) == 0
    seed0, seed1, seed0_again = (weights(tmp_path / work / f"n1_scratch_seed{s}") for work, s in
                                 (("work", 0), ("work", 1), ("again", 0)))
    assert seed0.keys() == seed1.keys() == seed0_again.keys()
    assert all(torch.equal(seed0[k], seed0_again[k]) for k in seed0)
    differing = [k for k in seed0 if not torch.equal(seed0[k], seed1[k])]
    assert len(differing) > len(seed0) // 2, f"only {len(differing)} of {len(seed0)} tensors differ between seeds"
    pretrained, pretrained_again = (weights(tmp_path / w / "n1_pretrained_seed0") for w in ("work", "again"))
    assert all(torch.equal(pretrained[k], pretrained_again[k]) for k in pretrained)

    for png in (out.with_suffix(".png"), out.with_name(out.name + "_organs.png")):
        image = np.asarray(Image.open(png).convert("RGB"))
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert image.std() > 10  # not a blank canvas

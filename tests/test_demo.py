"""``spark3d demo`` runs end to end (phantoms → pretraining → fine-tuning → Dice → predictions → bundle), and
``--compare`` records in demo.json the same pretrained-vs-scratch difference it prints, from a scratch run that
really had no pretrained encoder."""

import json

import yaml

from spark3d.cli import main


def test_demo_compare_records_in_demo_json_the_difference_it_prints(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-steps", "2", "--compare"]) == 0
    printed = capsys.readouterr().out

    demo = json.loads((out / "demo.json").read_text())
    compare = demo["compare"]
    assert compare["pretrained_mean_dice"] == demo["mean_dice"]
    assert compare["difference"] == compare["pretrained_mean_dice"] - compare["scratch_mean_dice"]
    scratch = json.loads((out / "evaluate_scratch" / "summary.json").read_text())
    assert compare["scratch_mean_dice"] == scratch["mean_dice"]
    assert compare["scratch_per_organ_dice"] == {organ: v["mean"] for organ, v in scratch["per_organ"].items()}
    assert "scratch comparison" in demo["stages_s"]

    lines = [line for line in printed.splitlines() if line.startswith("pretrained vs from scratch")]
    assert len(lines) == 1 and f"{compare['difference']:+.3f}" in lines[0]

    pretrained_run = yaml.safe_load((out / "finetune" / "config.yaml").read_text())
    scratch_run = yaml.safe_load((out / "finetune_scratch" / "config.yaml").read_text())
    assert pretrained_run["model"]["init_args"]["pretrained"] == str(out / "pretrain" / "encoder.pt")
    assert scratch_run["model"]["init_args"]["pretrained"] is None

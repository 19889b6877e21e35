"""The README's result tables are what their committed JSON files in docs/results/ render (benchmarks/readme_tables.py),
and the check notices a table that drifts from its file."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)
README = (ROOT / "README.md").read_text()


def test_every_readme_table_equals_what_its_json_renders():
    stale = tables.differing(README)
    assert not stale, f"README table block(s) {stale} differ from docs/results: run python benchmarks/readme_tables.py"


def test_the_readme_marks_every_result_table():
    assert {"demo", "data_throughput", "perf_encoder", "perf_step", "probe"} <= set(tables.blocks(README))


def test_every_result_file_records_its_command_machine_and_versions():
    files = sorted((ROOT / "docs" / "results").glob("*.json"))
    assert files
    for path in files:
        prov = json.loads(path.read_text())["provenance"]
        assert prov["command"].split()[0] in ("spark3d", "python"), path.name
        assert prov["date"] and prov["git"]["commit"], path.name
        assert {"cpu_model", "cpu_count", "threads", "load_average"} <= set(prov["machine"]), path.name
        assert {"torch", "timm", "monai", "pytorch-lightning"} <= set(prov["versions"]), path.name


def test_a_figure_changed_in_a_json_makes_its_table_stale(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "docs" / "results", results)
    shutil.copy(ROOT / "docs" / "probe.json", tmp_path / "probe.json")
    readme = tables.rewrite(README, results)  # the README as these copies render it
    assert tables.differing(readme, results) == []
    probe = json.loads((tmp_path / "probe.json").read_text())
    probe["results"]["probe"]["scratch"][0] += 0.1  # one seed's Dice
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    assert tables.differing(readme, results) == ["probe"]
    throughput = json.loads((results / "data_throughput.json").read_text())
    first = next(iter(throughput["sources"].values()))
    first["crops_per_cpu_s"] = [v * 2 for v in first["crops_per_cpu_s"]]
    (results / "data_throughput.json").write_text(json.dumps(throughput))
    assert sorted(tables.differing(readme, results)) == ["data_throughput", "probe"]


def test_sd_is_the_sample_sd_and_crop_rates_are_not_copied_between_columns(tmp_path):
    assert tables.mean_sd([0.0, 1.0]) == "0.500 ± 0.707"  # ddof 1: sqrt(0.5), not 0.5
    results = tmp_path / "results"
    shutil.copytree(ROOT / "docs" / "results", results)
    block = tables.render_data_throughput(results)
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| ") and line.split(" | ")[1][0].isdigit()]
    assert rows and all(r[1].split()[0] != r[2] for r in rows)  # wall-clock and CPU-second rates are measured apart


def test_an_unknown_block_is_refused():
    with pytest.raises(SystemExit, match="unknown table block"):
        tables.rewrite("<!-- table:nonsense -->\n<!-- /table -->\n")


def test_the_demo_writes_demo_json_that_renders_the_dice_line(tmp_path):
    import argparse
    import time

    from spark3d.cli.demo import _write_demo_json

    per_organ = {"spleen": {"mean": 0.91}, "liver": {"mean": 0.96}, "pancreas": {"mean": 0.79},
                 "left adrenal gland": {"mean": 0.70}, "esophagus": {"mean": None}}
    summary = {"mean_dice": 0.84, "per_organ": per_organ}
    args = argparse.Namespace(method="spark", out=str(tmp_path), epochs=None, finetune_epochs=None, max_steps=None)
    _write_demo_json(tmp_path / "demo.json", args, ["--out", str(tmp_path)], summary,
                     {"pretraining": 150.0, "fine-tuning": 210.0}, [1.0, 0.5], time.time() - 400)
    demo = json.loads((tmp_path / "demo.json").read_text())
    assert demo["per_organ_dice"] == {o: v["mean"] for o, v in per_organ.items()}
    assert demo["provenance"]["command"] == f"spark3d demo --out {tmp_path}" and demo["total_s"] >= 400
    line = tables.render_demo(tmp_path)
    assert "mean Dice 0.840 over the 5 organs" in line and "every organ ≥ 0.70" in line
    assert "left adrenal gland 0.70, pancreas 0.79, spleen 0.91" in line and "highest: liver 0.96" in line

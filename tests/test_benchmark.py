"""`spark3d benchmark --json` measures every mode and writes every ratio, for a config (3D) and a timm network (2D)."""

import json
from pathlib import Path

import pytest

from spark3d.cli import main

CONFIGS = Path(__file__).parents[1] / "configs" / "pretrain"


@pytest.mark.parametrize("args,memory", [
    (["--config", str(CONFIGS / "demo_ct.yaml"), "--size", "16", "--decoder", "efficient"], True),
    (["--backbone", "resnet18", "--source", "timm", "--size", "64", "--scope", "encoder"], False),
], ids=["3d-config-with-memory", "2d-timm-encoder"])
def test_benchmark_json_has_every_mode_and_ratio(tmp_path, capsys, args, memory):
    out = tmp_path / "bench.json"
    extra = [] if memory else ["--no-memory"]
    assert main(["benchmark", *args, "--batch", "2", "--repeats", "2", "--warmup", "0", *extra, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"dense", "masked-dense", "sparse"}
    for mode, r in report["modes"].items():
        assert r["error"] is None, (mode, r["error"])
        assert len(r["times"]) == 2 and r["median_s"] > 0 and r["samples_per_s"] > 0
        assert r["encoder_gflop"] > 0 and r["decoder_gflop"] > 0
        assert (r["peak_mb"] is not None) == memory
    assert set(report["ratios"]) == {"sparse/masked-dense", "dense/masked-dense", "masked-dense/dense", "sparse/dense"}
    for key, ratio in report["ratios"].items():
        assert ratio["time"] > 0 and ratio["encoder_flops"] > 0 and ratio["step_flops"] > 0, key
        assert (ratio["memory"] is not None) == memory, key
    # the sparse encoder does about the visible fraction of the masked-dense encoder's work
    assert report["ratios"]["sparse/masked-dense"]["encoder_flops"] < report["visible_fraction"] + 0.15
    assert report["ratios"]["dense/masked-dense"]["encoder_flops"] == pytest.approx(1.0)
    for key in ("device", "threads", "torch"):
        assert key in report["machine"]
    table = capsys.readouterr().out
    assert "| sparse |" in table and "time / masked-dense" in table


def test_benchmark_runs_convmae_with_its_visible_token_saving(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["benchmark", "--config", str(CONFIGS / "demo_convmae_ct.yaml"), "--size", "32", "--batch", "2",
                 "--repeats", "1", "--warmup", "0", "--no-memory", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"dense", "masked-dense", "sparse"}
    assert all(r["error"] is None and r["median_s"] > 0 for r in report["modes"].values())
    # the transformer sees a quarter of the tokens: the masked encoder does less work than the dense one,
    # and the sparse conv part less than the masked-dense one
    assert report["ratios"]["masked-dense/dense"]["encoder_flops"] < 0.9
    assert report["ratios"]["sparse/masked-dense"]["encoder_flops"] < 0.9
    assert "| sparse |" in capsys.readouterr().out


def test_benchmark_reports_a_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: os.system\n")
    assert main(["benchmark", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml" in err[0] and "class_path" in err[0]

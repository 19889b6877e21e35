"""benchmarks/transfer.py: the quick study end to end (every CSV row, the PNG and the JSON agree), its refusals,
and the library pieces it relies on (wide phantoms, the supervised encoder.pt, the input-mismatch check)."""

import csv
import importlib
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCH = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def transfer():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("transfer")
    finally:
        sys.path.remove(str(BENCH))


def test_quick_study_rows_png_and_json_agree(transfer, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "docs" / "transfer"
    argv = ["--quick", "--work", str(work), "--out", str(out), "--workers", "1"]
    assert transfer.main(argv) == 0
    args = transfer.parse(argv)
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    evals = [str(s) for s in range(args.eval_every, args.finetune_steps + 1, args.eval_every)]
    arms = {n: ("scratch", "control", "spark", *(("scratch-shipped",) if n == min(args.labelled) else ()))
            for n in args.labelled}  # scratch with the config's own recipe at the smallest set only
    expected = {("finetune", arm, str(n), str(seed), step) for n in args.labelled for seed in args.seeds
                for arm in arms[n] for step in evals}
    expected |= {("probe", arm, str(max(args.labelled)), str(seed), str(args.probe_steps)) for seed in args.seeds
                 for arm in ("random", "spark", "control")}
    expected |= {("selection_budget", "scratch" if m == 0 else f"spark@{m}", "1", str(s), str(args.selection_steps))
                 for s in args.selection_seeds for m in [0, *args.milestones]}
    expected |= {("selection_recipe", r, "1", str(s), str(args.selection_steps)) for s in args.selection_seeds
                 for r in args.recipes}
    got = [(r["kind"], r["arm"], r["labelled"], r["seed"], r["step"]) for r in rows]
    assert sorted(got) == sorted(expected)  # every run and evaluation step, once
    organs = list(rows[0])[list(rows[0]).index("encoder_drift") + 1:]
    assert len(organs) == 13 and "liver" in organs
    for r in rows:  # the mean is the mean of the organs present in the validation labels
        present = [float(r[o]) for o in organs if r[o] != ""]
        assert abs(float(r["mean_dice"]) - statistics.mean(present)) < 1e-3
        assert (float(r["encoder_drift"]) == 0.0) == (r["kind"] == "probe")  # a frozen encoder does not move
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["csv_rows"] == len(rows)
    assert set(summary["runs"]) == {r["run"] for r in rows} | {f"pretrain_spark_{m}" for m in args.milestones} | {
        "pretrain_control"}
    assert summary["options"]["seeds"] == args.seeds and summary["machine"]["torch"] == torch.__version__
    recipe = summary["chosen"]["recipe"]
    assert recipe in args.recipes
    pairs = {(n, a, "scratch") for n in args.labelled for a in ("control", "spark")}
    if recipe != "config":  # the pretrained arms against scratch with the config's own recipe as well
        pairs |= {(min(args.labelled), a, "scratch-shipped") for a in ("control", "spark")}
    assert {(t["labelled"], t["arm"], t["baseline"]) for t in summary["tests"]} == pairs
    budget_encoder = f"encoder_{summary['chosen']['pretrain_budget']}.pt"
    for name, run in summary["runs"].items():  # the headline arms ran the chosen recipe, scratch-shipped the config's
        if name.startswith("ft_n"):
            assert run["kwargs"]["recipe"] == ("config" if "scratch-shipped" in name else recipe), name
            assert (run["kwargs"]["encoder"] is None) == ("scratch" in name), name
            if "_spark_" in name:
                assert Path(run["kwargs"]["encoder"]).name == budget_encoder
    twin = summary["runs"]["ft_n1_scratch_s0"]["kwargs"] == summary["runs"]["ft_n1_scratch-shipped_s0"]["kwargs"]
    assert twin == (recipe == "config")
    for name, run in summary["runs"].items():  # the budget curve ran with the chosen recipe (chosen first)
        if name.startswith("select_budget_"):
            assert run["kwargs"]["recipe"] == recipe, name
    assert summary["control_pretraining"]["val_cases"] == args.control_val  # the control's own Dice was measured
    assert 0.0 <= summary["control_pretraining"]["own_val_dice"] <= 1.0
    for t in summary["tests"]:  # the JSON's statistics are the CSV's (sample sd, ddof=1)
        for who, key in ((t["arm"], "arm"), (t["baseline"], "scratch")):
            final = [float(r["mean_dice"]) for r in rows if r["kind"] == "finetune" and r["arm"] == who
                     and r["labelled"] == str(t["labelled"]) and r["step"] == evals[-1]]
            assert t[f"{key}_mean"] == pytest.approx(statistics.mean(final), abs=1e-3)
            assert t[f"{key}_sd"] == pytest.approx(statistics.stdev(final), abs=1e-3)
    chain = summary["chain"]["spark"]
    assert chain["matched"] == chain["file_tensors"] > 0 and chain["max_abs_diff_after_load"] == 0.0
    assert summary["pretraining"]["compute"] == "sparse"
    image = np.asarray(Image.open(out.with_suffix(".png")).convert("RGB"))
    assert image.shape[1] > 1000 and image.std() > 10
    # resumable: a second call runs nothing and writes the same rows
    capsys.readouterr()
    assert transfer.main(argv) == 0
    assert "0 to run" in capsys.readouterr().out
    with out.with_suffix(".csv").open() as f:
        assert list(csv.DictReader(f)) == rows


@pytest.mark.parametrize("extra, words", [(["--seeds", "0"], "at least 2 seeds"),
                                          (["--unlabelled-seed", "10"], "labelled cases"),
                                          (["--recipes", "config", "warm"], "--recipes warm: unknown")])
def test_bad_options_get_one_line_and_write_nothing(transfer, tmp_path, capsys, extra, words):
    work = tmp_path / "work"
    assert transfer.main(["--quick", "--work", str(work), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not work.exists()


def test_labelled_case_in_the_unlabelled_pool_is_refused(tmp_path):
    from spark3d.data.phantoms import write_btcv_phantoms
    from spark3d.errors import DataError

    sys.path.insert(0, str(BENCH))
    try:
        from transfer_runs import check_disjoint
    finally:
        sys.path.remove(str(BENCH))
    labelled = write_btcv_phantoms(tmp_path / "l", n_train=1, n_val=1, n_test=0, shape=(24, 24, 12), seed=3)
    other = write_btcv_phantoms(tmp_path / "u", n_train=2, n_val=0, n_test=0, shape=(24, 24, 12), seed=4)
    check_disjoint(str(other), [str(labelled)])  # disjoint seeds: accepted
    same = write_btcv_phantoms(tmp_path / "s", n_train=3, n_val=0, n_test=0, shape=(24, 24, 12), seed=3)
    with pytest.raises(DataError, match="img0001.nii.gz, the same volume as the labelled case") as err:
        check_disjoint(str(same), [str(labelled)])
    assert len(str(err.value).splitlines()) == 1


def test_wide_phantoms_vary_more_and_stay_deterministic():
    from spark3d.data.phantoms import make_phantom

    a = make_phantom(5, (48, 48, 24), variation="wide")
    assert all(np.array_equal(x, y) for x, y in zip(a, make_phantom(5, (48, 48, 24), variation="wide")))
    assert set(np.unique(a[1])) == set(range(14))

    def spread(variation):
        livers = [(make_phantom(s, (48, 48, 24), variation=variation)[1] == 6).sum() for s in range(6)]
        return np.std(livers) / np.mean(livers)

    assert spread("wide") > 1.5 * spread("standard")


def test_supervised_encoder_round_trips_and_foreign_encoder_is_refused(tmp_path):
    from spark3d.backbones import BackboneSpec
    from spark3d.checkpoint import write_encoder
    from spark3d.errors import CheckpointError
    from spark3d.networks import build_segmentation_network, encoder_state_of, load_pretrained_encoder

    kwargs = {"init_filters": 8, "blocks_down": [1, 2, 2, 2]}
    spec = BackboneSpec("segresnet", "monai", 3, 1, kwargs)
    torch.manual_seed(0)
    trained = build_segmentation_network(spec, 14)
    meta = {"backbone": "segresnet", "source": "monai", "spatial_dims": 3, "in_channels": 1}
    path = write_encoder(tmp_path / "encoder.pt", encoder_state_of(trained, spec), meta)
    torch.manual_seed(1)
    fresh = build_segmentation_network(spec, 14)
    report = load_pretrained_encoder(fresh, path, spec)
    after = encoder_state_of(fresh, spec)
    assert report["matched"] == len(after) > 0
    assert all(torch.equal(after[k], v) for k, v in encoder_state_of(trained, spec).items())
    foreign = write_encoder(tmp_path / "other.pt", encoder_state_of(trained, spec), {**meta, "backbone": "resnet18"})
    with pytest.raises(CheckpointError, match="backbone='resnet18'") as err:
        load_pretrained_encoder(build_segmentation_network(spec, 14), foreign, spec)
    assert len(str(err.value).splitlines()) == 1


def test_pretraining_and_finetuning_inputs_are_compared():
    from spark3d.networks import pretraining_mismatches

    meta = {"spacing": [6.0, 6.0, 6.0], "intensity_range": [-1000.0, 1000.0]}
    same = {"spacing": (6.0, 6.0, 6.0), "intensity_range": (-1000.0, 1000.0)}
    assert pretraining_mismatches(meta, same) == []
    found = pretraining_mismatches(meta, {**same, "intensity_range": (-175.0, 250.0)})
    assert len(found) == 1 and found[0].startswith("intensity_range")


def test_pretrained_recipe_applies_only_with_a_pretrained_encoder(tmp_path):
    from spark3d.checkpoint import write_encoder
    from spark3d.errors import ConfigError
    from spark3d.networks import encoder_state_of
    from spark3d.train import SegmentationModule

    kw = {"backbone_kwargs": {"init_filters": 8, "blocks_down": [1, 2, 2, 2]}, "roi_size": (32, 32, 32), "lr": 0.01,
          "pretrained_recipe": {"layer_decay": 0.5, "lr": 0.002}}
    scratch = SegmentationModule(**kw)
    meta = {"backbone": "segresnet", "source": "monai", "spatial_dims": 3, "in_channels": 1}
    path = write_encoder(tmp_path / "encoder.pt", encoder_state_of(scratch.network, scratch.spec), meta)
    pretrained = SegmentationModule(**kw, pretrained=str(path))
    assert {g["lr"] for g in scratch._param_groups()} == {0.01}
    lrs = sorted({g["lr"] for g in pretrained._param_groups()})
    assert lrs[-1] == pytest.approx(0.002) and lrs[0] == pytest.approx(0.002 * 0.5**4)  # 4 encoder levels below
    with pytest.raises(ConfigError, match="pretrained_recipe"):
        SegmentationModule(**{**kw, "pretrained_recipe": {"momentum": 0.9}})


def test_the_same_study_runs_on_given_datalists_and_configs(transfer, tmp_path):
    """Real data: the four sets come from datalists (no phantoms are written), the configs from files."""
    from spark3d.data.phantoms import write_btcv_phantoms

    sets = {key: write_btcv_phantoms(tmp_path / key, n_train=n_train, n_val=n_val, n_test=0, shape=(48, 48, 24),
                                     seed=seed, variation="wide")
            for key, n_train, n_val, seed in (("labelled", 1, 1, 30), ("selection", 1, 1, 31), ("control", 2, 1, 32),
                                              ("unlabelled", 3, 0, 33))}
    work, out = tmp_path / "work", tmp_path / "out" / "transfer"
    argv = ["--quick", "--work", str(work), "--out", str(out), "--workers", "1", "--labelled", "1",
            "--finetune-config", str(Path(__file__).parents[1] / "configs" / "finetune" / "demo_ct.yaml"),
            *[w for key, path in sets.items() for w in (f"--{key}-data", str(path))]]
    assert transfer.main(argv) == 0
    assert not (work / "data").exists()  # nothing drawn: the given sets were used
    summary = json.loads(out.with_suffix(".json").read_text())
    for name, run in summary["runs"].items():
        kw = run["kwargs"]
        expected = {"ft_": "labelled", "pro": "labelled", "sel": "selection"}.get(name[:3])
        if expected:
            assert Path(kw["datalist"]) == Path(sets[expected]).resolve(), name
    assert Path(summary["runs"]["pretrain_control"]["kwargs"]["datalist"]) == Path(sets["control"]).resolve()
    manifest = json.loads((work / "store" / "manifest.json").read_text())
    assert len(manifest["volumes"]) == 3  # the store holds the unlabelled pool, and only it
    assert {t["labelled"] for t in summary["tests"]} == {1}


def test_real_data_needs_all_four_sets_and_disjoint_ones(transfer, tmp_path, capsys):
    from spark3d.data.phantoms import write_btcv_phantoms

    labelled = write_btcv_phantoms(tmp_path / "l", n_train=1, n_val=1, n_test=0, shape=(24, 24, 12), seed=40)
    other = write_btcv_phantoms(tmp_path / "o", n_train=1, n_val=1, n_test=0, shape=(24, 24, 12), seed=41)
    base = ["--quick", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "x")]
    assert transfer.main([*base, "--labelled-data", str(labelled)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--selection-data, --control-data, --unlabelled-data missing" in err and len(err.splitlines()) == 1
    # the control's pool holds the headline's validation case: refused before any run
    same = write_btcv_phantoms(tmp_path / "s", n_train=2, n_val=0, n_test=0, shape=(24, 24, 12), seed=40)
    pool = write_btcv_phantoms(tmp_path / "p", n_train=2, n_val=0, n_test=0, shape=(24, 24, 12), seed=42)
    argv = [*base, "--labelled-data", str(labelled), "--selection-data", str(other), "--control-data", str(same),
            "--unlabelled-data", str(pool)]
    assert transfer.main(argv) == 2  # --labelled 1 2 (quick) needs 2 headline training cases
    err = capsys.readouterr().err.strip()
    assert "has 1 training cases; --labelled [1, 2] needs 2" in err and len(err.splitlines()) == 1
    assert transfer.main([*argv, "--labelled", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "control pool" in err and "the same volume as the labelled case" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w" / "runs").exists()


def test_context_phantoms_share_one_hu_band_for_the_solid_organs():
    """"context": the solid organs' mean HU lie closer together within a case than under "wide" (identity takes shape
    and place), deterministic per seed; "wide" itself is unchanged by the option (same draws)."""
    from spark3d.data.phantoms import make_phantom

    a = make_phantom(5, (48, 48, 24), variation="context")
    assert all(np.array_equal(x, y) for x, y in zip(a, make_phantom(5, (48, 48, 24), variation="context")))
    assert set(np.unique(a[1])) == set(range(14))

    def spread(variation):  # within-case sd of the solid organs' mean HU (liver, spleen, kidneys, pancreas)
        out = []
        for seed in range(4):
            hu, label, _ = make_phantom(seed, (96, 96, 48), noise_hu=0.0, variation=variation)
            out.append(np.std([hu[label == organ].mean() for organ in (6, 1, 2, 3, 11)]))
        return np.mean(out)

    assert spread("context") < 0.5 * spread("wide")


def _children(pid: int) -> set[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    found, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += list(kids - found)
            found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_the_workers_and_keeps_finished_runs(tmp_path):
    """A killed study takes its pool's workers with it and says how to resume (it used to leave them running)."""
    import os
    import signal
    import subprocess
    import time

    work = tmp_path / "work"
    long = ["--pretrain-steps", "100000", "--milestones", "2", "100000", "--control-steps", "100000"]  # busy workers
    proc = subprocess.Popen([sys.executable, str(BENCH / "transfer.py"), "--quick", "--work", str(work),
                             "--out", str(tmp_path / "o"), "--workers", "2", *long],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    try:
        workers: set[int] = set()
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # until the pool's workers are training
            workers = _children(proc.pid)
            if len(workers) >= 2 and (work / "runs" / "pretrain_spark_2.json").exists():
                break  # the first milestone is done; the long schedule and the control are training
            time.sleep(0.5)
        assert proc.poll() is None and len(workers) >= 2, "the study ended before its workers started"
        time.sleep(2)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid in [p for p in _children(proc.pid) | workers if _alive(p)]:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "the same command resumes" in err
    assert sorted(p.name for p in (work / "runs").glob("*.json")) == ["pretrain_spark_2.json"]  # finished: kept
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.5)
    orphans = [p for p in workers if _alive(p)]
    for pid in orphans:  # a failing test leaves no busy processes behind
        os.kill(pid, signal.SIGKILL)
    assert not orphans, "workers outlived the study"

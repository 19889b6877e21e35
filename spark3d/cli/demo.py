"""``spark3d demo``: the embedded default run, end to end on synthetic CT phantoms, CPU-friendly."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).parents[1] / "configs"
# method → (pretraining config, fine-tuning config, what is pretrained), both configs under CONFIG_DIR
METHOD_CONFIGS = {
    "spark": ("demo_ct.yaml", "demo_ct.yaml", "SparK pretraining (MONAI SegResNet, 32³ crops at 6 mm, mask ratio 0.6)"),
    "convmae": ("demo_convmae_ct.yaml", "demo_convmae_ct.yaml",
                "ConvMAE pretraining (tiny hybrid conv + ViT, 64×64×48 crops, mask ratio 0.75)"),
}
# what one --compare run is worth: printed with the difference and recorded beside it in demo.json
COMPARE_NOTE = "one seed, not a test: benchmarks/transfer.py measures it"


def _exports_bundle(finetune_config: Path) -> bool:
    """Whether the config's fine-tuning network builds from MONAI alone (the backbone table says; ConvMAE's
    hybrid network needs spark3d, so it gets no bundle)."""
    import yaml

    from ..backbones import lookup

    args = yaml.safe_load(finetune_config.read_text())["model"]["init_args"]
    return lookup(args.get("source", "monai"), args["backbone"]).bundle_network is not None


def _epoch_losses(metrics_csv: Path, column: str) -> list[float]:
    with metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    return [float(r[column]) for r in rows if r.get(column)]


def _organ_table(per_organ: dict, columns: int = 3) -> str:
    """Dice per organ, a few organs per line (``-`` where an organ is absent from the validation labels)."""
    cells = [f"{organ:<25}{'   - ' if v['mean'] is None else format(v['mean'], '5.3f')}" for organ, v in per_organ.items()]
    return "\n".join("  " + "   ".join(cells[i:i + columns]) for i in range(0, len(cells), columns))


def _write_demo_json(path: Path, args: argparse.Namespace, argv: list[str], summary: dict, stages: dict[str, float],
                     losses: list[float], t0: float, compare: dict | None = None) -> None:
    """``demo.json``: the Dice table, the stage times and the pretraining losses, with the provenance block; plus
    the ``--compare`` block (:func:`_comparison`) when it ran, and no ``compare`` key at all when it did not."""
    from ..provenance import write_result

    figures = {
        "method": args.method, "options": vars(args), "mean_dice": summary.get("mean_dice"),
        "per_organ_dice": {organ: v["mean"] for organ, v in summary["per_organ"].items()},
        "stages_s": {stage: round(seconds, 1) for stage, seconds in stages.items()},
        "total_s": round(time.time() - t0, 1), "pretrain_loss_epoch": losses}
    if compare is not None:
        figures["compare"] = compare
    write_result(path, figures, ["spark3d", "demo", *argv], t0)


def _comparison(summary: dict, scratch_summary: dict) -> dict:
    """``--compare``'s result, from the two evaluation summaries: both mean Dice values and their difference
    (pretrained − scratch; ``None`` if either run has no Dice), the scratch run's Dice per organ and what it is
    worth (one seed). demo.json records it and the printed line reads it, so the two cannot disagree."""
    pretrained, scratch = summary.get("mean_dice"), scratch_summary.get("mean_dice")
    return {"scratch_mean_dice": scratch, "pretrained_mean_dice": pretrained,
            "difference": None if pretrained is None or scratch is None else pretrained - scratch,
            "scratch_per_organ_dice": {organ: v["mean"] for organ, v in scratch_summary["per_organ"].items()},
            "note": COMPARE_NOTE}


def _scratch_comparison(out: Path, common: list[str], ft_args: list[str]) -> dict | None:
    """``--compare``: the demo's fine-tuning again without the pretrained encoder, evaluated the same way
    (``common``: the config and datalist arguments every fine-tuning command of the demo takes)."""
    from .commands import run_evaluate, run_finetune

    i = ft_args.index("--model.init_args.pretrained")
    args = ft_args[:i] + ft_args[i + 2:]
    j = args.index("--trainer.default_root_dir")
    args[j + 1] = str(out / "finetune_scratch")
    print(f"      --compare: the same fine-tuning from scratch into {out / 'finetune_scratch'} …", file=sys.stderr)
    if run_finetune(args):
        return None
    if run_evaluate([*common, "--ckpt_path", str(out / "finetune_scratch" / "checkpoints" / "last.ckpt"),
                     "--out", str(out / "evaluate_scratch")]):
        return None
    return json.loads((out / "evaluate_scratch" / "summary.json").read_text())


def run_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spark3d demo",
        description="Generate synthetic abdominal CT phantoms (BTCV layout), pretrain a small MONAI SegResNet "
        "with SparK on them, fine-tune it on the 13 organs, evaluate per-organ Dice, predict the test "
        "phantoms and export a MONAI bundle. No data or network needed; under 10 minutes on 2 CPU cores.",
    )
    parser.add_argument("--method", choices=sorted(METHOD_CONFIGS), default="spark",
                        help="pretraining method (default: spark; convmae pretrains a hybrid conv + ViT encoder)")
    parser.add_argument("--out", default="spark3d_demo", help="output folder (default: ./spark3d_demo)")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the demo config's)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default: the config's)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each training after this many steps (quick checks)")
    parser.add_argument("--compare", action="store_true",
                        help="also fine-tune from scratch (same config, seed and steps) and report the difference")
    args = parser.parse_args(argv)

    from ..data.phantoms import write_btcv_phantoms
    from .commands import run_evaluate, run_export_bundle, run_finetune, run_predict, run_pretrain

    out = Path(args.out)
    t0 = time.time()
    stages: dict[str, float] = {}  # stage → seconds

    def lap(stage: str) -> None:
        stages[stage] = time.time() - t0 - sum(stages.values())

    datalist = out / "data" / "dataset.json"
    if not datalist.exists():
        print(f"[1/5] writing synthetic CT phantoms to {out / 'data'} …", file=sys.stderr)
        write_btcv_phantoms(out / "data", n_train=8, n_val=2, n_test=2, seed=0)
    else:
        print(f"[1/5] using the phantoms already in {out / 'data'}", file=sys.stderr)
    lap("phantoms")
    run_dir = out / "pretrain"
    pretrain_config, finetune_config, what = METHOD_CONFIGS[args.method]
    print(f"[2/5] {what} into {run_dir} …", file=sys.stderr)
    cli_args = ["--config", str(CONFIG_DIR / "pretrain" / pretrain_config),
                "--data.init_args.datalist", str(datalist), "--trainer.default_root_dir", str(run_dir),
                "--overwrite", "true"]  # the demo's own folder: a rerun replaces the previous demo run
    if args.epochs is not None:
        cli_args += ["--trainer.max_epochs", str(args.epochs)]
    if args.max_steps is not None:
        cli_args += ["--trainer.max_steps", str(args.max_steps)]
    code = run_pretrain(cli_args)
    if code:
        return code
    losses = _epoch_losses(run_dir / "metrics.csv", "train/loss_epoch")
    lap("pretraining")

    ft_dir = out / "finetune"
    print(f"[3/5] fine-tuning the pretrained encoder on the 13 phantom organs into {ft_dir} …", file=sys.stderr)
    ft_config = str(CONFIG_DIR / "finetune" / finetune_config)
    common = ["--config", ft_config, "--data.init_args.datalist", str(datalist)]
    ft_args = [*common, "--model.init_args.pretrained", str(run_dir / "encoder.pt"),
               "--trainer.default_root_dir", str(ft_dir), "--overwrite", "true"]
    if args.finetune_epochs is not None:
        ft_args += ["--trainer.max_epochs", str(args.finetune_epochs)]
    if args.max_steps is not None:
        ft_args += ["--trainer.max_steps", str(args.max_steps), "--trainer.check_val_every_n_epoch", "1"]
    code = run_finetune(ft_args)
    if code:
        return code
    lap("fine-tuning")
    ckpt = str(ft_dir / "checkpoints" / "last.ckpt")
    print(f"[4/5] evaluating on the validation phantoms (original resolution) into {out / 'evaluate'} …", file=sys.stderr)
    code = run_evaluate([*common, "--ckpt_path", ckpt, "--out", str(out / "evaluate")])
    if code:
        return code
    lap("evaluation")
    scratch_summary = None
    if args.compare:
        scratch_summary = _scratch_comparison(out, common, ft_args)
        if scratch_summary is None:
            return 2
        lap("scratch comparison")
    print(f"[5/5] predicting the test phantoms into {out / 'predict'} …", file=sys.stderr)
    code = run_predict([*common, "--ckpt_path", ckpt, "--input", str(out / "data" / "RawData" / "Testing" / "img"),
                        "--out", str(out / "predict")])
    if code:
        return code
    lap("prediction")
    bundle = out / "bundle" if _exports_bundle(CONFIG_DIR / "finetune" / finetune_config) else None
    if bundle is not None:
        print(f"      exporting the fine-tuned model as a MONAI bundle into {bundle} …", file=sys.stderr)
        code = run_export_bundle([*common, "--ckpt_path", ckpt, "--out", str(bundle),
                                  "--summary", str(out / "evaluate" / "summary.json"), "--overwrite", "true"])
        if code:
            return code
        lap("bundle export")

    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    compare = None if scratch_summary is None else _comparison(summary, scratch_summary)
    _write_demo_json(out / "demo.json", args, argv, summary, stages, losses, t0, compare)
    figures = sorted((run_dir / "figures").glob("*.png"))
    overlays = sorted((out / "predict").glob("*_overlay.png"))
    print("\n" + "=" * 72)
    timing = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in stages.items())
    print(f"spark3d demo finished in {time.time() - t0:.0f} s ({timing})")
    if losses:
        print(f"pretraining masked-patch loss (norm-pix MSE): epoch 1 {losses[0]:.3f} → epoch {len(losses)} {losses[-1]:.3f}")
    if summary.get("mean_dice") is not None:
        print(f"fine-tuned mean Dice over the 13 organs (validation phantoms): {summary['mean_dice']:.3f}")
        print(_organ_table(summary["per_organ"]))
    if compare is not None and compare["difference"] is not None:
        print(f"pretrained vs from scratch (same fine-tuning config, seed and steps): mean Dice "
              f"{compare['pretrained_mean_dice']:.3f} vs {compare['scratch_mean_dice']:.3f} "
              f"({compare['difference']:+.3f}; {COMPARE_NOTE})")
    print(f"phantoms (BTCV layout) : {out / 'data'}")
    print(f"pretrained encoder     : {run_dir / 'encoder.pt'}  (fine-tuning network's keys; torch.load(weights_only=True))")
    print(f"pretraining run        : {run_dir}  (checkpoints/, metrics.csv, tensorboard/, figures/)")
    print(f"fine-tuning run        : {ft_dir}")
    print(f"Dice per case / organ  : {out / 'evaluate' / 'dice_per_case.csv'}, summary.json")
    print(f"these numbers, timed   : {out / 'demo.json'}  (with the machine, versions and command)")
    if bundle is not None:
        print(f"MONAI bundle           : {bundle}  (runs without spark3d:)")
        print(f"                         python -m monai.bundle run --config_file {bundle / 'configs' / 'inference.json'} "
              f"--bundle_root {bundle} --dataset_dir {out / 'data' / 'RawData' / 'Testing' / 'img'} --output_dir OUT")
    if figures:
        print(f"look at                : {figures[-1]}")
        print("                         input | masked input | reconstruction, three orthogonal mid-slices")
    for overlay in overlays:
        print(f"                         {overlay}  (predicted organs over a test phantom)")
    print("=" * 72)
    return 0

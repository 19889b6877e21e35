"""Does the efficient decoder pretrain as well as SparK's faithful one? Evidence on the phantoms.

For each seed, the same encoder (the demo's SegResNet) is pretrained with the same budget once with
``decoder: spark`` and once with ``decoder: efficient``; then, for scratch / faithful / efficient:

- a **frozen-encoder segmentation probe**: the network's own decoder trained on the frozen encoder
  (all training volumes, fixed steps);
- a **label-efficiency fine-tune**: the whole network fine-tuned on ``--n-labelled`` volumes (fixed steps).

Mean validation Dice (13 organs) per seed, then mean ± sample sd (ddof 1) over seeds. Every run is a normal
``spark3d pretrain`` / ``finetune`` / ``evaluate`` run in ``--work``; finished runs are reused, so an
interrupted study resumes.

    python benchmarks/probe.py --work runs/probe --seeds 0 1 2 --pretrain-steps 160 --probe-steps 80 \
        --finetune-steps 80 --json docs/results/probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from spark3d.cli.commands import run_evaluate, run_finetune, run_pretrain
from spark3d.data.phantoms import write_btcv_phantoms

CONFIGS = Path(__file__).parents[1] / "configs"
INITS = ("scratch", "faithful", "efficient")
DECODER = {"faithful": "spark", "efficient": "efficient"}
QUIET = ["--trainer.enable_progress_bar", "false"]


def _pretrain(work: Path, datalist: str, init: str, seed: int, steps: int, mask_ratio: float) -> str:
    run = work / f"pretrain_{init}_s{seed}"
    encoder = run / "encoder.pt"
    if not encoder.is_file():
        run_pretrain(["--config", str(CONFIGS / "pretrain" / "demo_ct.yaml"), "--data.init_args.datalist", datalist,
                      "--model.init_args.decoder", DECODER[init], "--model.init_args.mask_ratio", str(mask_ratio),
                      "--seed_everything", str(seed), "--trainer.max_steps", str(steps), "--trainer.max_epochs", "100000",
                      "--trainer.default_root_dir", str(run), "--overwrite", "true", *QUIET])  # unfinished: redone
    return str(encoder)


def _finetune(work: Path, datalist: str, name: str, encoder: str | None, seed: int, steps: int,
              extra: list[str]) -> float:
    run = work / name
    summary = run / "eval" / "summary.json"
    common = ["--config", str(CONFIGS / "finetune" / "demo_ct.yaml"), "--data.init_args.datalist", datalist]
    if not summary.is_file():
        pretrained = ["--model.init_args.pretrained", encoder] if encoder else []
        run_finetune([*common, *pretrained, *extra, "--seed_everything", str(seed), "--trainer.max_steps", str(steps),
                      "--trainer.max_epochs", "100000", "--trainer.check_val_every_n_epoch", "100000",
                      "--trainer.default_root_dir", str(run), "--overwrite", "true", *QUIET])
        run_evaluate([*common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(run / "eval")])
    return float(json.loads(summary.read_text())["mean_dice"])


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the phantoms and every run (reused when present)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=160)
    parser.add_argument("--probe-steps", type=int, default=80)
    parser.add_argument("--finetune-steps", type=int, default=80)
    parser.add_argument("--n-labelled", type=int, default=2)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--json", default=None, help="write the per-seed results and the table here")
    args = parser.parse_args()
    started = time.time()
    work = Path(args.work)
    datalist = work / "data" / "dataset.json"
    if not datalist.is_file():
        write_btcv_phantoms(work / "data", n_train=8, n_val=4, n_test=0, seed=0)
    results: dict[str, dict[str, list[float]]] = {t: {i: [] for i in INITS} for t in ("probe", "label_efficiency")}
    for seed in args.seeds:
        for init in INITS:
            encoder = None if init == "scratch" else _pretrain(work, str(datalist), init, seed, args.pretrain_steps,
                                                              args.mask_ratio)
            results["probe"][init].append(_finetune(
                work, str(datalist), f"probe_{init}_s{seed}", encoder, seed, args.probe_steps,
                ["--model.init_args.freeze_encoder_epochs", "100000"]))
            results["label_efficiency"][init].append(_finetune(
                work, str(datalist), f"labels{args.n_labelled}_{init}_s{seed}", encoder, seed, args.finetune_steps,
                ["--data.init_args.max_train_cases", str(args.n_labelled)]))
    lines = [f"phantoms, demo SegResNet, mask {args.mask_ratio}, pretraining {args.pretrain_steps} steps; "
             f"seeds {args.seeds}; mean validation Dice (13 organs), mean ± sd over seeds",
             f"| pretraining | frozen-encoder probe ({args.probe_steps} steps) | "
             f"fine-tune, {args.n_labelled} labelled volumes ({args.finetune_steps} steps) |", "|---|---|---|"]
    for init in INITS:
        lines.append(f"| {init} | {_mean_sd(results['probe'][init])} | {_mean_sd(results['label_efficiency'][init])} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.json:
        from spark3d.provenance import write_result

        write_result(args.json, {"args": vars(args), "results": results, "table": table},
                     ["python", "benchmarks/probe.py", *sys.argv[1:]], started)


if __name__ == "__main__":
    main()

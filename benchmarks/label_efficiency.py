"""Label efficiency on phantoms: fine-tune with N labelled volumes from a SparK-pretrained encoder and from
scratch, same step budget and seeds, and print mean validation Dice for both.

    python benchmarks/label_efficiency.py --encoder spark3d_demo/pretrain/encoder.pt \
        --datalist spark3d_demo/data/dataset.json --n 2 4 8 --steps 60

Without --encoder/--datalist it first runs the demo's phantom generation and pretraining.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from spark3d.cli.commands import run_evaluate, run_finetune, run_pretrain
from spark3d.data.phantoms import write_btcv_phantoms

CONFIGS = Path(__file__).parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--datalist", default=None)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="spark3d_label_eff_"))
    datalist = args.datalist or str(write_btcv_phantoms(work / "data", n_train=8, n_val=2, n_test=0, seed=0))
    encoder = args.encoder
    if encoder is None:
        run_pretrain(["--config", str(CONFIGS / "pretrain" / "demo_ct.yaml"), "--data.init_args.datalist", datalist,
                      "--trainer.default_root_dir", str(work / "pretrain"), "--trainer.enable_progress_bar", "false"])
        encoder = str(work / "pretrain" / "encoder.pt")
    common = ["--config", str(CONFIGS / "finetune" / "demo_ct.yaml"), "--data.init_args.datalist", datalist]
    results: dict[int, dict[str, float]] = {}
    for n in args.n:
        for init in ("scratch", "pretrained"):
            run = work / f"n{n}_{init}"
            extra = ["--model.init_args.pretrained", encoder] if init == "pretrained" else []
            run_finetune([*common, *extra, "--data.init_args.max_train_cases", str(n), "--seed_everything", str(args.seed),
                          "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "10000",
                          "--trainer.check_val_every_n_epoch", "100000", "--trainer.enable_progress_bar", "false",
                          "--trainer.default_root_dir", str(run)])
            run_evaluate([*common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(run / "eval")])
            results.setdefault(n, {})[init] = json.loads((run / "eval" / "summary.json").read_text())["mean_dice"]
    print(f"\nlabel efficiency on phantoms ({args.steps} fine-tuning steps, seed {args.seed}; mean Dice of 13 organs)")
    print(f"{'labelled volumes':>16} | {'from scratch':>12} | {'SparK-pretrained':>16}")
    for n, r in results.items():
        print(f"{n:>16} | {r['scratch']:>12.3f} | {r['pretrained']:>16.3f}")


if __name__ == "__main__":
    main()

"""Label efficiency on phantoms: fine-tune with N labelled volumes from a SparK-pretrained encoder and from
scratch, the same step budget and seeds for both, several seeds per point; mean validation Dice of the 13 organs.

    python benchmarks/label_efficiency.py --n 1 2 4 8 --seeds 0 1 2 --steps 150 --out docs/label_efficiency

writes OUT.csv (one row per labelled-set size, initialisation and seed: mean Dice and Dice per organ),
OUT.png (mean Dice vs labelled volumes, mean ± sample sd (ddof 1) over seeds) and OUT_organs.png (per-organ heat map).
Without --encoder/--datalist it writes its own phantoms (max(N) training, 4 validation) and pretrains with the
demo config first. Runs already finished in --work are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np

from spark3d.cli.commands import run_evaluate, run_finetune, run_pretrain
from spark3d.data.phantoms import write_btcv_phantoms

CONFIGS = Path(__file__).parents[1] / "configs"
INITS = ("scratch", "pretrained")


def _overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.roi is not None:
        out += ["--data.init_args.roi_size", json.dumps([args.roi] * 3)]
    if args.spacing is not None:
        out += ["--data.init_args.spacing", json.dumps([args.spacing] * 3)]
    return out


def pretrain(work: Path, datalist: str, args: argparse.Namespace) -> str:
    """The demo pretraining on the study's phantoms (reused when its encoder.pt exists)."""
    run = work / "pretrain"
    if not (run / "encoder.pt").is_file():
        extra = [] if args.pretrain_steps is None else ["--trainer.max_steps", str(args.pretrain_steps)]
        code = run_pretrain(["--config", str(CONFIGS / "pretrain" / "demo_ct.yaml"), "--data.init_args.datalist", datalist,
                             "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
                             "--overwrite", "true", *_overrides(args), *extra])  # an unfinished run is redone
        if code:
            raise SystemExit(code)
    return str(run / "encoder.pt")


def finetune_and_evaluate(work: Path, datalist: str, encoder: str, n: int, init: str, seed: int,
                          args: argparse.Namespace) -> dict:
    """One fine-tuning run and its evaluation summary (reused when the summary exists)."""
    run = work / f"n{n}_{init}_seed{seed}"
    summary = run / "eval" / "summary.json"
    if not summary.is_file():
        common = ["--config", str(CONFIGS / "finetune" / "demo_ct.yaml"), "--data.init_args.datalist", datalist,
                  *_overrides(args)]
        extra = ["--model.init_args.pretrained", encoder] if init == "pretrained" else []
        code = run_finetune([*common, *extra, "--data.init_args.max_train_cases", str(n), "--seed_everything", str(seed),
                             "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "100000",
                             "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                             "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(run),
                             "--overwrite", "true"])  # an unfinished run is redone
        code = code or run_evaluate([*common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                                     "--out", str(run / "eval")])
        if code:
            raise SystemExit(code)
    return json.loads(summary.read_text())


def sample_sd(values: list[float]) -> float:
    """Sample standard deviation (ddof 1) over seeds; NaN for a single seed (no spread to estimate)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def write_csv(path: Path, rows: list[dict], organs: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["labelled_volumes", "init", "seed", "steps", "mean_dice", *organs])
        for r in rows:
            writer.writerow([r["n"], r["init"], r["seed"], r["steps"], f"{r['mean_dice']:.4f}",
                             *["" if r["organs"].get(o) is None else f"{r['organs'][o]:.4f}" for o in organs]])


def plot(rows: list[dict], organs: list[str], out: Path, budget: str) -> tuple[Path, Path]:
    """Mean Dice vs labelled volumes (mean ± sample sd over seeds, each seed a dot) and the per-organ heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in rows})
    colours = {"scratch": "tab:grey", "pretrained": "tab:red"}
    labels = {"scratch": "from scratch", "pretrained": "SparK-pretrained encoder"}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for k, init in enumerate(INITS):
        per_n = [[r["mean_dice"] for r in rows if r["n"] == n and r["init"] == init] for n in ns]
        mean = [np.mean(v) for v in per_n]
        std = [sample_sd(v) for v in per_n]
        shift = (k - 0.5) * 0.06  # side by side on the log axis
        xs = [n * (1 + shift) for n in ns]
        ax.errorbar(xs, mean, yerr=std, marker="o", capsize=4, color=colours[init], label=labels[init], lw=2)
        for x, v in zip(xs, per_n):
            ax.scatter([x] * len(v), v, s=12, color=colours[init], alpha=0.45, zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("labelled training volumes")
    ax.set_ylabel("mean Dice, 13 organs (validation phantoms)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(f"Label efficiency on phantoms\n{budget}", fontsize=9)
    fig.tight_layout()
    curve = out.with_suffix(".png")
    fig.savefig(curve, dpi=120)
    plt.close(fig)

    table = {init: np.array([[np.nanmean([r["organs"].get(o) if r["organs"].get(o) is not None else np.nan
                                          for r in rows if r["n"] == n and r["init"] == init]) for n in ns]
                             for o in organs]) for init in INITS}
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.32 * len(organs) + 1.8), sharey=True)
    panels = [("from scratch", table["scratch"], "viridis", (0, 1)),
              ("SparK-pretrained", table["pretrained"], "viridis", (0, 1)),
              ("pretrained − scratch", table["pretrained"] - table["scratch"], "RdBu", (-0.3, 0.3))]
    for ax, (title, values, cmap, (lo, hi)) in zip(axes, panels):
        im = ax.imshow(values, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if not np.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if cmap == "viridis" and values[i, j] < 0.5 else "black")
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set_xlabel("labelled volumes")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05)
    axes[0].set_yticks(range(len(organs)), organs, fontsize=8)
    fig.suptitle(f"Dice per organ, mean over seeds — {budget}", fontsize=9)
    fig.tight_layout()
    heat = out.with_name(out.name + "_organs.png")
    fig.savefig(heat, dpi=110)
    plt.close(fig)
    return curve, heat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=None, help="a pretrained encoder.pt (default: pretrain on the phantoms)")
    parser.add_argument("--datalist", default=None, help="labelled datalist (default: write phantoms)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8], help="labelled training volumes per point")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per point (at least 3 for error bars)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps of every run")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default: the demo config's)")
    parser.add_argument("--roi", type=int, default=None, help="crop size (default: the demo configs')")
    parser.add_argument("--spacing", type=float, default=None, help="isotropic spacing in mm (default: the demo configs')")
    parser.add_argument("--val-cases", type=int, default=4, help="validation phantoms (when the script writes them)")
    parser.add_argument("--out", default="label_efficiency", help="output prefix: OUT.csv, OUT.png, OUT_organs.png")
    parser.add_argument("--work", default=None, help="working folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="spark3d_label_eff_"))
    work.mkdir(parents=True, exist_ok=True)
    datalist = args.datalist or str(work / "data" / "dataset.json")
    if args.datalist is None and not Path(datalist).is_file():
        write_btcv_phantoms(work / "data", n_train=max(args.n), n_val=args.val_cases, n_test=0, seed=0)
    encoder = args.encoder or pretrain(work, datalist, args)

    rows = []
    for n in args.n:
        for seed in args.seeds:
            for init in INITS:
                summary = finetune_and_evaluate(work, datalist, encoder, n, init, seed, args)
                organs = {o: v["mean"] for o, v in summary["per_organ"].items()}
                rows.append({"n": n, "init": init, "seed": seed, "steps": args.steps, "mean_dice": summary["mean_dice"],
                             "organs": organs})
                print(f"n={n} {init:<10} seed {seed}: mean Dice {summary['mean_dice']:.3f}", flush=True)
    organs = list(rows[0]["organs"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out.with_suffix(".csv"), rows, organs)
    pretrain_budget = "demo pretraining" if args.pretrain_steps is None else f"{args.pretrain_steps} pretraining steps"
    budget = (f"{args.steps} fine-tuning steps per run, seeds {', '.join(map(str, args.seeds))}, "
              f"{pretrain_budget if args.encoder is None else 'encoder ' + Path(args.encoder).name}")
    curve, heat = plot(rows, organs, out, budget)

    print(f"\nlabel efficiency ({budget}; mean Dice of {len(organs)} organs, "
          f"mean ± sample sd (ddof 1) over {len(args.seeds)} seeds)")
    print(f"{'labelled volumes':>16} | {'from scratch':>14} | {'SparK-pretrained':>16}")
    for n in args.n:
        cells = []
        for init in INITS:
            v = [r["mean_dice"] for r in rows if r["n"] == n and r["init"] == init]
            cells.append(f"{np.mean(v):.3f} ± {sample_sd(v):.3f}")
        print(f"{n:>16} | {cells[0]:>14} | {cells[1]:>16}")
    print(f"\n{out.with_suffix('.csv')}\n{curve}\n{heat}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The report half of the transfer study: OUT.csv (a row per run and evaluation step), OUT.png, OUT.json."""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
from pathlib import Path

ARM_LABELS = {"scratch": "from scratch", "spark": "SparK", "control": "supervised control",
              "scratch-shipped": "from scratch, the config's own recipe", "random": "random encoder"}
COLOURS = {"scratch": "tab:grey", "spark": "tab:red", "control": "tab:blue", "random": "tab:grey",
           "scratch-shipped": "k"}
STYLES = {"scratch-shipped": ":"}  # scratch with the config's own recipe (the smallest labelled set): dotted
TESTED = ("control", "spark", "scratch-shipped")


def _describe(name: str, result: dict) -> dict:
    """kind / arm / labelled / seed of a run, from its name and options."""
    kw = result["kwargs"]
    if name.startswith("ft_"):
        kind, arm = "finetune", name.split("_")[2]
    elif name.startswith("probe_"):
        kind, arm = "probe", name.split("_")[1]
    elif name.startswith("select_budget_"):
        step = int(name.split("_")[2])
        kind, arm = "selection_budget", "scratch" if step == 0 else f"spark@{step}"
    else:
        kind, arm = "selection_recipe", name.split("_s")[0][len("select_recipe_"):]
    return {"kind": kind, "arm": arm, "labelled": kw["n"], "seed": kw["seed"], "recipe": kw.get("recipe", "config"),
            "encoder": Path(kw["encoder"]).name if kw.get("encoder") else ""}


def rows_of(results: dict) -> tuple[list[dict], list[str]]:
    """One row per fine-tuning run and evaluation step."""
    rows, organs = [], []
    for name in sorted(results):
        r = results[name]
        if r is None or r.get("fn") != "finetune":
            continue
        organs = organs or r["organs"]
        for e in r["evals"]:
            rows.append({"run": name, **_describe(name, r), "step": e["step"], "mean_dice": e["mean_dice"],
                         "encoder_drift": e["encoder_drift"], **{o: e["organs"].get(o) for o in r["organs"]}})
    return rows, organs


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def curves(rows: list[dict]) -> dict:
    """``{(n, arm): {step: [dice per seed]}}`` of the headline fine-tuning runs."""
    out: dict = {}
    for r in rows:
        if r["kind"] == "finetune":
            out.setdefault((r["labelled"], r["arm"]), {}).setdefault(r["step"], []).append(r["mean_dice"])
    return out


# (arm, baseline) pairs tested: each pretrained arm against scratch with the same (chosen) recipe, the effect of the
# encoder; and, where the chosen recipe is not the config's own, against scratch with the config's recipe too (so that a
# recipe that suits pretrained encoders but hurts scratch cannot make a gain)
PAIRS = (("control", "scratch"), ("spark", "scratch"))
SHIPPED_PAIRS = (("control", "scratch-shipped"), ("spark", "scratch-shipped"))


def goal_tests(rows: list[dict], args, recipe: str | None = None) -> tuple[list[dict], list[str]]:
    """The issue's tests at the final step: arm − baseline > 2 pooled sd (ddof=1), and the arm reaching the
    baseline's final Dice in at most half the steps (``scratch_*`` keys: the baseline's figures). ``recipe``: the
    chosen one (the pairs against the config's own recipe are tested when it is another)."""
    cur = curves(rows)
    tests, lines = [], []
    pairs = PAIRS + (SHIPPED_PAIRS if recipe not in (None, "config") else ())
    for n in args.labelled:
        for arm, baseline in pairs:
            base, arm_curve = cur.get((n, baseline), {}), cur.get((n, arm), {})
            if not base or max(base) not in arm_curve:
                continue
            last = max(base)
            s_mean, s_sd = _stats(base[last])
            a_mean, a_sd = _stats(arm_curve[last])
            pooled = math.sqrt((a_sd**2 + s_sd**2) / 2)
            reach = next((st for st in sorted(arm_curve) if statistics.mean(arm_curve[st]) >= s_mean), None)
            t = {"labelled": n, "arm": arm, "baseline": baseline, "step": last, "arm_mean": a_mean, "arm_sd": a_sd,
                 "scratch_mean": s_mean, "scratch_sd": s_sd, "difference": a_mean - s_mean, "pooled_sd": pooled,
                 "beats_by_2_pooled_sd": bool(a_mean - s_mean > 2 * pooled), "steps_to_scratch_final": reach,
                 "half_the_steps": bool(reach is not None and reach <= last / 2), "seeds": len(arm_curve[last])}
            tests.append(t)
            lines.append(f"  {n} labelled, {arm:<14} vs {baseline:<14}: {a_mean:.3f} ± {a_sd:.3f} vs {s_mean:.3f} ± "
                         f"{s_sd:.3f} at step {last}: difference {a_mean - s_mean:+.3f}, 2 pooled sd {2 * pooled:.3f} → "
                         f"{'beats' if t['beats_by_2_pooled_sd'] else 'does not beat'}; reaches the baseline's final "
                         f"Dice at step {reach}")
    return tests, lines


COLUMNS = ("run", "kind", "arm", "labelled", "seed", "recipe", "encoder", "step", "mean_dice", "encoder_drift")


def by_kind(rows: list[dict]) -> dict[str, dict]:
    """Final Dice per arm of the probe, the budget curve (pretraining steps, 0 = scratch) and the recipe candidates,
    the encoder drift at the first evaluation of every headline arm (the chain check), and each organ's Dice per seed
    at the headline's final step (``"n/arm"``), from the CSV rows."""
    out: dict[str, dict] = {"probe": {}, "budget_curve": {}, "recipe_scores": {}, "first_drift": {}, "per_organ": {}}
    first = min((r["step"] for r in rows if r["kind"] == "finetune"), default=None)
    last = max((r["step"] for r in rows if r["kind"] == "finetune"), default=None)
    organs = [k for k in (rows[0] if rows else {}) if k not in COLUMNS]
    for r in rows:
        if r["kind"] == "finetune" and r["step"] == last:  # each organ's Dice per seed at the final step
            cell = out["per_organ"].setdefault(f"{r['labelled']}/{r['arm']}", {})
            for organ in organs:
                if r[organ] is not None:
                    cell.setdefault(organ, []).append(r[organ])
        if r["kind"] == "probe":
            out["probe"].setdefault(r["arm"], []).append(r["mean_dice"])
        elif r["kind"] == "selection_budget":
            step = 0 if r["arm"] == "scratch" else int(r["arm"].split("@")[1])
            out["budget_curve"].setdefault(step, []).append(r["mean_dice"])
        elif r["kind"] == "selection_recipe":
            out["recipe_scores"].setdefault(r["arm"], []).append(r["mean_dice"])
        elif r["kind"] == "finetune" and r["step"] == first:
            out["first_drift"].setdefault(r["arm"], []).append(r["encoder_drift"])
    out["budget_curve"] = dict(sorted(out["budget_curve"].items()))
    return out


def write_csv(path: Path, rows: list[dict], organs: list[str]) -> None:
    cols = [*COLUMNS, *organs]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([("" if r.get(c) is None else f"{r[c]:.4f}" if isinstance(r[c], float) else r[c]) for c in cols])


def plot(path: Path, rows: list[dict], args, title: str) -> None:
    """Dice vs fine-tuning steps (mean ± sample sd over seeds) per labelled-set size, the probe, the budget curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cur = curves(rows)
    panels = len(args.labelled) + 2
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.8))
    for ax, n in zip(axes, args.labelled):
        for arm in ("scratch", *TESTED):
            c = cur.get((n, arm))
            if not c:
                continue
            steps = sorted(c)
            m = [statistics.mean(c[s]) for s in steps]
            sd = [statistics.stdev(c[s]) if len(c[s]) > 1 else 0.0 for s in steps]
            ax.plot(steps, m, marker="o", ms=3, color=COLOURS[arm], label=ARM_LABELS[arm], ls=STYLES.get(arm, "-"))
            ax.fill_between(steps, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=COLOURS[arm],
                            alpha=0.05 if arm in STYLES else 0.2)
        ax.set_title(f"{n} labelled volume{'s' if n > 1 else ''}", fontsize=10)
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice, 13 organs (validation)")
    if axes[0].get_legend_handles_labels()[0]:  # a partial report (written after every run) may have no curve yet
        axes[0].legend(fontsize=7, loc="upper left")
    ax = axes[-2]
    kinds = by_kind(rows)
    probe = kinds["probe"]
    for i, arm in enumerate(a for a in ("random", "spark", "control") if a in probe):
        m, sd = _stats(probe[arm])
        ax.bar(i, m, yerr=0 if math.isnan(sd) else sd, color=COLOURS[arm], capsize=4, alpha=0.8)
        ax.scatter([i] * len(probe[arm]), probe[arm], color="k", s=8, zorder=3)
    probe_labels = {"random": "random\nencoder", "spark": "SparK", "control": "supervised\ncontrol"}
    ax.set_xticks(range(len(probe)), [probe_labels[a] for a in ("random", "spark", "control")
                                      if a in probe], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"frozen-encoder probe\n({max(args.labelled)} labelled, {args.probe_steps} steps)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[-1]
    budget = kinds["budget_curve"]
    if budget:
        steps = sorted(budget)
        ax.errorbar(steps, [statistics.mean(budget[s]) for s in steps],
                    yerr=[statistics.stdev(budget[s]) if len(budget[s]) > 1 else 0 for s in steps], marker="o",
                    color="tab:red", capsize=3)
    ax.set_xlabel("SparK pretraining steps (0 = scratch)")
    ax.set_title(f"budget curve (selection split,\n1 labelled, {args.selection_steps} fine-tuning steps)", fontsize=10)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    top = max([r["mean_dice"] for r in rows] or [1.0])
    for ax in axes:  # one Dice scale for every panel, fitted to the values (Dice is low at these budgets)
        ax.set_ylim(0, min(1.0, 1.25 * top + 0.02))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    """The machine and the library versions."""
    import os

    import monai
    import numpy
    import pytorch_lightning
    import torch

    from spark3d.version import __version__

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "monai": monai.__version__, "pytorch_lightning": pytorch_lightning.__version__, "numpy": numpy.__version__,
            "spark3d": __version__, "torch_threads_per_run": 1}


def write_outputs(work: Path, args, results: dict, wall_seconds: float | None = None,
                  command: list[str] | None = None) -> dict:
    """OUT.csv, OUT.png and OUT.json from every finished run; returns the JSON's content. ``command``: the words
    of the study's command (its provenance; ``--report-only`` keeps the wall time the study's run recorded)."""
    previous = Path(args.out).with_suffix(".json")
    if wall_seconds is None and args.report_only and previous.is_file():
        wall_seconds = json.loads(previous.read_text()).get("wall_seconds")
    from transfer_runs import RECIPES, choose

    rows, organs = rows_of(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out.with_suffix(".csv"), rows, organs)
    expected = [f"select_budget_{m}_s{s}" for s in args.selection_seeds for m in [0, *args.milestones]]
    expected += [f"select_recipe_{r}_s{s}" for s in args.selection_seeds for r in args.recipes]
    selection_done = all(results.get(k) for k in expected)
    budget, recipe = choose(results, args) if selection_done else (None, None)
    tests, lines = goal_tests(rows, args, recipe)
    parts = [results[k] for k in sorted(results, key=lambda k: int(k.rsplit("_", 1)[1]) if k.startswith("pretrain_spark_")
                                            else 0) if k.startswith("pretrain_spark_") and results[k]]
    pre = None if not parts else {"seconds_per_step": statistics.mean(p["seconds_per_step"] for p in parts),
                                  "compute": parts[-1]["compute"], "losses": [x for p in parts for x in p["losses"]],
                                  "seconds": sum(p["seconds"] for p in parts),
                                  "milestones_done": [p["kwargs"]["stop"] for p in parts]}
    ctl = results.get("pretrain_control")
    kinds = by_kind(rows)
    chain = {arm: next((r["chain"] for k, r in sorted(results.items()) if k.startswith("ft_n") and f"_{arm}_" in k
                        and r.get("chain")), None) for arm in ("spark", "control")}
    head = [f"transfer study: {len(rows)} CSV rows from {sum(1 for r in results.values() if r)} runs"
            + ("" if wall_seconds is None else f", {wall_seconds / 60:.1f} min"),
            f"chosen on the selection split: pretraining budget {budget} steps, recipe '{recipe}'", *lines]
    summary = {
        "machine": machine(), "options": {k: v for k, v in vars(args).items()}, "recipes": RECIPES,
        "configs": {p.parent.name: p.read_text() for p in sorted((Path(work) / "configs").glob("*/*.yaml"))},
        "status": {"runs_done": sum(1 for r in results.values() if r), "pretraining_milestones_done":
                   None if pre is None else pre["milestones_done"]},
        "chosen": {"pretrain_budget": budget, "recipe": recipe}, "tests": tests, "chain": chain,
        "probe": kinds["probe"], "budget_curve": {str(k): v for k, v in kinds["budget_curve"].items()},
        "recipe_scores": kinds["recipe_scores"], "first_eval_encoder_drift": kinds["first_drift"],
        "per_organ_final": kinds["per_organ"],
        "pretraining": pre,
        "control_pretraining": None if ctl is None else {k: ctl.get(k) for k in ("seconds_per_step", "seconds",
                                                                                "own_val_dice", "val_cases")},
        "runs": {k: {"seconds": r["seconds"], "seconds_per_step": r.get("seconds_per_step"), "kwargs": r["kwargs"]}
                 for k, r in sorted(results.items()) if r},
        "csv_rows": len(rows), "wall_seconds": wall_seconds, "lines": head,
    }
    from spark3d.provenance import provenance

    summary["provenance"] = dict(provenance(command or ["python", "benchmarks/transfer.py"]),
                                 report_only=bool(args.report_only))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    real = getattr(args, "labelled_data", None)
    data = "given datalists" if real else f"phantoms ('{args.variation}')"
    pool = "the unlabelled datalist" if real else f"{args.unlabelled} unlabelled volumes"
    plot(out.with_suffix(".png"), rows, args,
         f"{data}, {Path(getattr(args, 'finetune_config', 'demo_ct.yaml')).stem} network; SparK on {pool}, budget "
         f"{'not chosen yet (selection unfinished)' if budget is None else f'{budget} steps'}; mean ± sample sd over "
         f"seeds {args.seeds}; {summary['status']['runs_done']} runs finished")
    return summary

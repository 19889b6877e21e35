"""Rewrite the README's result tables from the committed JSON files in ``docs/results/`` (and check they agree).

    python benchmarks/readme_tables.py            # rewrite every marked block of README.md
    python benchmarks/readme_tables.py --check    # exit 1 (naming the blocks) when a block differs from its JSON

A block is the text between ``<!-- table:NAME -->`` and ``<!-- /table -->`` (each on its own line); NAME picks a
renderer below, which reads only its JSON files and the keys they hold today (extra keys are ignored). A block
whose JSON is missing says so and names the command that writes it, instead of holding numbers. Every ± is the
mean ± the sample sd (ddof 1) over seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)

# how each result file is made (what a block without its JSON names)
COMMANDS = {
    "demo": "spark3d demo, then cp spark3d_demo/demo.json docs/results/demo.json",
    "data_throughput": "python benchmarks/data_throughput.py --blosc2 --jitter --rounds 5 "
                       "--json docs/results/data_throughput.json",
    "perf_encoder": "spark3d benchmark --config configs/pretrain/ct_segresnet.yaml --batch 2 --scope encoder "
                    "--modes masked-dense sparse --repeats 3 --json docs/results/perf_encoder_ct_segresnet.json "
                    "(one file per network: perf_encoder_<name>.json)",
    "perf_step": "spark3d benchmark --config configs/pretrain/ct_segresnet.yaml --batch 2 --decoder spark "
                 "--modes masked-dense --repeats 3 --no-memory --json docs/results/perf_step_ct_segresnet_before.json, "
                 "and with --decoder efficient --modes sparse into perf_step_ct_segresnet_after.json",
    "resenc_step": "python benchmarks/resenc_step.py --size 96 --batch 2 --repeats 3 --json docs/results/resenc_step.json",
    "probe": "python benchmarks/probe.py --work runs/probe --seeds 0 1 2 --json docs/results/probe.json",
    "transfer": "python benchmarks/transfer.py --work runs/transfer --out docs/transfer",
    "transfer_wide": "python benchmarks/transfer.py --variation wide --work runs/transfer_wide --out docs/transfer_wide",
    "convmae_step": "python benchmarks/convmae_step.py --batch 2 --repeats 3 --json docs/results/convmae_step.json",
    "bn_stats": "python benchmarks/bn_stats.py --work runs/bn_stats --json docs/results/bn_stats.json",
}
# the row order of the per-network tables (file-name stems after the prefix); other files follow, sorted
NETWORK_ORDER = ["ct_segresnet", "ct_resnet50", "ct_mednext", "ct_resenc_l", "dynunet", "timm_resnet50",
                 "timm_efficientnet_b0"]


# ------------------------------------------------------------------------------------------------ helpers
def load(path: Path) -> dict[str, Any] | None:
    """A result file's content, or ``None`` when it is not there."""
    return json.loads(path.read_text()) if path.is_file() else None


def num(value: float | None, digits: int = 2) -> str:
    """A figure as the tables print it (``–`` for none or NaN)."""
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def gflop(value: float | None) -> str:
    """GFLOP with one decimal, two below 1 (so a small decoder does not read as zero)."""
    return num(value, 1 if value is None or value != value or value >= 1 else 2)


def mean_sd(values: list[float]) -> str:
    """``mean ± sample sd`` (ddof 1) over seeds."""
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {num(sd, 3)}"


def shown(path: Path) -> str:
    """A result file's path as the README names it (relative to the repository when inside it)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def source(path: Path, payload: dict[str, Any]) -> str:
    """One line naming the file, its command, the machine, the load and the date (from its provenance block)."""
    rel = shown(path)
    prov = payload.get("provenance")
    if not prov and "machine" in payload:  # a report written without the provenance block: its own machine only
        prov = {"machine": payload["machine"], "command": "not recorded", "date": "date not recorded"}
    if not prov:
        return f"`{rel}` (written before result files recorded their machine; no provenance block)"
    mach, ver = prov.get("machine", {}), prov.get("versions", {})
    load = mach.get("load_average")
    return (f"`{rel}`: `{prov.get('command', '?')}` on {mach.get('cpu_model', mach.get('processor', '?'))}, "
            f"{mach.get('cores_available', mach.get('cpu_count', '?'))} cores, torch threads {mach.get('threads', '?')}"
            f"{f', load {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)' if load else ''}; "
            f"torch {ver.get('torch', mach.get('torch', '?'))}, MONAI {ver.get('monai', '?')}, timm {ver.get('timm', '?')}, "
            f"Lightning {ver.get('pytorch-lightning', '?')}; {prov.get('date', '?')}, "
            f"commit {str(prov.get('git', {}).get('commit', '?'))[:9]}")


def missing(name: str) -> str:
    """The block text of a table whose result file is not committed yet."""
    return f"*No committed result yet: `{COMMANDS[name]}` writes it; then `python benchmarks/readme_tables.py`.*\n"


def networks(results: Path, prefix: str) -> list[tuple[str, Path]]:
    """``(network, file)`` of every ``<prefix><network>.json``, in :data:`NETWORK_ORDER` then sorted."""
    found = {p.name[len(prefix):-len(".json")]: p for p in sorted(results.glob(f"{prefix}*.json"))}
    order = [n for n in NETWORK_ORDER if n in found] + sorted(n for n in found if n not in NETWORK_ORDER)
    return [(n, found[n]) for n in order]


def setting(report: dict[str, Any]) -> str:
    """Input size, batch and mask ratio of a ``spark3d benchmark`` report."""
    return f"{'×'.join(map(str, report['input_size']))}, batch {report['batch']}, mask {report['mask_ratio']:g}"


# ------------------------------------------------------------------------------------------------ renderers
def render_demo(results: Path) -> str:
    """The demo's Dice line: mean Dice, the lowest organs, the liver, and the time of each stage."""
    demo = load(results / "demo.json")
    if demo is None:
        return missing("demo")
    organs = {o: d for o, d in demo["per_organ_dice"].items() if d is not None}
    low = sorted(organs.items(), key=lambda kv: kv[1])
    stages = ", ".join(f"{stage} {seconds / 60:.1f}" for stage, seconds in demo["stages_s"].items())
    return (f"Measured: mean Dice {demo['mean_dice']:.3f} over the {len(demo['per_organ_dice'])} organs of the "
            f"validation phantoms, every organ ≥ {low[0][1]:.2f} (lowest: "
            f"{', '.join(f'{o} {d:.2f}' for o, d in low[:3])}; highest: {low[-1][0]} {low[-1][1]:.2f}); "
            f"{demo['total_s'] / 60:.1f} minutes in all (minutes: {stages}).\n"
            f"Source: {source(results / 'demo.json', demo)}.\n")


def render_data_throughput(results: Path) -> str:
    """Crops per second of each source (wall and CPU), × uncached, loader rates; bytes on disk."""
    tp = load(results / "data_throughput.json")
    if tp is None:
        return missing("data_throughput")
    s = tp["settings"]
    lines = [f"{s['volumes']} phantoms of {'×'.join(map(str, s['shape']))} at {'×'.join(f'{v:g}' for v in s['spacing'])} "
             f"mm, random {s['roi']}³ crops, {s['num_samples']} per volume read, flips p=0.5 per axis; one torch thread; "
             f"medians over {s['rounds']} interleaved rounds (range in brackets). On a loaded machine crops per "
             "CPU-second is the closer estimate of one quiet core.", "",
             f"| source | crops/s (1 process) | crops per CPU-s | × uncached | {s['workers']} workers, crops/s |",
             "|---|---|---|---|---|"]
    for name, r in tp["sources"].items():
        wall, cpu = r["crops_per_s"], r["crops_per_cpu_s"]
        lines.append(f"| {name} | {statistics.median(wall):.1f} ({min(wall):.1f}–{max(wall):.1f}) | "
                     f"{statistics.median(cpu):.1f} | {statistics.median(r['x_uncached']):.1f} | "
                     f"{num(r.get('workers_crops_per_s'), 0)} |")
    for name, rate in tp.get("workers_only", {}).items():
        lines.append(f"| {name} | – | – | – | {num(rate, 0)} |")
    sizes = tp["bytes_on_disk"]
    raw = next(iter(sizes.values()))
    lines += ["", "On disk: " + "; ".join(f"{name} {b / 1e6:.1f} MB ({b / raw:.2f}×)" for name, b in sizes.items()) + ".",
              "", f"Source: {source(results / 'data_throughput.json', tp)}."]
    return "\n".join(lines) + "\n"


def render_perf_encoder(results: Path) -> str:
    """Encoder forward + backward: masked-dense vs sparse time, peak memory and FLOPs, one row per network."""
    rows = networks(results, "perf_encoder_")
    if not rows:
        return missing("perf_encoder")
    lines = ["| network | input, batch, mask | masked-dense s | sparse s (of it: mask setup) | time ratio | "
             "masked-dense MB | sparse MB | memory ratio | encoder GFLOP / sample, masked-dense → sparse |",
             "|---|---|---|---|---|---|---|---|---|"]
    sources = []
    for _, path in rows:
        r = json.loads(path.read_text())
        md, sp = r["modes"]["masked-dense"], r["modes"]["sparse"]
        ratio = r["ratios"].get("sparse/masked-dense", {})
        setup = f" ({num(sp['setup_s'], 3)})" if sp.get("setup_s") is not None else " (not recorded)"
        lines.append(f"| {r['name']} | {setting(r)} | {num(md['median_s'])} | {num(sp['median_s'])}{setup} | "
                     f"**{num(ratio.get('time'))}** | {num(md['peak_mb'], 0)} | {num(sp['peak_mb'], 0)} | "
                     f"**{num(ratio.get('memory'))}** | {gflop(md['encoder_gflop'])} → {gflop(sp['encoder_gflop'])} |")
        sources.append(f"- {source(path, r)}")
    return "\n".join(lines + ["", "Medians of each file's `repeats` after warm-up; sources:", *sources]) + "\n"


def render_perf_step(results: Path) -> str:
    """Whole pretraining step, before (faithful decoder, masked-dense) and after (efficient decoder, sparse)."""
    pairs = [(n, p, p.with_name(p.name.replace("_before.json", "_after.json")))
             for n, p in networks(results, "perf_step_") if n.endswith("_before")]
    pairs = [(n, b, a) for n, b, a in pairs if a.is_file()]
    if not pairs:
        return missing("perf_step")
    lines = ["| network | input, batch, mask | before s | after s | speed-up | densify + decoder GFLOP / sample, "
             "faithful → efficient (encoder) |", "|---|---|---|---|---|---|"]
    sources = []
    for _, b_path, a_path in pairs:
        before, after = json.loads(b_path.read_text()), json.loads(a_path.read_text())
        b, a = before["modes"]["masked-dense"], after["modes"]["sparse"]
        lines.append(f"| {before['name']} | {setting(before)} | {num(b['median_s'])} | {num(a['median_s'])} | "
                     f"**{num(b['median_s'] / a['median_s'], 1)}×** | {gflop(b['decoder_gflop'])} → "
                     f"{gflop(a['decoder_gflop'])} ({gflop(b['encoder_gflop'])}) |")
        sources += [f"- {source(b_path, before)}", f"- {source(a_path, after)}"]
    return "\n".join(lines + ["", "Sources:", *sources]) + "\n"


def render_resenc_step(results: Path) -> str:
    """SparK step on ResEnc-L against the default SegResNet config."""
    r = load(results / "resenc_step.json")
    if r is None:
        return missing("resenc_step")
    lines = ["| network | median step s | encoder M parameters | mask ratio |", "|---|---|---|---|"]
    for name, m in r["models"].items():
        lines.append(f"| {name} | {num(statistics.median(m['times_s']))} | {num(m['encoder_mparams'], 1)} | "
                     f"{m['mask_ratio']:g} |")
    lines += ["", f"Input {r['size']}³, batch {r['batch']}, {r['repeats']} interleaved repeats; "
              f"ratio resenc_l / segresnet {num(r['ratio'])}. Source: {source(results / 'resenc_step.json', r)}."]
    return "\n".join(lines) + "\n"


def render_probe(results: Path) -> str:
    """Frozen-encoder probe and label-efficiency fine-tune, scratch / faithful / efficient decoder."""
    path = results / "probe.json"
    if not path.is_file() and (results.parent / "probe.json").is_file():
        path = results.parent / "probe.json"  # the study's first file, before result files moved to docs/results/
    probe = load(path)
    if probe is None:
        return missing("probe")
    a, res = probe["args"], probe["results"]
    names = {"scratch": "scratch", "faithful": "faithful decoder (`spark`)", "efficient": "efficient decoder"}
    lines = [f"| pretraining | frozen-encoder probe ({a['probe_steps']} steps) | fine-tune, {a['n_labelled']} labelled "
             f"volumes ({a['finetune_steps']} steps) |", "|---|---|---|"]
    for init in res["probe"]:
        lines.append(f"| {names.get(init, init)} | {mean_sd(res['probe'][init])} | "
                     f"{mean_sd(res['label_efficiency'][init])} |")
    lines += ["", f"Seeds {', '.join(map(str, a['seeds']))}, mask {a['mask_ratio']:g}, {a['pretrain_steps']} pretraining "
              f"steps; mean ± sample sd over seeds. Source: {source(path, probe)}."]
    return "\n".join(lines) + "\n"


TRANSFER_ARMS = {"scratch": "from scratch", "control": "supervised control", "spark": "SparK",
                 "scratch-shipped": "from scratch, the config's own recipe", "random": "random encoder"}


def render_transfer(results: Path, name: str = "transfer") -> str:
    """The transfer study's tests of the goal, the control's own Dice, probe, budget curve, recipe choice and time
    (``docs/<name>.json``)."""
    path = results.parent / f"{name}.json"
    study = load(path)
    if study is None:
        return missing(name)
    arms = TRANSFER_ARMS
    o = study["options"]
    chosen = study.get("chosen", {})
    lines = ["| labelled | arm | baseline | arm Dice | baseline Dice | difference | 2 pooled sd | beats by > 2 pooled sd "
             "| first step at the baseline's final Dice |", "|---|---|---|---|---|---|---|---|---|"]
    for t in study["tests"]:
        lines.append(f"| {t['labelled']} | {arms[t['arm']]} | {arms[t['baseline']]} | "
                     f"{t['arm_mean']:.3f} ± {num(t['arm_sd'], 3)} | "
                     f"{t['scratch_mean']:.3f} ± {num(t['scratch_sd'], 3)} | {t['difference']:+.3f} | "
                     f"{2 * t['pooled_sd']:.3f} | {'**yes**' if t['beats_by_2_pooled_sd'] else 'no'} | "
                     f"{t['steps_to_scratch_final'] if t['steps_to_scratch_final'] is not None else 'not reached'} "
                     f"of {t['step']} |")
    lines += ["", f"Mean ± sample sd over seeds {', '.join(map(str, o['seeds']))}; validation Dice of 13 organs on "
              f"{o['val_cases']} cases after {o['finetune_steps']} fine-tuning steps, every arm with the chosen recipe "
              f"(`{chosen.get('recipe')}`) unless the row says otherwise."]
    ctl = study.get("control_pretraining") or {}
    if ctl.get("own_val_dice") is not None:
        lines.append(f"The positive control's own network ({o['control_steps']} supervised steps on "
                     f"{o['control_cases']} labelled phantoms): mean Dice {ctl['own_val_dice']:.3f} on its "
                     f"{ctl['val_cases']} validation phantoms.")
    probe = study.get("probe") or {}
    if probe:
        lines.append(f"Frozen-encoder probe ({o['probe_steps']} steps, {max(o['labelled'])} labelled): "
                     + "; ".join(f"{arms[a]} {mean_sd(probe[a])}" for a in ("random", "spark", "control")
                                 if a in probe) + ".")
    budget = study.get("budget_curve") or {}
    if budget:
        runs = study["runs"]
        first = next((runs[k]["kwargs"]["recipe"] for k in sorted(runs) if k.startswith("select_budget_")), "?")
        lines.append(f"Budget curve (selection split, 1 labelled, {o['selection_steps']} steps, recipe `{first}`; "
                     "0 = scratch): "
                     + "; ".join(f"{k} steps {mean_sd(v)}" for k, v in budget.items())
                     + f". Chosen: {chosen.get('pretrain_budget')} pretraining steps.")
    if study.get("recipe_scores") is not None and chosen.get("recipe"):
        scores, given = study["recipe_scores"], o.get("recipes", [])
        order = [r for r in given if r in scores] + [r for r in scores if r not in given]  # as the candidates were given
        lines.append("Recipe for pretrained encoders (selection split, the final SparK encoder): "
                     + "; ".join(f"`{r}` {mean_sd(scores[r])}" for r in order)
                     + ("" if "config" in scores else  # the earlier order: config = a budget point
                        f"; `config` is the budget curve's {o['pretrain_steps']}-step point")
                     + f". Chosen: `{chosen['recipe']}`.")
    pre = study.get("pretraining") or {}
    wall = study.get("wall_seconds")
    work = sum(r["seconds"] for r in study["runs"].values()) / 60
    lines.append(f"{study['status']['runs_done']} runs; SparK pretraining {num(pre.get('seconds_per_step'))} s/step "
                 f"({pre.get('compute', '?')} path); the runs took {work:.0f} worker-minutes in all; the command took "
                 f"{'–' if wall is None else f'{wall / 60:.1f} min'} on {o['workers']} workers, phantoms and store "
                 f"included. Source: {source(path, study)}.")
    return "\n".join(lines) + "\n"


def render_transfer_organs(results: Path, name: str = "transfer") -> str:
    """Each organ's Dice (mean over seeds) at the transfer study's final fine-tuning step, per labelled set and arm."""
    path = results.parent / f"{name}.json"
    study = load(path)
    if study is None or not study.get("per_organ_final"):
        return missing(name)
    cells = study["per_organ_final"]
    organs = list(next(iter(cells.values())))
    order = list(TRANSFER_ARMS)
    keys = sorted(cells, key=lambda k: (int(k.split("/")[0]), order.index(k.split("/")[1])))
    lines = ["| labelled | arm | " + " | ".join(organs) + " |", "|---|---|" + "---|" * len(organs)]
    for key in keys:
        n, arm = key.split("/")
        lines.append(f"| {n} | {TRANSFER_ARMS[arm]} | "
                     + " | ".join(num(statistics.mean(cells[key][o]), 2) if cells[key].get(o) else "–" for o in organs)
                     + " |")
    o = study["options"]
    lines += ["", f"Mean over seeds {', '.join(map(str, o['seeds']))} after {o['finetune_steps']} fine-tuning steps "
              f"({o['val_cases']} validation phantoms). Source: `docs/{name}.json` (`per_organ_final`; per seed and "
              f"step in `docs/{name}.csv`)."]
    return "\n".join(lines) + "\n"


def render_transfer_chain(results: Path) -> str:
    """The chain from pretraining to fine-tuning, link by link, as the transfer study measured it (``docs/transfer.json``)
    and the BatchNorm row (``docs/results/bn_stats.json``)."""
    path = results.parent / "transfer.json"
    study = load(path)
    head = ["| link | measurement | finding |", "|---|---|---|"]
    if study is None:
        return "\n".join(head) + f"\n| (all) | – | {missing('transfer').strip()} |\n" + render_bn_stats(results)
    chain = {a: c for a, c in (study.get("chain") or {}).items() if c}
    names = {"spark": "SparK", "control": "control"}
    keys = "; ".join(f"{names[a]}: {c['matched']} of {c['file_tensors']} tensors, max abs difference "
                     f"{c['max_abs_diff_after_load']:g}" for a, c in chain.items())
    inputs = "; ".join(f"{names[a]}: {'none' if not c['input_mismatches'] else ', '.join(c['input_mismatches'])}"
                       for a, c in chain.items())
    norms = sorted({n for c in chain.values() for n in c["norm_layers"]})
    drift = study.get("first_eval_encoder_drift") or {}
    o = study["options"]
    ctl = study.get("control_pretraining") or {}
    rows = [
        f"| `encoder.pt` → fine-tuning network | tensors of the file matched by key, then the loaded encoder compared "
        f"with the file | {keys} (an encoder.pt of another network is refused in one line: `CheckpointError`, "
        f"`tests/test_transfer.py::test_supervised_encoder_round_trips_and_foreign_encoder_is_refused`) |",
        f"| intensity window, spacing, channels | `encoder.pt` meta against the fine-tuning data module's | mismatches "
        f"found: {inputs}. Fine-tuning warns in one line naming the keys when they differ "
        f"(`spark3d.networks.pretraining_mismatches`); the channel count is part of the identity check |",
        f"| normalisation statistics (the study's network) | the norm layers of the fine-tuning network | "
        f"{', '.join(norms) or '–'}: no running statistics travel from masked pretraining for this network |",
        f"| the encoder in the first steps | relative encoder drift ‖θ−θ₀‖/‖θ₀‖ at the first evaluation (step "
        f"{min(o['eval_every'], o['finetune_steps'])}), min–max over runs (`encoder_drift` in `docs/transfer.csv`) | "
        + "; ".join(f"{TRANSFER_ARMS[a]} {min(v):.2f}–{max(v):.2f}" for a, v in sorted(drift.items())) + " |",
        f"| the positive control | its own network's validation Dice before its encoder is handed on | "
        f"{num(ctl.get('own_val_dice'), 3)} after {o['control_steps']} supervised steps on {o['control_cases']} phantoms |",
    ]
    bn = render_bn_stats(results)
    return "\n".join(head + rows) + "\n" + bn.replace("\nSource:", "\n\nSource:", 1) + f"Source: {source(path, study)}.\n"


def render_convmae_step(results: Path) -> str:
    """ConvMAE's whole step at its mask ratio against the same model with every token visible."""
    path = results / "convmae_step.json"
    r = load(path)
    if r is None:
        return missing("convmae_step")
    med = r["median_s"]
    lines = ["| model | input, batch | compute | step, mask 0 s | step, mask " f"{r['mask_ratio']:g} s | time ratio |",
             "|---|---|---|---|---|---|",
             f"| {Path(r['config']).stem} | {'×'.join(map(str, r['input_size']))}, batch {r['batch']} | "
             f"{r['plans']['masked']['path']} | {num(med['dense'])} | {num(med['masked'])} | "
             f"**{num(r['ratio_masked_to_dense'])}** |"]
    if "ratio_masked_dense" in r:
        lines.append(f"| {Path(r['config']).stem} | {'×'.join(map(str, r['input_size']))}, batch {r['batch']} | "
                     f"masked-dense | {num(med['dense, masked-dense'])} | {num(med['masked, masked-dense'])} | "
                     f"**{num(r['ratio_masked_dense'])}** |")
    lines += ["", f"{r['visible_tokens']} of {r['tokens']} tokens visible; medians of {r['repeats']} interleaved "
              f"repeats after {r['warmup']} warm-up, a fresh mask every step. Source: {source(path, r)}."]
    return "\n".join(lines) + "\n"


def render_bn_stats(results: Path) -> str:
    """One row of the chain table: BatchNorm running statistics from masked pretraining against a dense re-estimate
    (what was measured, the decision), then its source line."""
    path = results / "bn_stats.json"
    r = load(path)
    if r is None:  # still one row, so that the table around it stays a table
        return f"| BatchNorm running statistics (resnet18) | {missing('bn_stats').strip()} | – |\n"
    pre, s, st, w = r["pretraining"], r["summary"], r["settings"], r["washout"]
    feats = r["eval_features_rel_l2"]
    taps = [t for t in feats if t != "logits"]
    at_k = next((row for row in w["steps"] if row["step"] == w["k_under_1pc"]), None)
    check = (f"measured weight {max(at_k['measured_weight_mean'], at_k['measured_weight_var']):.4f} at step "
             f"{at_k['step']}, residual to the dense estimate {at_k['pretrained_start']['mean_rel_diff']:.3f} "
             f"(from the dense estimate itself: {at_k['dense_start']['mean_rel_diff']:.3f}; medians of "
             f"‖μ−μ_dense‖/‖μ_dense‖)") if at_k else "not reached by the check"
    measured = (f"`encoder.pt`'s running statistics vs a dense re-estimate over {st['estimate_crops']} fine-tuning "
                f"crops, {r['bn_layers']} BN layers: ‖μ_pre−μ_dense‖/‖μ_dense‖ median {s['mean_rel_diff']['median']:.2f} "
                f"(max {s['mean_rel_diff']['max']:.2f}, {s['mean_rel_diff']['max_layer']}), shift median "
                f"{s['mean_shift_sd']['median']:.2f} dense sd (max {s['mean_shift_sd']['max']:.2f}, "
                f"{s['mean_shift_sd']['max_layer']}), mean abs log var ratio median "
                f"{s['var_abs_log_ratio']['median']:.2f} (max {s['var_abs_log_ratio']['max']:.2f}, "
                f"{s['var_abs_log_ratio']['max_layer']}); eval-mode features on {len(st['validation_volumes'])} "
                f"validation phantoms differ by {' / '.join(f'{feats[t]:.0%}' for t in taps)} (relative L2, "
                f"{taps[0]}–{taps[-1]}), logits {feats['logits']:.0%}; momentum {w['momentum']:g}: under 1 % weight "
                f"after k = {w['k_under_1pc']} steps, {check}")
    title = (f"BatchNorm running statistics (resnet18, {pre['steps']} SparK steps at mask "
             f"{st['mask_ratio']:g}, {pre['compute']} path, {'×'.join(map(str, st['roi']))} crops)")
    return f"| {title} | {measured} | {r['decision']} |\nSource: {source(path, r)}.\n"


RENDERERS: dict[str, Callable[[Path], str]] = {
    "demo": render_demo, "data_throughput": render_data_throughput, "perf_encoder": render_perf_encoder,
    "perf_step": render_perf_step, "resenc_step": render_resenc_step, "probe": render_probe,
    "transfer": render_transfer, "transfer_organs": render_transfer_organs, "transfer_chain": render_transfer_chain,
    "transfer_wide": lambda results: render_transfer(results, "transfer_wide"),
    "transfer_wide_organs": lambda results: render_transfer_organs(results, "transfer_wide"),
    "convmae_step": render_convmae_step, "bn_stats": render_bn_stats}


# ------------------------------------------------------------------------------------------------ the rewrite
def blocks(text: str) -> dict[str, str]:
    """Every marked block's name and current content."""
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def rewrite(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked block rendered afresh from ``results`` (an unknown block name is an error)."""
    unknown = sorted(set(blocks(text)) - set(RENDERERS))
    if unknown:
        raise SystemExit(f"README.md: unknown table block(s) {unknown}; known: {sorted(RENDERERS)}")
    return BLOCK.sub(lambda m: m.group(1) + RENDERERS[m.group(2)](results) + m.group(4), text)


def differing(text: str, results: Path = RESULTS) -> list[str]:
    """The names of the blocks whose content differs from what their JSON renders."""
    fresh = blocks(rewrite(text, results))
    return [name for name, content in blocks(text).items() if fresh[name] != content]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a block differs")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    if args.check:
        stale = differing(text, args.results)
        if stale:
            print(f"{args.readme}: table block(s) {', '.join(stale)} differ from {args.results}; "
                  "run python benchmarks/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(rewrite(text, args.results))
    print(f"{args.readme}: {len(blocks(text))} table block(s) rendered from {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

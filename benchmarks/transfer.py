"""The transfer study: does SparK pretraining on unlabelled phantoms make segmentation better with few labels?

    python benchmarks/transfer.py --work runs/transfer --out docs/transfer          # the full study (< 1 hour, 2 cores)
    python benchmarks/transfer.py --work runs/transfer_quick --out OUT --quick      # minutes: the test's
    python benchmarks/transfer.py --work runs/btcv --out runs/btcv/transfer \
        --labelled-data btcv.json --selection-data sel.json --control-data ctl.json --unlabelled-data pool.json \
        --pretrain-config configs/pretrain/ct_segresnet.yaml --finetune-config configs/finetune/btcv.yaml \
        --accelerator gpu --workers 1                                             # the same protocol on real data

One command, resumable (every finished run is a JSON in WORK/runs and is reused). It writes four disjoint phantom
sets (``--variation``, default "context"): the labelled + validation cases of the headline numbers, a separate
*selection* split (labelled + validation) on which the pretraining budget and the fine-tuning recipe are chosen, a
labelled pool (+ its own validation cases) for the positive control, and the unlabelled pool (>= 64 volumes, written
once to a CT store with ``spark3d preprocess``). Then, with the demo network and configs (SegResNet, 32³ crops at 6 mm):

1. SparK pretraining from the store (sparse path, ``compute: auto``), an encoder.pt at every milestone;
2. a supervised encoder (the positive control): the same network trained on the control pool's labels long enough
   to segment on its own (its own validation Dice is recorded: a control that has learned little controls nothing);
3. the budget curve: Dice on the selection split after fine-tuning each milestone encoder (and scratch);
   the budget is the milestone with the best mean; the recipe for pretrained encoders likewise (candidates);
4. fine-tuning curves: 1, 2, 4 labelled volumes x seeds x {scratch, spark, control}, all three with the recipe
   chosen on the selection split (the recipe held equal, so that a difference is the encoder's), the same steps,
   data order and seeds, validation Dice of the 13 organs every ``--eval-every`` steps; at the smallest labelled
   set also scratch with the config's own recipe (is the chosen recipe unfair to scratch?);
5. a frozen-encoder probe (the decoder trained on a frozen encoder) for random, spark and control.

Outputs OUT.csv (one row per run and evaluation step, Dice per organ), OUT.png, OUT.json (machine, versions,
every option, choices, chain checks, the tests of the goal). Runs are in-process Lightning fits of the library's
SparKPretrain / SegmentationModule / CTPretrainData / SegmentationData, encoder.pt loaded by the library.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from transfer_report import write_outputs  # noqa: E402  (the report half: CSV, PNG, JSON)

CONFIGS = Path(__file__).parents[1] / "configs"
ARMS = ("scratch", "spark", "control")  # every headline arm fine-tunes with the recipe chosen on the selection split
SHIPPED = "scratch-shipped"  # scratch with the config's own recipe, at the smallest labelled set
PROBES = ("random", "spark", "control")
VARIATION = "context"  # the phantoms' variation (--variation): organs told apart by shape and place, not HU alone
SEEDS = {"headline": 10, "selection": 11, "control": 12, "unlabelled": 13}  # phantom seeds: disjoint case ids
# sizes (README, Pretraining evidence, says why each is what it is): the control is trained until it segments on its
# own (1600 steps; at 400, the earlier study's figure, its own validation Dice was 0.18 in a pilot), fine-tuning runs
# 400 steps, half the demo's (what 30 headline runs can take for the study to fit an hour on 2 cores at the step
# times measured on a quiet machine; scratch is still learning there), the selection split 200; the recipe candidates
# are every knob the issue names for the encoder's first steps (lr, warm-up, layer decay, a frozen start)
FULL = dict(labelled=[1, 2, 4], seeds=[0, 1, 2], val_cases=6, selection_val=3, selection_seeds=[0, 1],
            control_cases=16, control_val=2, unlabelled=64, shape=[96, 96, 48], pretrain_steps=3000,
            milestones=[500, 1500, 3000], control_steps=1600, finetune_steps=400, eval_every=50,
            probe_steps=100, selection_steps=200,
            recipes=["config", "layer_decay", "freeze", "freeze_decay", "low_lr", "low_lr_decay"])
QUICK = dict(labelled=[1, 2], seeds=[0, 1], val_cases=1, selection_val=1, selection_seeds=[0],
             control_cases=2, control_val=1, unlabelled=4, shape=[48, 48, 24], pretrain_steps=4, milestones=[2, 4],
             control_steps=4, finetune_steps=4, eval_every=2, probe_steps=2, selection_steps=2,
             recipes=["config", "layer_decay", "freeze_decay"])


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Options; ``--quick`` and the full study differ only in sizes (each size can still be given)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder of the phantoms, the store and every run (reused)")
    p.add_argument("--out", default="docs/transfer", help="output prefix: OUT.csv, OUT.png, OUT.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test's): minutes, numbers mean nothing")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes, one thread each)")
    p.add_argument("--unlabelled-seed", type=int, default=SEEDS["unlabelled"],
                   help="phantom seed of the unlabelled pool (must differ from every labelled set's)")
    p.add_argument("--report-only", action="store_true", help="write OUT.* from the finished runs, run nothing")
    p.add_argument("--variation", default=VARIATION, choices=["wide", "context"],
                   help=f"phantom variation of the four sets (spark3d/data/phantoms.py; default {VARIATION})")
    real = p.add_argument_group("real data, instead of the phantoms (all four datalists together; decathlon-style JSON)")
    real.add_argument("--labelled-data", help="the headline cases: 'training' (the first N are the labelled sets), "
                      "'validation' (every reported Dice)")
    real.add_argument("--selection-data", help="the selection split (budget and recipe are chosen on it): 'training' "
                      "(its first case is fine-tuned), 'validation'")
    real.add_argument("--control-data", help="the positive control's labelled pool: 'training', 'validation' (its "
                      "own Dice)")
    real.add_argument("--unlabelled-data", help="the pretraining pool: 'training' images (labels ignored)")
    p.add_argument("--pretrain-config", default=str(CONFIGS / "pretrain" / "demo_ct.yaml"),
                   help="SparK pretraining config (default: the demo's, with the efficient decoder)")
    p.add_argument("--finetune-config", default=str(CONFIGS / "finetune" / "demo_ct.yaml"),
                   help="fine-tuning config (default: the demo's); its recipe is the 'config' candidate")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu", "auto"],
                   help="where each run trains (cpu: one torch thread per worker; gpu: use --workers 1 per GPU)")
    for key, value in FULL.items():
        kind = type(value[0]) if isinstance(value, list) else type(value)
        p.add_argument("--" + key.replace("_", "-"), type=kind, nargs="+" if isinstance(value, list) else None,
                       default=None, help=f"default {value} (quick: {QUICK[key]})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> None:
    """The one-line refusals, before anything is written."""
    from spark3d.errors import ConfigError

    from transfer_runs import RECIPES

    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise ConfigError(f"--recipes {' '.join(unknown)}: unknown; the candidates are {', '.join(RECIPES)}")
    if len(args.seeds) < 2:
        raise ConfigError(f"--seeds {args.seeds}: at least 2 seeds are needed for a sample sd (3 or more advised)")
    if args.unlabelled_seed in (SEEDS["headline"], SEEDS["selection"]):
        raise ConfigError(f"--unlabelled-seed {args.unlabelled_seed} draws the labelled/validation phantoms: the "
                          "unlabelled pool would contain labelled cases (use another seed)")
    if not args.quick and args.unlabelled < 64:
        raise ConfigError(f"--unlabelled {args.unlabelled}: the study needs an unlabelled pool of at least 64 volumes")
    if sorted(args.milestones)[-1] != args.pretrain_steps:
        raise ConfigError(f"--milestones {args.milestones} must end at --pretrain-steps {args.pretrain_steps}")
    given = [k for k in REAL_DATA if getattr(args, k)]
    if given and len(given) < len(REAL_DATA):
        missing = [f"--{k.replace('_', '-')}" for k in REAL_DATA if not getattr(args, k)]
        raise ConfigError(f"real data needs all four datalists: {', '.join(missing)} missing")
    for key in (*given, "pretrain_config", "finetune_config"):
        if not Path(getattr(args, key)).is_file():
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(args, key)}: no such file")


REAL_DATA = ("labelled_data", "selection_data", "control_data", "unlabelled_data")  # --X-data, in write_data's order


RUN_ONLY = ("work", "out", "workers", "report_only")  # options that do not change what a run computes


def check_work(work: Path, args: argparse.Namespace, record: bool = False) -> None:
    """A study folder belongs to one set of options: its finished runs are reused by name, so resuming it with other
    sizes or data would mix runs of two studies. Once the data are checked the options are recorded
    (``record``: WORK/options.json); a later call with others is refused in one line naming them."""
    from spark3d.errors import ConfigError

    mine = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    path = work / "options.json"
    if path.is_file():
        theirs = json.loads(path.read_text())
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            found = ", ".join(f"--{k.replace('_', '-')} {theirs.get(k)}" for k in differ)
            raise ConfigError(f"{work} holds a study run with other options ({found}): resume it with those, "
                              "or use another --work")
    elif record:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1))


def write_data(work: Path, args: argparse.Namespace) -> dict[str, str]:
    """The four sets (phantoms written once, or the given datalists, checked) and the unlabelled pool's CT store;
    returns their paths."""
    from spark3d.cli.commands import run_preprocess
    from spark3d.data.phantoms import write_btcv_phantoms
    from spark3d.errors import DataError

    from transfer_runs import check_disjoint, snapshot_configs

    names = ("headline", "selection", "control", "unlabelled")
    if args.labelled_data:
        paths = {name: str(Path(getattr(args, key)).resolve()) for name, key in zip(names, REAL_DATA)}
        cases = len(json.loads(Path(paths["headline"]).read_text()).get("training", []))
        if cases < max(args.labelled):
            raise DataError(f"--labelled-data {paths['headline']} has {cases} training cases; --labelled "
                            f"{args.labelled} needs {max(args.labelled)}")
    else:
        sets = {"headline": (max(args.labelled), args.val_cases, SEEDS["headline"]),
                "selection": (1, args.selection_val, SEEDS["selection"]),
                "control": (args.control_cases, args.control_val, SEEDS["control"]),
                "unlabelled": (args.unlabelled, 0, args.unlabelled_seed)}
        paths = {}
        for name, (n_train, n_val, seed) in sets.items():
            datalist = work / "data" / name / "dataset.json"
            if not datalist.is_file():
                write_btcv_phantoms(datalist.parent, n_train=n_train, n_val=n_val, n_test=0, shape=args.shape,
                                    seed=seed, variation=args.variation)
            paths[name] = str(datalist)
    # no volume of the headline cases in any other set (the pool, the selection split, the control's), none of the
    # selection split's in the pool or the control's
    check_disjoint(paths["unlabelled"], [paths["headline"], paths["selection"], paths["control"]])
    check_disjoint(paths["control"], [paths["headline"], paths["selection"]], "control pool")
    check_disjoint(paths["selection"], [paths["headline"]], "selection split")
    check_work(work, args, record=True)
    snapshot_configs(work, args.pretrain_config, args.finetune_config)
    store = work / "store"
    if not (store / "manifest.json").is_file():
        from transfer_runs import config_path

        code = run_preprocess(["--config", str(config_path(work, "pretrain")), "--out", str(store),
                               "--data.init_args.datalist", paths["unlabelled"], "--no-progress"])
        if code:
            raise SystemExit(code)
    paths["store"] = str(store)
    return paths


# ---------------------------------------------------------------------------------------------- the task graph
def tasks(work: Path, args: argparse.Namespace, data: dict[str, str]) -> list[dict]:
    """Every run as ``{name, deps, fn, kwargs}``; ``kwargs`` may be a function of the finished results
    (the chosen budget and recipe are read when the runs that choose them are done)."""
    from transfer_runs import choose, choose_recipe

    pre = work / "pretrain"
    final = str(pre / f"encoder_{args.pretrain_steps}.pt")
    control = str(work / "control" / "encoder.pt")
    out: list[dict] = [{"name": "pretrain_control", "deps": [], "fn": "supervised", "kwargs": dict(
        datalist=data["control"], out=str(work / "control"), steps=args.control_steps, seed=0)}]
    previous: list[str] = []
    for m in sorted(args.milestones):  # one schedule of pretrain_steps, run milestone by milestone (resumed exactly)
        out.append({"name": f"pretrain_spark_{m}", "deps": previous, "fn": "pretrain", "kwargs": dict(
            store=data["store"], out=str(pre), steps=args.pretrain_steps, stop=m, seed=0)})
        previous = [f"pretrain_spark_{m}"]
    last_pretrain = previous[0]
    sel = dict(datalist=data["selection"], n=1, steps=args.selection_steps, eval_every=args.selection_steps)
    # the selection split: first the recipe for pretrained encoders (every candidate on the final SparK encoder), then
    # the budget curve with that recipe (scratch, and each milestone's encoder; the final one is a recipe run, reused)
    for seed in args.selection_seeds:
        for recipe in args.recipes:
            out.append({"name": f"select_recipe_{recipe}_s{seed}", "deps": [last_pretrain], "fn": "finetune",
                        "kwargs": dict(sel, encoder=final, seed=seed, recipe=recipe)})
    recipe_runs = [t["name"] for t in out if t["name"].startswith("select_recipe_")]

    def chosen_recipe(extra: dict):
        return lambda results: dict(extra, recipe=choose_recipe(results, args))

    for seed in args.selection_seeds:
        for m in [0, *args.milestones]:
            encoder = None if m == 0 else str(pre / f"encoder_{m}.pt")
            out.append({"name": f"select_budget_{m}_s{seed}", "deps": [*recipe_runs, *previous], "fn": "finetune",
                        "kwargs": chosen_recipe(dict(sel, encoder=encoder, seed=seed))})
    budget_runs = [t["name"] for t in out if t["name"].startswith("select_budget_")]

    selection = [t["name"] for t in out if t["name"].startswith("select_")]

    def chosen(extra: dict, encoder: str | None):
        """Run options once the selection is done: the chosen recipe, and for ``encoder="spark"`` the chosen budget's
        encoder (a path: that encoder; None: random init, scratch)."""
        def make(results: dict) -> dict:
            budget, recipe = choose(results, args)
            path = str(pre / f"encoder_{budget}.pt") if encoder == "spark" else encoder
            return dict(extra, encoder=path, recipe=extra.get("recipe", recipe))
        return make

    # the headline: scratch, control and SparK with the same recipe (the one chosen on the selection split for
    # pretrained encoders, what `pretrained_recipe` ships), so that a difference is the encoder's; at the smallest
    # labelled set also scratch with the config's own recipe (reused when the chosen recipe is `config`)
    for n in args.labelled:
        for seed in args.seeds:
            common = dict(datalist=data["headline"], n=n, steps=args.finetune_steps, eval_every=args.eval_every,
                          seed=seed)
            shipped = f"ft_n{n}_{SHIPPED}_s{seed}"
            if n == min(args.labelled):
                out.append({"name": shipped, "deps": [], "fn": "finetune",
                            "kwargs": dict(common, encoder=None, recipe="config")})
            for arm, encoder in (("scratch", None), ("control", control), ("spark", "spark")):
                # scratch waits for scratch-shipped: when the chosen recipe is the config's it is that run, reused
                first = [shipped] if arm == "scratch" and n == min(args.labelled) else []
                deps = [*selection, *first, *(["pretrain_control"] if arm == "control" else [])]
                out.append({"name": f"ft_n{n}_{arm}_s{seed}", "deps": deps, "fn": "finetune",
                            "kwargs": chosen(common, encoder)})
    for seed in args.seeds:  # the probe: the decoder alone learns on a frozen encoder
        common = dict(datalist=data["headline"], n=max(args.labelled), steps=args.probe_steps,
                      eval_every=args.probe_steps, seed=seed, freeze=True, recipe="config")
        out.append({"name": f"probe_random_s{seed}", "deps": [], "fn": "finetune", "kwargs": dict(common, encoder=None)})
        out.append({"name": f"probe_control_s{seed}", "deps": ["pretrain_control"], "fn": "finetune",
                    "kwargs": dict(common, encoder=control)})
        out.append({"name": f"probe_spark_s{seed}", "deps": budget_runs, "fn": "finetune",
                    "kwargs": chosen(common, "spark")})
    return out


def _priority(task: dict) -> int:
    """SparK pretraining (the longest chain) first, then the control's encoder and the headline runs by labelled-set
    size (1 and 2 first: scratch vs control is the protocol check), the budget curve, the probes, the recipes."""
    name = task["name"]
    order = ("pretrain_spark", "pretrain_control", "ft_n", "select_budget_", "select_recipe_", "probe_")
    return next(i for i, prefix in enumerate(order) if name.startswith(prefix))


def run_all(work: Path, args: argparse.Namespace, graph: list[dict], command: list[str]) -> dict[str, dict]:
    """Run every unfinished task, ``--workers`` at a time, dependencies first; returns every result."""
    from transfer_runs import execute, load_result, store_result

    results = {t["name"]: r for t in graph if (r := load_result(work, t["name"])) is not None}
    pending = [t for t in graph if t["name"] not in results]
    print(f"transfer study: {len(results)} runs done, {len(pending)} to run ({args.workers} at a time)", flush=True)

    def start(pool, t):
        kwargs = t["kwargs"](results) if callable(t["kwargs"]) else t["kwargs"]
        same = next((k for k, r in sorted(results.items()) if r and r.get("fn") == t["fn"] and r["kwargs"] == kwargs
                     and not r.get("same_as")), None)
        if same is not None:  # the very run has finished under another name (e.g. the chosen recipe is 'config'): reuse
            done = store_result(work, t["name"], dict(results[same], name=t["name"], same_as=same))
            if pool is None:
                return done
            future: Future = Future()
            future.set_result(done)
            return future
        if pool is None:
            return execute(str(work), t["name"], t["fn"], kwargs, args.accelerator)
        return pool.submit(execute, str(work), t["name"], t["fn"], kwargs, args.accelerator)

    t0 = time.time()
    pool = ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) if args.workers > 1 else None
    running: dict = {}

    def stop(signum, frame):  # a killed study takes its workers with it (finished runs stay: the command resumes)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    finished = False
    try:
        while pending or running:
            ready = sorted([t for t in pending if all(d in results for d in t["deps"])], key=_priority)
            while ready and (pool is None and not running or pool is not None and len(running) < args.workers):
                t = ready.pop(0)
                pending.remove(t)
                if pool is None:
                    results[t["name"]] = start(None, t)
                    print(f"  [{time.time() - t0:6.0f} s] {t['name']} done", flush=True)
                    write_outputs(work, args, results, command=command)
                else:
                    running[start(pool, t)] = t["name"]
            if not running:
                if pending and not ready and pool is not None:
                    raise RuntimeError(f"unrunnable tasks: {[t['name'] for t in pending]}")
                continue
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                results[name] = fut.result()
                print(f"  [{time.time() - t0:6.0f} s] {name} done", flush=True)
                write_outputs(work, args, results, command=command)  # what exists so far, after every run
        finished = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pool is not None:
            if not finished:  # interrupted: the running workers are stopped, not waited for
                for process in list((getattr(pool, "_processes", None) or {}).values()):  # the executor's own
                    process.terminate()
                print(f"transfer study: stopped with {len(results)} runs finished (kept in {work / 'runs'}); "
                      "the same command resumes", file=sys.stderr, flush=True)
            pool.shutdown(wait=finished, cancel_futures=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from spark3d.errors import Spark3dError

    words = sys.argv[1:] if argv is None else list(argv)
    command = ["python", "benchmarks/transfer.py", *(w for w in words if w != "--report-only")]

    work = Path(args.work)
    try:
        check_args(args)
        if args.report_only:
            from transfer_runs import load_result

            results = {p.stem: load_result(work, p.stem) for p in sorted((work / "runs").glob("*.json"))}
            write_outputs(work, args, results, command=command)
            return 0
        t0 = time.time()  # the study's wall time includes writing the phantoms and the store
        check_work(work, args)
        data = write_data(work, args)
        graph = tasks(work, args, data)
        results = run_all(work, args, graph, command)
        summary = write_outputs(work, args, results, wall_seconds=time.time() - t0, command=command)
    except Spark3dError as err:
        print(f"transfer: {err}", file=sys.stderr)
        return 2
    for line in summary["lines"]:
        print(line)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main())

"""The runs of the transfer study (benchmarks/transfer.py): SparK pretraining from a CT store, the supervised
positive control, fine-tuning with Dice every few steps; each run's result is a JSON in WORK/runs (resumable)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Iterator

CONFIGS = Path(__file__).parents[1] / "configs"
# the candidate fine-tuning recipes for pretrained encoders (chosen on the selection split, never on validation)
RECIPES = {
    "config": {},  # the study's fine-tuning config as it is (by default configs/finetune/demo_ct.yaml)
    "layer_decay": {"layer_decay": 0.7, "warmup_fraction": 0.1},  # finer encoder levels move less, longer warm-up
    "freeze": {"freeze_fraction": 0.1},  # the encoder frozen for the first 10 % of the steps
    # frozen first, then layer decay (linear probing, then fine-tuning: a random decoder's first, large gradients
    # do not reach the pretrained features); the warm-up spans the frozen steps
    "freeze_decay": {"freeze_fraction": 0.1, "layer_decay": 0.7, "warmup_fraction": 0.1},
    # a 5x lower lr, alone and with layer decay (an earlier study saw the shipped lr, 0.01, move a pretrained
    # encoder by about its own norm in 50 steps)
    "low_lr": {"lr": 0.002, "warmup_fraction": 0.1},
    "low_lr_decay": {"lr": 0.002, "layer_decay": 0.7, "warmup_fraction": 0.1},
}


# with the demo's pretraining config the study pretrains with the decoder of the shipped 3D SparK configs (ct_*.yaml),
# not the demo's faithful one: what a user runs on real data, and a much cheaper step (densify + decoder GFLOP per
# sample in docs/results/perf_step_demo_ct_before.json / _after.json); a config given by the user runs as it is
PRETRAIN_DECODER = "    decoder: efficient  # the transfer study's choice (benchmarks/transfer_runs.py)\n"
DEMO_PRETRAIN = (CONFIGS / "pretrain" / "demo_ct.yaml").resolve()


def snapshot_configs(work: str | Path, pretrain: str | Path = DEMO_PRETRAIN,
                     finetune: str | Path = CONFIGS / "finetune" / "demo_ct.yaml") -> None:
    """Copy the study's configs into WORK/configs/{pretrain,finetune}/ once (the demo's pretraining one with
    :data:`PRETRAIN_DECODER`): a resumed study runs with the configs it started with."""
    for kind, source in (("pretrain", Path(pretrain)), ("finetune", Path(finetune))):
        folder = Path(work) / "configs" / kind
        if folder.is_dir() and any(folder.glob("*.yaml")):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        text = source.read_text()
        if kind == "pretrain" and source.resolve() == DEMO_PRETRAIN:
            anchor = "    decoder_width: 64\n"
            assert anchor in text and "decoder:" not in text, "configs/pretrain/demo_ct.yaml changed: update PRETRAIN_DECODER"
            text = text.replace(anchor, anchor + PRETRAIN_DECODER)
        (folder / source.name).write_text(text)


def config_path(work: str | Path, kind: str) -> Path:
    """The study's snapshot of its ``kind`` config (``pretrain`` or ``finetune``)."""
    return next(iter(sorted((Path(work) / "configs" / kind).glob("*.yaml"))))


def _config(kind: str) -> dict:
    """The study's snapshot of the config of ``kind`` (the study folder is set in the worker by :func:`execute`)."""
    import yaml

    return yaml.safe_load(config_path(_SETTINGS["work"], kind).read_text())


_SETTINGS = {"work": None, "accelerator": "cpu"}  # set per worker process by :func:`execute`


def load_result(work: str | Path, name: str) -> dict | None:
    """A finished run's result (None when it has not finished)."""
    path = Path(work) / "runs" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _image_hashes(datalist: str) -> dict[str, str]:
    """sha256 of every image's voxels (not its file bytes: a re-saved copy is the same case)."""
    import nibabel as nib
    import numpy as np

    root = Path(datalist).parent
    d = json.loads(Path(datalist).read_text())
    out = {}
    for entry in d.get("training", []) + d.get("validation", []):
        path = root / entry["image"]
        out[hashlib.sha256(np.ascontiguousarray(nib.load(path).get_fdata(dtype=np.float32)).tobytes()).hexdigest()] = str(path)
    return out


def check_disjoint(pool: str, labelled: list[str], role: str = "unlabelled pool") -> None:
    """Refuse (one line) a pool (``role``: the unlabelled one, the control's, the selection split) that holds a case
    of a labelled or validation set it must not see."""
    from spark3d.errors import DataError

    own = _image_hashes(pool)
    for datalist in labelled:
        for digest, path in _image_hashes(datalist).items():
            if digest in own:
                raise DataError(f"{role} {pool} contains {own[digest]}, the same volume as the labelled case {path}: "
                                "the study would train on the data it evaluates on")


@contextlib.contextmanager
def quiet(threads: int | None = 1) -> Iterator[None]:
    """Lightning's info lines and every warning off, ``threads`` torch threads (None: as they are), for the block
    only: a study run in-process (``--workers 1``, the tests) leaves the caller's logging and threads as they were."""
    import pytorch_lightning  # noqa: F401  (its first import sets its loggers' levels: save them after that)
    import torch

    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning")]
    levels, before = [logger.level for logger in loggers], torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            torch.set_num_threads(before)


def execute(work: str, name: str, fn: str, kwargs: dict, accelerator: str = "cpu") -> dict:
    """Run one task in this process (on the CPU: one torch thread) and store its result."""
    with quiet(1 if accelerator == "cpu" else None):
        _SETTINGS.update(work=work, accelerator=accelerator)
        t0 = time.time()
        result = {"pretrain": pretrain, "supervised": supervised, "finetune": finetune}[fn](**kwargs)
    result.update(name=name, fn=fn, kwargs=kwargs, seconds=time.time() - t0)
    return store_result(work, name, result)


def store_result(work: str | Path, name: str, result: dict) -> dict:
    """Write a run's result to WORK/runs/NAME.json (atomically) and return it."""
    path = Path(work) / "runs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def _loader_workers(cfg: dict) -> int:
    """Data-loader processes of a run: none on the CPU (two runs share the cores already), the config's on a GPU."""
    return 0 if _SETTINGS["accelerator"] == "cpu" else int(cfg["data"]["init_args"].get("num_workers", 0))


def _trainer(steps: int, root: str, callbacks: list, eval_every: int | None = None, plugins: list | None = None):
    import pytorch_lightning as pl

    val = {"val_check_interval": eval_every, "check_val_every_n_epoch": None} if eval_every else {"limit_val_batches": 0}
    checkpointing = any(isinstance(c, pl.callbacks.Checkpoint) for c in callbacks)
    return pl.Trainer(max_steps=steps, max_epochs=-1, accelerator=_SETTINGS["accelerator"], devices=1, logger=False,
                      callbacks=callbacks,
                      enable_checkpointing=checkpointing, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=root, plugins=plugins, **val)


def pretrain(store: str, out: str, steps: int, stop: int, seed: int) -> dict:
    """SparK pretraining of the demo network from the CT store, a ``steps``-step schedule run up to step ``stop``
    (a milestone: ``encoder_<stop>.pt``); resumes exactly from ``out/checkpoints/last.ckpt`` (written at every
    milestone and every 100 steps), so a killed study loses at most 100 steps."""
    import pytorch_lightning as pl

    from spark3d.data import CTPretrainData
    from spark3d.train import SparKPretrain
    from spark3d.train.callbacks import PeriodicCheckpoint, ResumeState, SafeCheckpointIO

    cfg = _config("pretrain")
    pl.seed_everything(seed, verbose=False)
    data_args = dict(cfg["data"]["init_args"], datalist=None, store=store, num_workers=_loader_workers(cfg))
    data = CTPretrainData(**data_args)
    data.in_channels = int(cfg["model"]["init_args"].get("in_channels", 1))
    model = SparKPretrain(**dict(cfg["model"]["init_args"], figure_every_n_epochs=10**9), input_size=data.roi_size)
    last = Path(out) / "checkpoints" / "last.ckpt"
    losses: list[tuple[int, float]] = []
    start = [0]

    class Milestone(pl.Callback):
        def on_train_start(self, trainer, module):
            start[0] = trainer.global_step

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % 10 == 0 or step == stop:
                losses.append((step, float(outputs["loss"])))
            if step >= stop:
                module.save_encoder(Path(out) / f"encoder_{stop}.pt")
                trainer.save_checkpoint(last)
                trainer.should_stop = True

    t0 = time.time()
    trainer = _trainer(steps, out, [PeriodicCheckpoint(last.parent, 100, 0), ResumeState(), Milestone()], None,
                       plugins=[SafeCheckpointIO()])
    trainer.fit(model, data, ckpt_path=str(last) if last.is_file() else None)
    return {"losses": losses, "seconds_per_step": (time.time() - t0) / max(1, stop - start[0]), "resumed_at": start[0],
            "encoder": str(Path(out) / f"encoder_{stop}.pt"),
            "compute": model.model.compute_path(model.model.random_mask(1))}  # the path the run's masks took


def supervised(datalist: str, out: str, steps: int, seed: int) -> dict:
    """The positive control's encoder: the demo network trained on the control pool's labels, its encoder tensors
    written as an encoder.pt (same keys and format as SparK's); its own Dice on the control pool's validation cases
    is measured at the end (the control must have learned to segment, or it controls nothing)."""

    from spark3d.checkpoint import write_encoder
    from spark3d.networks import encoder_state_of

    has_val = bool(json.loads(Path(datalist).read_text()).get("validation"))
    module, data = _segmentation(datalist, None, seed, None, "config", steps, val=has_val)
    t0 = time.time()
    trainer = _trainer(steps, out, [], steps if has_val else None)
    trainer.fit(module, data)
    seconds = time.time() - t0
    spec = module.spec
    meta = {"method": "supervised", "backbone": spec.name, "source": spec.source, "backbone_kwargs": dict(spec.kwargs),
            "spatial_dims": spec.spatial_dims, "in_channels": spec.in_channels, "global_step": steps,
            "spacing": list(data.spacing), "intensity_range": list(data.intensity_range)}
    write_encoder(Path(out) / "encoder.pt", encoder_state_of(module.network, spec), meta)
    own = float(trainer.callback_metrics["val/mean_dice"]) if has_val else None
    return {"seconds_per_step": seconds / steps, "encoder": str(Path(out) / "encoder.pt"), "own_val_dice": own,
            "val_cases": len(data.val_files)}


def _segmentation(datalist: str, n: int | None, seed: int, encoder: str | None, recipe: str, steps: int,
                  val: bool = True, freeze: bool = False):
    """The demo fine-tuning module and data, seeded; ``recipe`` from :data:`RECIPES`."""
    import pytorch_lightning as pl

    from spark3d.data import SegmentationData
    from spark3d.train import SegmentationModule

    cfg = _config("finetune")
    pl.seed_everything(seed, verbose=False)  # the same network init and data order for every arm of a seed
    data_args = dict(cfg["data"]["init_args"], datalist=datalist, max_train_cases=n, num_workers=_loader_workers(cfg))
    if not val:
        data_args["val_key"] = None
    data = SegmentationData(**data_args)
    data.in_channels = int(cfg["model"]["init_args"].get("in_channels", 1))
    cases = n or len(json.loads(Path(datalist).read_text())["training"])
    # the study applies its recipes itself: the config's own pretrained_recipe (the study's earlier choice) is off
    model_args = dict(cfg["model"]["init_args"], pretrained=encoder, roi_size=data.roi_size, pretrained_recipe=None)
    r = RECIPES[recipe]
    if "lr" in r:
        model_args["lr"] = r["lr"]
    if "layer_decay" in r:
        model_args["layer_decay"] = r["layer_decay"]
    if "warmup_fraction" in r:
        model_args["warmup_epochs"] = r["warmup_fraction"] * steps / cases  # an epoch is `cases` steps here
    if "freeze_fraction" in r:
        model_args["freeze_encoder_epochs"] = max(1, round(r["freeze_fraction"] * steps / cases))
    if freeze:
        model_args["freeze_encoder_epochs"] = 10**9
    return SegmentationModule(**model_args), data


def finetune(datalist: str, n: int, seed: int, steps: int, eval_every: int, encoder: str | None, recipe: str,
             freeze: bool = False) -> dict:
    """One fine-tuning run: validation Dice (13 organs) every ``eval_every`` steps, encoder drift, chain checks."""
    import pytorch_lightning as pl
    import torch

    from spark3d.networks import encoder_children, encoder_state_of

    module, data = _segmentation(datalist, n, seed, encoder, recipe, steps, freeze=freeze)
    chain = {}
    if encoder is not None:
        from spark3d.checkpoint import read_encoder

        state, _ = read_encoder(encoder)
        loaded = encoder_state_of(module.network, module.spec)
        chain = {"file_tensors": len(state), "matched": module.pretrained_report["matched"],
                 "max_abs_diff_after_load": max(float((loaded[k].float() - v.float()).abs().max()) for k, v in state.items()),
                 "norm_layers": sorted({type(m).__name__ for m in module.network.modules()
                                        if "Norm" in type(m).__name__})}
    start = [p.detach().clone() for p in encoder_children(module.network, module.spec).parameters()]
    evals: list[dict] = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pm):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            now = list(encoder_children(pm.network, pm.spec).parameters())
            drift = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(now, start)))
                          / torch.sqrt(sum((b ** 2).sum() for b in start)))
            evals.append({"step": int(trainer.global_step), "mean_dice": float(m["val/mean_dice"]),
                          "organs": {k.split("/")[-1]: float(v) for k, v in m.items() if k.startswith("val/dice/")},
                          "encoder_drift": drift})

    t0 = time.time()
    _trainer(steps, str(Path(datalist).parent / ".runs"), [Record()], eval_every).fit(module, data)
    chain["input_mismatches"] = list(module.input_mismatches)
    return {"evals": evals, "seconds_per_step": (time.time() - t0) / steps, "chain": chain,
            "organs": list(module.label_names[1:])}


def _mean_final(results: dict, prefix: str) -> float:
    """Mean final Dice over seeds of the runs named ``<prefix>_s<seed>`` (-inf when none has finished)."""
    vals = [r["evals"][-1]["mean_dice"] for k, r in results.items() if r and k.startswith(prefix + "_s")]
    return statistics.mean(vals) if vals else float("-inf")


def choose_recipe(results: dict, args) -> str:
    """The recipe for pretrained encoders: the candidate with the best mean selection Dice on the final SparK encoder
    (the first listed on a tie)."""
    return max(args.recipes, key=lambda r: _mean_final(results, f"select_recipe_{r}"))


def choose(results: dict, args) -> tuple[int, str]:
    """The pretraining budget (the milestone with the best mean selection Dice, fine-tuned with the chosen recipe;
    the earlier one on a tie) and that recipe, from the selection runs only."""
    budget = max(sorted(args.milestones), key=lambda m: _mean_final(results, f"select_budget_{m}"))
    return budget, choose_recipe(results, args)

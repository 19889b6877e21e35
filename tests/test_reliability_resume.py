"""Crash-exact resume: after a crash at any point (right after a checkpoint, at an epoch end, during
validation, before a step's metrics row is logged) or a SIGKILL of the real commands, ``--ckpt_path last``
ends with the weights of an uninterrupted run and ``metrics.csv`` holds each step once."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from monai import transforms as mt
from monai.data import Dataset

from spark3d.cli import main
from spark3d.cli.lightning import run_directory_trainer_kwargs, run_fit
from spark3d.data.contract import Spark3dDataModule
from spark3d.data.phantoms import write_btcv_phantoms
from spark3d.data.sampling import eval_loader
from spark3d.errors import ConfigError

REPO = Path(__file__).parents[1]


class _Crash(Exception):
    pass


class CrashAt(pl.callbacks.Checkpoint):
    """Raise at ``hook`` when the global step is ``step`` (a Checkpoint: it runs after the checkpoint writers)."""

    def __init__(self, hook: str, step: int) -> None:
        self.hook, self.step = hook, step

    def _maybe(self, trainer, hook):
        if hook == self.hook and trainer.global_step == self.step and not trainer.sanity_checking:
            raise _Crash(f"{hook} at step {self.step}")

    def on_train_batch_start(self, trainer, *args):
        self._maybe(trainer, "batch_start")

    def on_train_batch_end(self, trainer, *args):
        self._maybe(trainer, "batch_end")

    def on_train_epoch_end(self, trainer, *args):
        self._maybe(trainer, "epoch_end")

    def on_validation_start(self, trainer, *args):
        self._maybe(trainer, "validation")


class TinyData(Spark3dDataModule):
    """Three noisy, randomly flipped samples: the augmentation draws from the transforms' generators."""

    def __init__(self, num_workers: int = 0) -> None:
        super().__init__()
        self.num_workers = num_workers
        self.train_files = [{"image": torch.arange(8.0).reshape(1, 8) + 3 * i} for i in range(3)]

    def validate(self) -> None:
        pass

    def metadata(self):
        return {}

    @property
    def crops_per_batch(self) -> int:
        return 1

    def setup(self, stage=None):
        tf = mt.Compose([mt.RandGaussianNoised("image", prob=1.0), mt.RandFlipd("image", prob=0.5, spatial_axis=0),
                         mt.EnsureTyped("image", track_meta=False)])
        self.ds = Dataset(self.train_files, transform=tf)

    def train_dataloader(self):
        return self.train_order.loader(self.ds, batch_size=1, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self):
        return eval_loader(Dataset([{"image": torch.ones(1, 8)}]), 1)


class TinyMasked(pl.LightningModule):
    """A masked-reconstruction toy: the mask comes from the global generator, like SparK's."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(8, 8)

    def training_step(self, batch, batch_idx):
        x = batch["image"].reshape(-1, 8)
        keep = (torch.rand_like(x) > 0.5).float()
        loss = ((self.net(x * keep) - x) ** 2).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=1)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, batch_size=1)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.net(batch["image"].reshape(-1, 8)).square().mean(), batch_size=1)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(root: Path, crash: CrashAt | None = None, resume: bool = False, workers: int = 0) -> torch.Tensor:
    pl.seed_everything(0)
    model, data = TinyMasked(), TinyData(workers)
    kw = run_directory_trainer_kwargs(root, {}, every_n_steps=1, every_n_minutes=0)
    trainer = pl.Trainer(default_root_dir=root, max_steps=7, max_epochs=100, logger=kw["logger"],
                         callbacks=kw["callbacks"] + ([crash] if crash else []), plugins=kw["plugins"],
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         num_sanity_val_steps=1, accelerator="cpu")
    cli = SimpleNamespace(trainer=trainer, model=model, datamodule=data,
                          config={"ckpt_path": "last" if resume else None, "overwrite": False})
    try:
        run_fit(cli, "toy training")
    except _Crash:
        pass
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_after_a_crash_anywhere_equals_an_uninterrupted_run(tmp_path):
    reference = _fit(tmp_path / "reference")
    expected_csv = (tmp_path / "reference" / "metrics.csv").read_text()
    # 3 steps per epoch: step 3 is an epoch end (checkpoint after its validation), step 5 is mid-epoch
    for hook, step, workers in [("batch_start", 5, 0), ("batch_start", 3, 0), ("batch_end", 2, 0),
                                ("epoch_end", 3, 0), ("validation", 6, 0), ("batch_start", 4, 2)]:
        run = tmp_path / f"{hook}{step}w{workers}"
        _fit(run, CrashAt(hook, step), workers=workers)
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < 7
        resumed = _fit(run, resume=True, workers=workers)
        assert torch.equal(resumed, reference), (hook, step, workers)
        assert (run / "metrics.csv").read_text() == expected_csv, (hook, step, workers)


def test_resume_refuses_what_the_restored_state_would_override(tmp_path, capsys):
    from spark3d.cli.runs import check_resume

    run = tmp_path / "run"
    _fit(run, CrashAt("batch_start", 4))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    for lr, items, reason in [(0.05, 2, "the training list has 2 cases, the run had 3"), (1e6, 3, "model.lr 0.05 → 1000000.0")]:
        model, data = TinyMasked(lr), TinyData()
        data.train_files = data.train_files[:items]
        trainer = pl.Trainer(default_root_dir=run, max_steps=7, logger=False, enable_progress_bar=False)
        cli = SimpleNamespace(trainer=trainer, model=model, datamodule=data, config={"ckpt_path": "last"})
        with pytest.raises(ConfigError, match=reason):
            run_fit(cli, "toy training")
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "refused before anything is written"
    longer = pl.Trainer(default_root_dir=run, max_steps=20, logger=False)  # a longer schedule is applied, and said so
    notes = check_resume(checkpoint, "last.ckpt", TinyMasked(), TinyData(), longer)
    assert any("max_steps 7 → 20: applied" in note for note in notes)


# ------------------------------------------------------------------------------ the real commands, SIGKILLed
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_btcv_phantoms(tmp_path_factory.mktemp("phantoms"), n_train=2, n_val=1, n_test=0, shape=(40, 40, 20), seed=3)


def _pretrain_args(datalist, run):
    return ["pretrain", "--config", str(REPO / "configs/pretrain/demo_ct.yaml"), "--data.init_args.datalist", str(datalist),
            "--data.init_args.roi_size", "[16, 16, 16]", "--data.init_args.batch_size", "1",
            "--data.init_args.spacing", "[6.0, 6.0, 6.0]", "--model.init_args.decoder_width", "16",
            "--model.init_args.figure_every_n_epochs", "100", "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(run)]


def _finetune_args(datalist, run):
    return ["finetune", "--config", str(REPO / "configs/finetune/demo_ct.yaml"), "--data.init_args.datalist", str(datalist),
            "--data.init_args.roi_size", "[16, 16, 16]", "--data.init_args.batch_size", "1",
            "--data.init_args.num_samples", "1", "--data.init_args.spacing", "[6.0, 6.0, 6.0]",
            "--trainer.max_steps", "4", "--trainer.check_val_every_n_epoch", "2", "--trainer.num_sanity_val_steps", "0",
            "--checkpoint_every_n_steps", "1", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run)]


def _kill_after_checkpoint(argv: list[str], run: Path, step: int, attempts: int = 4) -> int:
    """Run the command in a subprocess and SIGKILL it once ``last.ckpt`` holds ``step`` (mid-epoch); on a loaded
    machine the child can write the next checkpoint before it is seen, so a missed kill is retried afresh."""
    for _ in range(attempts):
        saved_at = _kill_once(argv, run, step)
        if saved_at == step:
            break
        shutil.rmtree(run)
    return saved_at


def _kill_once(argv: list[str], run: Path, step: int) -> int:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "spark3d.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    try:
        while proc.poll() is None:
            if last.is_file() and torch.load(last, weights_only=True, map_location="cpu")["global_step"] >= step:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait()
    return torch.load(last, weights_only=True)["global_step"]


def _steps(metrics: Path) -> list[int]:
    with metrics.open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(phantoms, tmp_path, command):
    args = _pretrain_args if command == "pretrain" else _finetune_args
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(args(phantoms, reference)) == 0
    assert torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # the latest state
    saved_at = _kill_after_checkpoint(args(phantoms, killed), killed, 3)  # 2 steps per epoch: step 3 is mid-epoch
    assert saved_at == 3
    assert main(args(phantoms, killed) + ["--ckpt_path", "last"]) == 0
    want, got = _weights(reference / "checkpoints" / "last.ckpt"), _weights(killed / "checkpoints" / "last.ckpt")
    worst = max(((want[k].double() - got[k].double()).norm() / want[k].double().norm().clamp_min(1e-12)).item()
                for k in want if want[k].is_floating_point())
    assert worst < 1e-5
    assert _steps(killed / "metrics.csv") == list(range(4))
    assert (killed / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()

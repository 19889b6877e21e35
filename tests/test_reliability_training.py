"""No silent NaN in training, and runs never clobber: a non-finite loss or gradient stops training naming
the step (after optional skipped steps), nothing non-finite is ever written and earlier checkpoints stay
byte-identical; a fresh run into a used folder is refused and leaves it byte-identical."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from monai.data import Dataset

from spark3d.checkpoint import read_encoder, write_encoder
from spark3d.cli import main
from spark3d.cli.lightning import run_directory_trainer_kwargs, run_fit
from spark3d.data.contract import Spark3dDataModule
from spark3d.data.phantoms import write_btcv_phantoms
from spark3d.errors import CheckpointError, TrainingError
from spark3d.train.callbacks import SafeCheckpointIO

REPO = Path(__file__).parents[1]


class Data(Spark3dDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.train_files = [{"image": torch.full((4,), float(i))} for i in range(4)]

    def validate(self) -> None:
        pass

    def metadata(self):
        return {}

    @property
    def crops_per_batch(self) -> int:
        return 1

    def train_dataloader(self):
        return self.train_order.loader(Dataset(self.train_files), batch_size=1)


class Diverging(pl.LightningModule):
    """A regression whose loss (``loss``) or gradient (``grad``) turns non-finite at ``bad_steps``."""

    def __init__(self, bad_steps: set[int], kind: str = "loss") -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.bad_steps, self.kind = bad_steps, kind
        self.updates: list[int] = []

    def training_step(self, batch, batch_idx):
        loss = self.net(batch["image"]).square().mean()
        if self.global_step in self.bad_steps:
            if self.kind == "loss":
                loss = loss * float("nan")
            else:  # finite loss (0 * inf is not formed forward), infinite gradient: d sqrt(x)/dx at 0
                loss = loss + torch.sqrt(self.net.weight[0, 0] * 0.0)
        return loss

    def on_before_optimizer_step(self, optimizer):
        if any(p.grad is not None for p in self.parameters()):
            self.updates.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(root: Path, module: pl.LightningModule, skip: int = 0) -> None:
    kw = run_directory_trainer_kwargs(root, {}, every_n_steps=1, every_n_minutes=0, nonfinite_skip_steps=skip)
    trainer = pl.Trainer(default_root_dir=root, max_steps=6, logger=kw["logger"], callbacks=kw["callbacks"],
                         plugins=kw["plugins"], enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    run_fit(SimpleNamespace(trainer=trainer, model=module, datamodule=Data(), config={"ckpt_path": None}), "toy")


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _all_finite(folder: Path) -> bool:
    for path in folder.rglob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            return False
    return True


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_stops_training_and_keeps_the_good_checkpoints(tmp_path, kind):
    run = tmp_path / "run"
    module = Diverging({3}, kind)
    snapshots = []

    class Watch(pl.Callback):  # what was on disk right before the bad step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                snapshots.append(_snapshot(run / "checkpoints"))

    kw_fit = run_directory_trainer_kwargs(run, {}, every_n_steps=1, every_n_minutes=0)
    trainer = pl.Trainer(default_root_dir=run, max_steps=6, logger=kw_fit["logger"], callbacks=kw_fit["callbacks"] + [Watch()],
                         plugins=kw_fit["plugins"], enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TrainingError, match=f"non-finite {kind if kind == 'loss' else 'gradient'}.* at step 3"):
        run_fit(SimpleNamespace(trainer=trainer, model=module, datamodule=Data(), config={"ckpt_path": None}), "toy")
    assert _snapshot(run / "checkpoints") == snapshots[0], "the checkpoints written before the bad step are unchanged"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert _all_finite(run) and module.updates == [0, 1, 2]


def test_allowed_skips_drop_the_bad_update_and_training_goes_on(tmp_path, capsys):
    module = Diverging({1, 4})
    _fit(tmp_path / "run", module, skip=2)
    assert module.updates == [0, 2, 3, 5], "the two bad steps updated nothing"
    assert capsys.readouterr().err.count("step skipped") == 2
    assert _all_finite(tmp_path / "run")
    with pytest.raises(TrainingError, match="at step 4"):  # a third bad step is one too many
        _fit(tmp_path / "run2", Diverging({1, 2, 4}), skip=2)


def test_nothing_non_finite_is_ever_written(tmp_path):
    good = write_encoder(tmp_path / "encoder.pt", {"w": torch.ones(3)}, {"backbone": "segresnet"})
    before = good.read_bytes()
    with pytest.raises(CheckpointError, match="NaN"):
        write_encoder(good, {"w": torch.tensor([1.0, float("nan"), 0.0])}, {"backbone": "segresnet"})
    assert good.read_bytes() == before
    ckpt = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(TrainingError, match="refusing to write"):
        SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor([float("inf")])}, "global_step": 2}, ckpt)
    assert ckpt.read_bytes() == before and not list(tmp_path.glob(".*tmp"))
    torch.save({"state_dict": {"w": torch.tensor([float("nan")])}, "meta": {}}, tmp_path / "nan_encoder.pt")
    with pytest.raises(CheckpointError, match="NaN"):  # nor read as if it were fine
        read_encoder(tmp_path / "nan_encoder.pt")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_btcv_phantoms(tmp_path_factory.mktemp("phantoms"), n_train=2, n_val=0, n_test=0, shape=(40, 40, 20), seed=5)


def _pretrain(datalist, run, *extra):
    return ["pretrain", "--config", str(REPO / "configs/pretrain/demo_ct.yaml"), "--data.init_args.datalist",
            str(datalist), "--data.init_args.roi_size", "[16, 16, 16]", "--data.init_args.batch_size", "1",
            "--data.init_args.spacing", "[6.0, 6.0, 6.0]", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(run), *extra]


def test_lr_1e6_stops_pretraining_with_one_line_and_no_nan_on_disk(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(_pretrain(phantoms, run, "--model.init_args.lr", "1e6", "--model.init_args.warmup_epochs", "0",
                          "--trainer.max_steps", "4", "--checkpoint_every_n_steps", "1"))
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and "non-finite loss" in err[0] and "at step" in err[0]
    assert (run / "checkpoints" / "last.ckpt").is_file() and _all_finite(run)
    state, _ = read_encoder(run / "encoder.pt")  # refuses NaN: what is there is finite
    assert state


def test_a_fresh_run_into_a_used_folder_is_refused_and_leaves_it_byte_identical(phantoms, tmp_path, capsys):
    run = tmp_path / "used"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"another run's checkpoint")
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")
    (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    other = tmp_path / "other.ckpt"  # a checkpoint of another run: resuming it here would mix two runs
    torch.save({"state_dict": {"w": torch.ones(1)}, "global_step": 3}, other)
    for extra in ([], ["--ckpt_path", str(other)]):
        code = main(_pretrain(phantoms, run, "--trainer.max_steps", "1", *extra))
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert code == 2 and len(err) == 1 and "already holds a run" in err[0] and "--overwrite" in err[0], err
        assert _snapshot(run) == before
    code = main(_pretrain(phantoms, run, "--trainer.max_steps", "1", "--overwrite", "true"))
    assert code == 0 and (run / "notes.txt").read_text() == "mine"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1

"""Faults around a run: a signal stops training with last.ckpt written and exit 128 + signal (encoder.pt marked
incomplete); one run per folder (a lock, released at exit or death, a dead owner's lock taken over); a full disk,
a read-only output or a file in the way is one line naming the path and the errno, with nothing half-written, and
the same command works once there is space; --overwrite removes only what spark3d writes."""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spark3d.checkpoint import read_encoder
from spark3d.cli import main
from spark3d.cli.runs import LOCK_FILE
from spark3d.data.phantoms import write_btcv_phantoms

REPO = Path(__file__).parents[1]
TIMEOUT = 600  # seconds: generous, the machine may be loaded


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_btcv_phantoms(tmp_path_factory.mktemp("phantoms"), n_train=2, n_val=0, n_test=0, shape=(40, 40, 20),
                               seed=5)


def _pretrain(datalist, run, *extra):
    return ["pretrain", "--config", str(REPO / "configs/pretrain/demo_ct.yaml"), "--data.init_args.datalist",
            str(datalist), "--data.init_args.roi_size", "[16, 16, 16]", "--data.init_args.batch_size", "1",
            "--data.init_args.num_samples", "1", "--data.init_args.spacing", "[6.0, 6.0, 6.0]",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run), *extra]


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "spark3d.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` until it holds (the child must still be running)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])
    except Exception:  # not there yet (it is renamed into place whole)
        return -1


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_writes_last_ckpt_exits_128_plus_signal_and_marks_encoder_incomplete(phantoms, tmp_path, capsys,
                                                                                         signum):
    run = tmp_path / "run"
    last, lock = run / "checkpoints" / "last.ckpt", run / LOCK_FILE
    proc = _start(_pretrain(phantoms, run, "--checkpoint_every_n_steps", "2"))
    try:
        _wait_for(lambda: _step(last) >= 2, proc, "the first checkpoint")
        assert lock.read_text().strip() == str(proc.pid)  # one run per folder: the run holds the lock
        if signum == signal.SIGTERM:  # meanwhile a second run into the same folder is refused, whatever it asks
            before = {name: data for name, data in _snapshot(run).items() if name.endswith((".ckpt", ".pt"))}
            for extra in ([], ["--ckpt_path", "last"], ["--overwrite", "true"]):
                code = main(_pretrain(phantoms, run, "--trainer.max_steps", "1", *extra))
                err = _errors(capsys.readouterr().err)
                assert code == 2 and len(err) == 1 and "in use by another run" in err[0], err
                assert f"PID {proc.pid}" in err[0]
            assert all(_snapshot(run).get(name) == data for name, data in before.items()) or proc.poll() is None
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if f"stopped by {signal.Signals(signum).name}" in line]
    assert len(lines) == 1 and "--ckpt_path last" in lines[0] and str(last) in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr and "encoder:" not in stderr
    step = _step(last)
    _, meta = read_encoder(run / "encoder.pt")
    assert meta["complete"] is False and meta["global_step"] == step and meta["total_steps"] == 160  # 80 epochs × 2
    assert f"at step {step} of 160" in lines[0]  # the checkpoint holds the step it says
    assert not lock.exists()  # released on exit
    # the same command plus --ckpt_path last continues it (here to a nearer end) and the encoder is then final
    assert main(_pretrain(phantoms, run, "--trainer.max_steps", str(step + 1), "--ckpt_path", "last")) == 0
    _, meta = read_encoder(run / "encoder.pt")
    assert meta["complete"] is True and meta["global_step"] == step + 1


def test_a_dead_runs_lock_is_taken_over_and_a_killed_run_releases_it(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.mkdir()
    (run / LOCK_FILE).write_text(f"{dead.pid}\n")  # what a SIGKILLed run leaves: the file, no lock on it
    assert main(_pretrain(phantoms, run, "--trainer.max_steps", "1")) == 0
    assert f"from PID {dead.pid}, which is no longer running" in capsys.readouterr().err
    assert not (run / LOCK_FILE).exists()
    # a run killed outright (no handler runs) leaves its lock file, and the kernel has dropped its lock
    killed = tmp_path / "killed"
    proc = _start(_pretrain(phantoms, killed))
    try:
        _wait_for(lambda: (killed / LOCK_FILE).is_file() and (killed / LOCK_FILE).read_text().strip() == str(proc.pid),
                  proc, "the lock")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert (killed / LOCK_FILE).is_file()
    assert main(_pretrain(phantoms, killed, "--trainer.max_steps", "1", "--ckpt_path", "last")) == 0
    assert f"from PID {proc.pid}" in capsys.readouterr().err


def test_overwrite_removes_only_what_spark3d_wrote(phantoms, tmp_path):
    run = tmp_path / "run"
    assert main(_pretrain(phantoms, run, "--trainer.max_steps", "2", "--checkpoint_every_n_steps", "1")) == 0
    ours = {p for p in _snapshot(run)}
    assert {"checkpoints/last.ckpt", "encoder.pt", "metrics.csv", "config.yaml"} <= ours
    (run / "checkpoints" / "my_model_backup.ckpt").write_bytes(b"the user's own checkpoint")
    (run / "figures").mkdir(exist_ok=True)
    (run / "figures" / "my_plot.png").write_bytes(b"the user's figure")
    (run / "notes.txt").write_text("mine")
    mine = {name: data for name, data in _snapshot(run).items() if name not in ours}
    old_last = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert main(_pretrain(phantoms, run, "--trainer.max_steps", "1", "--overwrite", "true")) == 0
    after = _snapshot(run)
    assert all(after.get(name) == data for name, data in mine.items())  # every file of the user, byte for byte
    assert after["checkpoints/last.ckpt"] != old_last and _step(run / "checkpoints" / "last.ckpt") == 1
    with (run / "metrics.csv").open() as f:
        assert {row["step"] for row in csv.DictReader(f)} == {"0"}  # only the new run's step (the old one had 0, 1)


@contextlib.contextmanager
def _small_disk(path: Path, size: str):
    """A real tmpfs of ``size`` at ``path`` (a full disk and a read-only one are the real thing), unmounted after."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def test_a_full_or_read_only_disk_is_one_line_leaves_nothing_and_the_same_command_runs_after(phantoms, tmp_path,
                                                                                            capsys):
    with _small_disk(tmp_path / "disk", "96k") as disk:
        run = disk / "run"
        command = _pretrain(phantoms, run, "--trainer.max_steps", "1", "--ckpt_path", "last")
        assert main(command) == 2  # the checkpoint does not fit
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and "No space left on device (errno 28 ENOSPC)" in err[0] and str(run) in err[0], err
        assert list(disk.iterdir()) == []  # a fresh run that wrote no checkpoint leaves nothing, not half a folder
        _remount(disk, "ro")
        assert main(command) == 2
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and "errno 30 EROFS" in err[0] and str(run) in err[0], err
        _remount(disk, "rw,size=64m")  # space again: the very same command runs
        assert main(command) == 0
        assert _step(run / "checkpoints" / "last.ckpt") == 1 and read_encoder(run / "encoder.pt")[1]["complete"]


def test_a_disk_filling_up_mid_run_keeps_the_last_checkpoint_and_resumes(phantoms, tmp_path, capsys):
    with _small_disk(tmp_path / "disk", "64m") as disk:
        run, filler = disk / "run", disk / "filler"
        last = run / "checkpoints" / "last.ckpt"
        proc = _start(_pretrain(phantoms, run, "--checkpoint_every_n_steps", "1"))
        try:
            _wait_for(lambda: _step(last) >= 1, proc, "the first checkpoint")
            # fill the disk to the last byte; unbuffered, so that closing has nothing left to flush (a buffered
            # file's close re-raised ENOSPC outside the suppress whenever the full disk left bytes in its buffer)
            with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
                while True:
                    f.write(bytes(1 << 16))
            _, stderr = proc.communicate(timeout=TIMEOUT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        err = _errors(stderr)
        assert proc.returncode == 2 and len(err) == 1 and "errno 28 ENOSPC" in err[0] and str(run) in err[0], stderr
        assert "Traceback" not in stderr
        step = _step(last)  # the last whole checkpoint is kept, nothing half-written beside it
        assert step >= 1 and not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".partial"))]
        assert (run / "metrics.csv").read_bytes().endswith(b"\n")
        filler.unlink()
        assert main(_pretrain(phantoms, run, "--trainer.max_steps", str(step + 1), "--ckpt_path", "last")) == 0
        assert _step(last) == step + 1


def test_a_file_in_the_way_of_an_output_is_one_line_naming_it(phantoms, tmp_path, capsys):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("mine")
    for out, code in ((in_the_way, "errno 17 EEXIST"), (in_the_way / "run", "errno 20 ENOTDIR")):
        assert main(_pretrain(phantoms, out, "--trainer.max_steps", "1")) == 2
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and code in err[0] and str(in_the_way) in err[0], err
        assert main(["preprocess", "--config", str(REPO / "configs/pretrain/demo_ct.yaml"), "--data.init_args.datalist",
                     str(phantoms), "--out", str(out), "--no-progress"]) == 2
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and code in err[0] and str(in_the_way) in err[0], err
    for command in ("evaluate", "predict"):  # refused before any work
        extra = ["--input", str(tmp_path)] if command == "predict" else []
        assert main([command, "--config", str(REPO / "configs/finetune/demo_ct.yaml"), "--out", str(in_the_way),
                     *extra]) == 2
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and "errno 17 EEXIST" in err[0] and str(in_the_way) in err[0], err
    assert in_the_way.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_export_bundle_into_an_existing_bundle_needs_overwrite_and_keeps_the_users_files(tmp_path):
    from spark3d.data import SegmentationData
    from spark3d.errors import ConfigError
    from spark3d.export import export_bundle
    from spark3d.train import SegmentationModule

    data = SegmentationData(str(tmp_path / "unused.json"), num_classes=3, roi_size=(32, 32, 32))
    module = SegmentationModule(backbone="segresnet", backbone_kwargs={"init_filters": 8}, num_classes=3,
                                roi_size=(32, 32, 32))
    first_ckpt, second_ckpt = tmp_path / "first.ckpt", tmp_path / "second.ckpt"
    torch.save({"state_dict": module.state_dict()}, first_ckpt)
    torch.save({"state_dict": {k: v + 1 if v.is_floating_point() else v for k, v in module.state_dict().items()}},
               second_ckpt)  # other weights: the bundle must change
    bundle = export_bundle(module, data, str(first_ckpt), tmp_path / "bundle")
    (bundle / "docs" / "my_notes.md").write_text("mine")
    first = _snapshot(bundle)
    with pytest.raises(ConfigError, match="already holds a spark3d bundle: pass --overwrite true"):
        export_bundle(module, data, str(second_ckpt), bundle)
    assert _snapshot(bundle) == first
    export_bundle(module, data, str(second_ckpt), bundle, overwrite=True)
    after = _snapshot(bundle)
    assert after["docs/my_notes.md"] == b"mine" and after["models/model.pt"] != first["models/model.pt"]
    assert set(after) == set(first)


def test_signal_stop_saves_at_the_step_and_restores_the_handlers(tmp_path):
    import pytorch_lightning as pl

    from spark3d.train.interrupt import RunInterrupted, SignalStop

    class Toy(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of step 3
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=2)

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stop = SignalStop(tmp_path / "checkpoints")
    trainer = pl.Trainer(max_steps=6, callbacks=[stop], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RunInterrupted) as info:
        trainer.fit(Toy())
    assert info.value.signum == signal.SIGTERM and info.value.step == 3  # the step in flight was finished
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == 3
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


def test_finetuning_from_an_unfinished_encoder_says_so(tmp_path, capsys):
    from spark3d.checkpoint import write_encoder

    encoder = write_encoder(tmp_path / "encoder.pt", {"w": torch.ones(2)},
                            {"backbone": "segresnet", "complete": False, "global_step": 16, "total_steps": 60})
    blocked = tmp_path / "a_file"
    blocked.write_text("in the way")  # stops the run right after the checks, before anything is built
    code = main(["finetune", "--config", str(REPO / "configs/finetune/demo_ct.yaml"), "--model.init_args.pretrained",
                 str(encoder), "--trainer.default_root_dir", str(blocked)])
    err = capsys.readouterr().err
    assert code == 2 and f"{encoder} is from a pretraining run that did not finish (step 16 of 60)" in err

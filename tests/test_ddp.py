"""Multi-process behaviour on CPU (gloo): sparse SyncBatchNorm and a Lightning DDP pretraining run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from spark3d.masking import upsample_mask

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ddp_sync_bn_worker import rank_data  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_sparse_sync_batchnorm_uses_visible_sites_of_all_processes(tmp_path):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(HERE / "ddp_sync_bn_worker.py"), str(r), "2", port,
                               str(tmp_path / f"rank{r}.pt")], env=_env()) for r in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    data = [rank_data(r) for r in range(2)]
    visible = [x.movedim(1, -1)[upsample_mask(m, x.shape[2:])[:, 0]] for x, m in data]  # (N_r, C) each
    union = torch.cat(visible)
    mean, var = union.mean(0), union.var(0, unbiased=False)
    for r, ((x, m), res) in enumerate(zip(data, results)):
        assert res["type"] == "SparseBatchNorm3d"
        vis = upsample_mask(m, x.shape[2:])[:, 0]
        ref = (visible[r] - mean) / (var + 1e-5).sqrt()
        assert torch.allclose(res["y"].movedim(1, -1)[vis], ref, atol=1e-5)
        assert torch.all(res["y"].movedim(1, -1)[~vis] == 0)
        assert torch.allclose(res["running_mean"], 0.1 * mean, atol=1e-6)
        assert torch.allclose(res["running_var"], 0.9 + 0.1 * union.var(0, unbiased=True), atol=1e-5)
    # gradients flow through the all-reduce: input gradients match autograd on the union of both processes
    xs = [x.clone().requires_grad_(True) for x, _ in data]
    vis_sites = [x.movedim(1, -1)[upsample_mask(m, x.shape[2:])[:, 0]] for x, (_, m) in zip(xs, data)]
    u = torch.cat(vis_sites)
    y_union = (u - u.mean(0)) / (u.var(0, unbiased=False) + 1e-5).sqrt()
    n0 = vis_sites[0].shape[0]
    (y_union[:n0].sum() * 1 + y_union[n0:].sum() * 2).backward()
    for r in range(2):
        assert torch.allclose(results[r]["x_grad"], xs[r].grad, atol=1e-5)
    assert xs[0].grad.abs().max() > 1e-3  # the cross-process term is not trivially zero


def test_lightning_ddp_two_processes_identical_weights(tmp_path):
    from spark3d.data.phantoms import write_btcv_phantoms

    datalist = write_btcv_phantoms(tmp_path / "data", n_train=4, n_val=2, n_test=0, shape=(48, 48, 32), seed=3)
    run = tmp_path / "run"
    config = HERE.parent / "configs" / "pretrain" / "demo_ct.yaml"
    cmd = [sys.executable, "-m", "spark3d.cli", "pretrain", "--config", str(config),
           "--data.init_args.datalist", str(datalist), "--data.init_args.roi_size", "[32, 32, 32]",
           "--data.init_args.batch_size", "1", "--trainer.default_root_dir", str(run),
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.sync_batchnorm", "true",
           "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
           "--model.init_args.backbone", "resnet10", "--model.init_args.backbone_kwargs", '{}',
           "--trainer.callbacks+=spark3d.train.callbacks.DDPConsistencyCheck"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "ddp_check.json").read_text())
    assert report["world_size"] == 2 and report["identical"]
    assert "SparseBatchNorm3d" in report["ranks"][1]["batchnorm_types"]
    assert "synchronising" in proc.stderr
    assert (run / "encoder.pt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()

"""Callbacks: a check that every DDP process ends with the same weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytorch_lightning as pl
import torch

__all__ = ["DDPConsistencyCheck", "state_fingerprint"]


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, exact bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class DDPConsistencyCheck(pl.Callback):
    """At the end of fit, compare every process's weights; write ``ddp_check.json`` and fail if they differ."""

    def __init__(self, filename: str = "ddp_check.json") -> None:
        self.filename = filename

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        norm_types = sorted({type(m).__name__ for m in pl_module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
        mine = {"rank": trainer.global_rank, "fingerprint": state_fingerprint(pl_module), "batchnorm_types": norm_types}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if trainer.is_global_zero:
            report = {"world_size": len(gathered), "ranks": gathered,
                      "identical": len({g["fingerprint"] for g in gathered}) == 1}
            path = Path(trainer.default_root_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
            if not report["identical"]:
                raise RuntimeError(f"DDP processes ended with different weights: see {path}")

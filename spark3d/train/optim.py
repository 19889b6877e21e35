"""The optimisation recipes shared by pretraining and fine-tuning: schedules, parameter groups, the lr scheduler."""

from __future__ import annotations

import math
from typing import Any, Iterable

import pytorch_lightning as pl
import torch

from ..errors import ConfigError

__all__ = ["warmup_cosine", "cosine_ramp", "decay_groups", "warmup_cosine_scheduler", "check_optim_values"]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr: linear warm-up from ~0 to 1, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """A value moving from ``start`` to ``end`` on a half cosine (SparK's rising weight decay)."""
    progress = min(1.0, step / max(1, total_steps))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], no_decay: set[str],
                 weight_decay: float) -> list[dict]:
    """Two groups, decayed first then exempt (``no_decay`` names); frozen parameters are left out."""
    decay, plain = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (plain if name in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, trainer: pl.Trainer, warmup_epochs: float,
                            min_lr_ratio: float) -> tuple[dict, int]:
    """Lightning's per-step scheduler entry (warm-up for ``warmup_epochs``, at most half the run, then cosine)
    and the run's total optimiser steps."""
    total = max(1, int(trainer.estimated_stepping_batches))
    per_epoch = max(1, trainer.num_training_batches // max(1, trainer.accumulate_grad_batches))
    warmup = min(int(round(warmup_epochs * per_epoch)), total // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, min_lr_ratio))
    return {"scheduler": sched, "interval": "step"}, total


def check_optim_values(values: dict[str, Any], where: str = "model.init_args") -> None:
    """Optimiser values that cannot work, refused before anything is built: an lr (or base_lr) <= 0, a negative
    weight decay or warm-up. ConfigError naming ``where.KEY``."""
    for key, low, strict in (("lr", 0.0, True), ("base_lr", 0.0, True), ("weight_decay", 0.0, False),
                             ("weight_decay_end", 0.0, False), ("warmup_epochs", 0.0, False)):
        v = values.get(key)
        if v is None:
            continue
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
            (v <= low if strict else v < low)
        if bad:
            raise ConfigError(f"{where}.{key} is {v}; expected a number {'>' if strict else '>='} {low:g}")

"""``spark3d pretrain``: SparK pretraining from a YAML config and dotted overrides (LightningCLI)."""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

from .data.datalist import DataError

HELP = "SparK pretraining (LightningCLI: --config F, --data.*, --model.*, --trainer.*, --print_config)"


def run_pretrain(argv: list[str]) -> int:
    import pytorch_lightning as pl

    from .train.cli import Spark3dCLI
    from .train.pretrain import SparKPretrain

    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    try:
        cli = Spark3dCLI(
            SparKPretrain,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=argv,
            run=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"use_distributed_sampler": False, "default_root_dir": "runs/pretrain",
                              "log_every_n_steps": 1},
            parser_kwargs={"prog": "spark3d pretrain", "description": HELP, "allow_abbrev": False,
                           "exit_on_error": False},
        )
    except (argparse.ArgumentError, ValueError) as err:
        # a bad option, config key or value: one message, nothing written
        print(f"spark3d pretrain: error: {err}\n(see `spark3d pretrain --help`)", file=sys.stderr)
        return 2
    root = Path(cli.trainer.default_root_dir)
    existed = root.exists()
    try:
        if hasattr(cli.datamodule, "validate"):
            cli.datamodule.validate()
        ckpt = cli.config.get("ckpt_path")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    except DataError:
        if not existed and cli.trainer.is_global_zero:
            shutil.rmtree(root, ignore_errors=True)  # nothing half-written for bad input
        raise
    if cli.trainer.is_global_zero:
        print(f"\nrun directory: {root}\n  encoder: {root / 'encoder.pt'}\n  checkpoints: {root / 'checkpoints'}\n"
              f"  metrics: {root / 'metrics.csv'}\n  figures: {root / 'figures'}", file=sys.stderr)
    return 0

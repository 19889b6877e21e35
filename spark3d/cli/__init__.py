"""The ``spark3d`` command line: one table of commands, each row naming its function and its one-line help."""

from __future__ import annotations

import sys
from typing import Callable

from ..errors import find_os_error, find_user_error, output_error
from .commands import (
    run_benchmark, run_check_backbone, run_evaluate, run_export_bundle, run_export_nnunet, run_finetune, run_predict,
    run_preprocess, run_pretrain,
)
from .demo import run_demo

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "demo": (run_demo, "the embedded default: phantoms → SparK pretraining → fine-tuning → Dice (CPU, minutes)"),
    "pretrain": (run_pretrain, "masked pretraining (LightningCLI: --config F, dotted overrides, --print_config)"),
    "finetune": (run_finetune, "segmentation fine-tuning through MONAI (--model.init_args.pretrained encoder.pt)"),
    "evaluate": (run_evaluate, "per-case, per-organ Dice at the original resolution → CSV + JSON"),
    "predict": (run_predict, "label NIfTI in each input's space + overlay PNG"),
    "export-bundle": (run_export_bundle, "a MONAI bundle of a fine-tuned checkpoint that runs without spark3d"),
    "export-nnunet": (run_export_nnunet, "an nnU-Net weights file: a plan's whole network with a pretrained encoder.pt"),
    "check-backbone": (run_check_backbone, "tell whether a network is safe for sparse masking"),
    "preprocess": (run_preprocess, "write the CT store of a pretraining config (resumable, --shard i/n, --merge)"),
    "benchmark": (run_benchmark, "step time, peak memory, FLOPs by part: dense / masked-dense / sparse (--json)"),
}


def main(argv: list[str] | None = None) -> int:
    """``spark3d <command> …``: run one command; user errors are one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: spark3d <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<16} {help_text}")
        print("\nRun `spark3d <command> --help` for the options of a command.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"spark3d: unknown command '{command}'; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](rest)
    except Exception as err:  # a spark3d error, possibly wrapped by MONAI, Lightning or jsonargparse: one line
        user = find_user_error(err)
        if user is None:  # a full disk, a read-only output, a file in the way: one line naming the path
            failed = find_os_error(err)
            if failed is None:
                raise
            user = output_error(failed)
        print(f"spark3d {command}: error: {' '.join(str(user).split())}", file=sys.stderr)
        return 2

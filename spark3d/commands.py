"""The training and inference subcommands: pretrain, finetune, evaluate, predict."""

from __future__ import annotations

import argparse
import sys

__all__ = ["run_pretrain", "run_finetune", "run_evaluate", "run_predict"]

SEG_LINKS = {"data.init_args.roi_size": "model.init_args.roi_size",
             "data.init_args.num_classes": "model.init_args.num_classes"}


def _cli(model_class, prog: str, description: str, argv: list[str], root: str, **kw):
    from .train.cli import make_cli

    try:
        return make_cli(model_class, prog, description, argv, root, **kw)
    except (argparse.ArgumentError, ValueError) as err:
        print(f"{prog}: error: {err}\n(see `{prog} --help`)", file=sys.stderr)
        return None


def run_pretrain(argv: list[str]) -> int:
    from .train.cli import run_fit
    from .train.pretrain import SparKPretrain

    cli = _cli(SparKPretrain, "spark3d pretrain", "SparK pretraining (LightningCLI: --config F, --data.*, --model.*, "
               "--trainer.*, --print_config)", argv, "runs/pretrain")
    if cli is None:
        return 2
    code = run_fit(cli, "pretraining")
    if cli.trainer.is_global_zero:
        print(f"  encoder: {cli.trainer.default_root_dir}/encoder.pt", file=sys.stderr)
    return code


def run_finetune(argv: list[str]) -> int:
    from .train.cli import run_fit
    from .train.segment import SegmentationModule

    cli = _cli(SegmentationModule, "spark3d finetune", "Segmentation fine-tuning through MONAI (LightningCLI; "
               "--model.init_args.pretrained encoder.pt)", argv, "runs/finetune", monitor="val/mean_dice",
               monitor_mode="max", links=SEG_LINKS)
    if cli is None:
        return 2
    return run_fit(cli, "fine-tuning")


def _inference_cli(prog: str, argv: list[str], extra: dict):
    from .train.segment import SegmentationModule

    return _cli(SegmentationModule, prog, "Run a fine-tuned checkpoint (the fine-tuning config plus --ckpt_path)",
                argv, "runs/finetune", links=SEG_LINKS, extra_arguments=extra)


def run_evaluate(argv: list[str]) -> int:
    from .inference import evaluate

    cli = _inference_cli("spark3d evaluate", argv, {"--out": {"type": str, "required": True,
                                                               "help": "folder for dice_per_case.csv and summary.json"},
                                                     "--split": {"type": str, "default": "validation",
                                                                 "help": "datalist key to evaluate"}})
    if cli is None:
        return 2
    summary = evaluate(cli.model, cli.datamodule, cli.config["ckpt_path"], cli.config["out"], cli.config["split"])
    print(summary["table"])
    return 0


def run_predict(argv: list[str]) -> int:
    from .inference import predict

    cli = _inference_cli("spark3d predict", argv, {
        "--input": {"type": str, "required": True, "help": "a NIfTI file or a folder of them"},
        "--out": {"type": str, "required": True, "help": "folder for <case>_seg.nii.gz and <case>_overlay.png"}})
    if cli is None:
        return 2
    written = predict(cli.model, cli.datamodule, cli.config["ckpt_path"], cli.config["input"], cli.config["out"])
    for path in written:
        print(path)
    return 0

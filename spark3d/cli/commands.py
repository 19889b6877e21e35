"""The commands: pretrain, finetune, evaluate, predict, check-backbone. Each takes ``argv`` and returns an exit code."""

from __future__ import annotations

import argparse
import sys

__all__ = ["run_pretrain", "run_finetune", "run_evaluate", "run_predict", "run_check_backbone"]


def run_pretrain(argv: list[str]) -> int:
    from ..train.pretrain import PretrainModule
    from .lightning import PRETRAIN_LINKS, parse_or_report, run_fit

    cli = parse_or_report(PretrainModule, "spark3d pretrain", "Masked pretraining (LightningCLI: --config F, --data.*, "
                          "--model.*, --trainer.*, --print_config)", argv, "runs/pretrain", links=PRETRAIN_LINKS)
    if cli is None:
        return 2
    code = run_fit(cli, "pretraining")
    if cli.trainer.is_global_zero:
        print(f"  encoder: {cli.trainer.default_root_dir}/encoder.pt", file=sys.stderr)
    return code


def run_finetune(argv: list[str]) -> int:
    from ..train.segment import SegmentationModule
    from .lightning import SEGMENTATION_LINKS, parse_or_report, run_fit

    cli = parse_or_report(SegmentationModule, "spark3d finetune", "Segmentation fine-tuning through MONAI (LightningCLI; "
                          "--model.init_args.pretrained encoder.pt)", argv, "runs/finetune", monitor="val/mean_dice",
                          monitor_mode="max", links=SEGMENTATION_LINKS)
    if cli is None:
        return 2
    return run_fit(cli, "fine-tuning")


def _inference_cli(prog: str, argv: list[str], extra: dict):
    from ..train.segment import SegmentationModule
    from .lightning import SEGMENTATION_LINKS, parse_or_report, prepare_data

    cli = parse_or_report(SegmentationModule, prog, "Run a fine-tuned checkpoint (the fine-tuning config plus "
                          "--ckpt_path)", argv, "runs/finetune", links=SEGMENTATION_LINKS, extra_arguments=extra)
    if cli is not None:
        prepare_data(cli)
    return cli


def run_evaluate(argv: list[str]) -> int:
    from ..inference import evaluate

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
    from ..inference import predict

    cli = _inference_cli("spark3d predict", argv, {
        "--input": {"type": str, "required": True, "help": "a NIfTI file or a folder of them"},
        "--out": {"type": str, "required": True, "help": "folder for <case>_seg.nii.gz and <case>_overlay.png"}})
    if cli is None:
        return 2
    written = predict(cli.model, cli.datamodule, cli.config["ckpt_path"], cli.config["input"], cli.config["out"])
    for path in written:
        print(path)
    return 0


def run_check_backbone(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spark3d check-backbone",
        description="Tell whether a network is safe for sparse masking: masked content must not leak into "
        "the prediction, and with every cell visible the sparse encoder must equal the dense one.",
    )
    parser.add_argument("name", nargs="?", default="resnet18",
                        help="a backbone-table name (MONAI: resnet10/18/34/50, segresnet, dynunet, mednext) or any timm "
                        "model name (prefix with the source to force it, e.g. timm/resnet18). Default: resnet18 (MONAI)")
    parser.add_argument("--spatial-dims", type=int, default=None, help="2 or 3 (MONAI default 3; timm is 2D)")
    parser.add_argument("--in-channels", type=int, default=None, help="input channels (MONAI default 1, timm 3)")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="input size per axis (one value: cubic)")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ..check import check_backbone
    from ..sparse import UnsafeLayerError

    size = None if args.size is None else (args.size[0] if len(args.size) == 1 else tuple(args.size))
    try:
        result = check_backbone(args.name, args.spatial_dims, args.in_channels, size, args.mask_ratio, seed=args.seed)
    except (UnsafeLayerError, ValueError, RuntimeError) as err:
        print(f"spark3d check-backbone: {args.name}: {err}", file=sys.stderr)
        return 2
    print(result.report())
    return 0 if result.ok else 1

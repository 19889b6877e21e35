"""The ``spark3d`` command line: ``spark3d <command> …``."""

from __future__ import annotations

import argparse
import sys


def _check_backbone(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spark3d check-backbone",
        description="Tell whether a network is safe for sparse masking: masked content must not leak into "
        "the prediction, and with every cell visible the sparse encoder must equal the dense one.",
    )
    parser.add_argument("name", nargs="?", default="resnet18",
                        help="a MONAI encoder name (resnet10/18/34/50, segresnet, dynunet, mednext) or a timm model "
                        "name (prefix with timm/ to force timm, e.g. timm/resnet18). Default: resnet18 (MONAI)")
    parser.add_argument("--spatial-dims", type=int, default=None, help="2 or 3 (MONAI default 3; timm is 2D)")
    parser.add_argument("--in-channels", type=int, default=None, help="input channels (MONAI default 1, timm 3)")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="input size per axis (one value: cubic)")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .check import check_backbone
    from .sparse import UnsafeLayerError

    size = None if args.size is None else (args.size[0] if len(args.size) == 1 else tuple(args.size))
    try:
        result = check_backbone(args.name, args.spatial_dims, args.in_channels, size, args.mask_ratio, seed=args.seed)
    except (UnsafeLayerError, ValueError, RuntimeError) as err:
        print(f"spark3d check-backbone: {args.name}: {err}", file=sys.stderr)
        return 2
    print(result.report())
    return 0 if result.ok else 1


def _command(name: str):
    def run(argv: list[str]) -> int:
        from . import commands

        return getattr(commands, f"run_{name}")(argv)

    return run


def _demo(argv: list[str]) -> int:
    from .demo import run_demo

    return run_demo(argv)


COMMANDS = {
    "demo": (_demo, "the embedded default: phantoms → SparK pretraining → encoder.pt + figures (CPU, minutes)"),
    "pretrain": (_command("pretrain"), "SparK pretraining (LightningCLI: --config F, dotted overrides, --print_config)"),
    "finetune": (_command("finetune"), "segmentation fine-tuning through MONAI (--model.init_args.pretrained encoder.pt)"),
    "evaluate": (_command("evaluate"), "per-case, per-organ Dice at the original resolution → CSV + JSON"),
    "predict": (_command("predict"), "label NIfTI in each input's space + overlay PNG"),
    "check-backbone": (_check_backbone, "tell whether a network is safe for sparse masking"),
}


def main(argv: list[str] | None = None) -> int:
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
    from .data.datalist import DataError
    from .seg_networks import PretrainedMismatch

    try:
        return COMMANDS[command][0](rest)
    except (DataError, PretrainedMismatch) as err:
        print(f"spark3d {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

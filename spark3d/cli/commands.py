"""The commands: pretrain, finetune, evaluate, predict, export-bundle, check-backbone, preprocess, benchmark. Each takes
``argv`` and returns an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["run_pretrain", "run_finetune", "run_evaluate", "run_predict", "run_export_bundle", "run_export_nnunet",
           "run_check_backbone", "run_preprocess", "run_benchmark"]


def run_pretrain(argv: list[str]) -> int:
    from ..train.pretrain import PretrainModule
    from .lightning import PRETRAIN_LINKS, parse_or_report, run_fit

    cli = parse_or_report(PretrainModule, "spark3d pretrain", "Masked pretraining (LightningCLI: --config F, --data.*, "
                          "--model.*, --trainer.*, --print_config)", argv, "runs/pretrain", links=PRETRAIN_LINKS)
    if cli is None:
        return 2
    code = run_fit(cli, "pretraining")
    encoder = f"{cli.trainer.default_root_dir}/encoder.pt"
    if code == 0 and cli.trainer.is_global_zero and os.path.isfile(encoder):  # an interrupted run's is not final
        print(f"  encoder: {encoder}", file=sys.stderr)
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
        from pathlib import Path

        from .runs import check_output_folder

        check_output_folder(Path(cli.config["out"]), "--out")  # a file in the way, read-only: before any work
        prepare_data(cli)
    return cli


def run_evaluate(argv: list[str]) -> int:
    from ..inference import evaluate

    cli = _inference_cli("spark3d evaluate", argv, {"--out": {"type": str, "required": True,
                                                               "help": "folder for dice_per_case.csv and summary.json"},
                                                     "--split": {"type": str, "default": "validation",
                                                                 "help": "datalist key to evaluate"},
                                                     "--input": {"type": str | None, "default": None,
                                                                 "help": "a datalist JSON to evaluate (its --split "
                                                                 "cases); default: the config's data datalist"}})
    if cli is None:
        return 2
    summary = evaluate(cli.model, cli.datamodule, cli.config["ckpt_path"], cli.config["out"], cli.config["split"],
                       cli.config["input"])
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


def run_export_bundle(argv: list[str]) -> int:
    from ..export import export_bundle

    cli = _inference_cli("spark3d export-bundle", argv, {
        "--out": {"type": str, "required": True, "help": "bundle folder (configs/, models/, docs/, LICENSE)"},
        "--summary": {"type": str, "default": None,
                      "help": "a `spark3d evaluate` summary.json for the bundle's Dice table"},
        "--overwrite": {"type": bool, "default": False,
                        "help": "replace a spark3d bundle already in --out (files of yours in it are kept)"}})
    if cli is None:
        return 2
    out = export_bundle(cli.model, cli.datamodule, cli.config["ckpt_path"], cli.config["out"], cli.config["summary"],
                        overwrite=bool(cli.config["overwrite"]))
    print(out)
    print(f"run it: python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out} "
          "--dataset_dir IMAGES --output_dir LABELS", file=sys.stderr)
    return 0


def run_export_nnunet(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spark3d export-nnunet",
        description="The whole network of an nnU-Net plan with a pretrained encoder.pt's encoder and stem (nnU-Net's "
        "own initialisation elsewhere), as {network_weights, nnssl_adaptation_plan}: fine-tune it with nnUNetv2_train "
        "... -pretrained_weights FILE. Example: spark3d export-nnunet --encoder runs/plan/encoder.pt --plans "
        "$nnUNet_preprocessed/Dataset501_X/nnUNetResEncUNetLPlans.json --configuration 3d_fullres --out pretrained.pth",
    )
    parser.add_argument("--encoder", required=True, help="encoder.pt written by spark3d pretrain")
    parser.add_argument("--plans", required=True, help="the target dataset's nnU-Net plans JSON")
    parser.add_argument("--configuration", default="3d_fullres", help="the plan's configuration (default 3d_fullres)")
    parser.add_argument("--out", required=True, help="the weights file to write (e.g. pretrained.pth)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from ..export import export_nnunet

    out = export_nnunet(args.encoder, args.plans, args.configuration, args.out)
    print(out)
    plans = Path(args.plans)
    print(f"fine-tune it: nnUNetv2_train {plans.parent.name} {args.configuration} FOLD -p {plans.stem} "
          f"-pretrained_weights {out}", file=sys.stderr)
    return 0


def run_check_backbone(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spark3d check-backbone",
        description="Tell whether a network is safe for sparse masking: masked content must not leak into "
        "the prediction, and with every cell visible the sparse encoder must equal the dense one.",
    )
    parser.add_argument("name", nargs="?", default="resnet18",
                        help="a backbone-table name (MONAI: resnet10/18/34/50, segresnet, dynunet, mednext; nnU-Net: "
                        "resenc_m, resenc_l, resenc_xl, plainconv) or any timm "
                        "model name (prefix with the source to force it, e.g. timm/resnet18). Default: resnet18 (MONAI)")
    parser.add_argument("--spatial-dims", type=int, default=None, help="2 or 3 (MONAI default 3; timm is 2D)")
    parser.add_argument("--in-channels", type=int, default=None, help="input channels (MONAI default 1, timm 3)")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="input size per axis (one value: cubic)")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone-kwargs", default=None, metavar="JSON",
                        help='constructor overrides as JSON, e.g. \'{"features_per_stage": [8, 16, 32, 64, 64, 64]}\'')
    args = parser.parse_args(argv)
    from ..check import check_backbone, refusal_report
    from ..sparse import UnsafeLayerError

    size = None if args.size is None else (args.size[0] if len(args.size) == 1 else tuple(args.size))
    try:
        kwargs = json.loads(args.backbone_kwargs) if args.backbone_kwargs else {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"--backbone-kwargs must be a JSON object, got {args.backbone_kwargs}")
    except json.JSONDecodeError as err:
        print(f"spark3d check-backbone: --backbone-kwargs is not valid JSON: {err}", file=sys.stderr)
        return 2
    try:
        result = check_backbone(args.name, args.spatial_dims, args.in_channels, size, args.mask_ratio, seed=args.seed,
                                backbone_kwargs=kwargs)
    except UnsafeLayerError as err:
        if not err.refusals:  # the network could not be probed at all
            print(f"spark3d check-backbone: {args.name}: {err}", file=sys.stderr)
            return 2
        print(refusal_report(args.name, err))
        return 1
    except (ValueError, RuntimeError, ImportError, TypeError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        print(f"spark3d check-backbone: {args.name}: {first}", file=sys.stderr)
        return 2
    print(result.report())
    return 0 if result.ok else 1


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not of the form i/n (e.g. 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"'{text}': expected 0 <= i < n")
    return index, count


def _pretrain_data_module(config_path: str, overrides: list[str]):
    """The CT data module a pretraining config describes, with ``--data.init_args.KEY VALUE`` overrides."""
    import yaml

    from ..data.ct import CTPretrainData
    from ..errors import ConfigError, Spark3dError
    from .configs import read_config_file

    config = read_config_file(config_path, prog="spark3d preprocess")  # a run's config.yaml too
    data = config.get("data") or {}
    class_path = str(data.get("class_path", ""))
    if class_path.split(".")[-1] != CTPretrainData.__name__:
        raise ConfigError(f"{config_path}: data.class_path is '{class_path}'; preprocess needs a CT pretraining config "
                          "(spark3d.data.CTPretrainData)")
    init_args = dict(data.get("init_args") or {})
    if len(overrides) % 2:
        raise ConfigError(f"override {overrides[-1]} has no value")
    for key, value in zip(overrides[::2], overrides[1::2]):
        name = key.removeprefix("--data.init_args.").removeprefix("--data.")
        if not key.startswith("--data.") or "." in name:
            raise ConfigError(f"unknown option {key} (overrides are --data.init_args.KEY VALUE)")
        init_args[name] = yaml.safe_load(value)
    try:
        return CTPretrainData(**init_args)
    except Spark3dError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{config_path}: data.init_args: {err}") from None


def run_preprocess(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spark3d preprocess",
        description="Write the CT store of a pretraining config: each volume of its datalist through the deterministic "
        "chain (RAS, spacing, intensity window, foreground crop) once, as a memory-mappable float16 .npy, plus a "
        "manifest. Resumable (finished volumes are skipped); --shard i/n splits the corpus (a job array), --merge "
        "joins the shards. Pretrain from it with --data.init_args.store STORE. Extra --data.init_args.KEY VALUE "
        "options override the config.",
    )
    parser.add_argument("--config", help="a CT pretraining config (data: spark3d.data.CTPretrainData)")
    parser.add_argument("--out", required=True, help="the store folder")
    parser.add_argument("--shard", type=_parse_shard, default=(0, 1), metavar="i/n",
                        help="process volumes k with k %% n == i and write manifest-shard-i-of-n.json (default 0/1)")
    parser.add_argument("--merge", action="store_true", help="join every shard manifest of --out into manifest.json")
    parser.add_argument("--verify", action="store_true", help="check every volume of --out against its record (size, "
                        "header, sha256) and write nothing; exit 2 naming the first mismatch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = parser.parse_known_args(argv)
    from ..data.store import merge_shards, write_store

    if args.verify:
        if args.config or overrides or args.merge:
            parser.error("--verify reads the store only: give --out alone")
        from ..data.store_verify import refuse_problems, verify_store

        report = verify_store(args.out)
        refuse_problems(report, args.out)
        print(f"spark3d preprocess: {args.out}: all {report['volumes']} volumes match their records (size, header, "
              f"sha256; {report['bytes'] / 1e6:.1f} MB in {report['seconds']:.2f} s, "
              f"{report['bytes'] / 1e6 / max(report['seconds'], 1e-9):.0f} MB/s)")
        return 0
    if args.merge:
        if args.config or overrides:
            parser.error("--merge reads the shard manifests only: give --out alone")
        print(f"spark3d preprocess: {merge_shards(args.out)}")
        return 0
    if not args.config:
        parser.error("--config is required (unless --merge or --verify)")
    from pathlib import Path

    from .runs import check_output_folder

    from tqdm import tqdm

    dm = _pretrain_data_module(args.config, overrides)
    train, val = dm.source_files()  # every file checked before anything is written
    check_output_folder(Path(args.out), "--out")
    splits = {"training": [e["image"] for e in train], "validation": [e["image"] for e in val]}
    index, count = args.shard
    progress = None if args.no_progress else (
        lambda items: tqdm(items, desc=f"preprocess {index}/{count}" if count > 1 else "preprocess", unit="vol"))
    counts = write_store(splits, args.out, dm.store_settings(), str(Path(dm.datalist).absolute()), args.shard, progress)
    manifest = "manifest.json" if count == 1 else f"manifest-shard-{index}-of-{count}.json"
    redone = counts["redone"]
    again = f"; {len(redone)} redone ({redone[0]}{', …' if len(redone) > 1 else ''})" if redone else ""
    print(f"spark3d preprocess: {counts['volumes']} volumes ({counts['written']} written, {counts['skipped']} already "
          f"done){again} -> {Path(args.out) / manifest}")
    return 0


def _check_benchmark_args(args: argparse.Namespace) -> None:
    """Refuse, before anything is built or measured: counts below 1, a mask ratio outside (0, 1), a --json whose
    folder does not exist."""
    from pathlib import Path

    from ..errors import ConfigError
    from ..masking import check_mask_ratio

    for name, value, low in (("--batch", args.batch, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{name} is {value}; expected an integer >= {low}")
    if args.size is not None and any(s < 1 for s in args.size):
        raise ConfigError(f"--size is {args.size}; expected voxels >= 1 per axis")
    if args.mask_ratio is not None:
        check_mask_ratio(args.mask_ratio, "--mask-ratio")
    if args.json:
        folder = Path(args.json).absolute().parent
        if not folder.is_dir():
            raise ConfigError(f"--json {args.json}: folder {folder} does not exist (the report would be lost after "
                              "the benchmark ran)")
        if Path(args.json).is_dir():
            raise ConfigError(f"--json {args.json} is a folder; expected a file name")


def run_benchmark(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="spark3d benchmark",
        description="Step time, peak memory and FLOPs (encoder / densify + decoder) of a pretraining method, in modes "
        "dense (nothing masked), masked-dense and sparse, with ratios. Example: spark3d benchmark --config "
        "configs/pretrain/ct_segresnet.yaml --batch 2 --scope encoder --json bench.json",
    )
    parser.add_argument("--config", default=None, help="a pretraining config (model and data sections are read)")
    parser.add_argument("--backbone", default="segresnet", help="without --config: a backbone-table name")
    parser.add_argument("--source", default="monai", help="without --config: monai or timm")
    parser.add_argument("--spatial-dims", type=int, default=3)
    parser.add_argument("--in-channels", type=int, default=None, help="default 1 (3 for timm)")
    parser.add_argument("--backbone-kwargs", default="{}", help="JSON, e.g. '{\"init_filters\": 32}'")
    parser.add_argument("--method", default="spark")
    parser.add_argument("--method-args", default="{}", help="JSON of method options, e.g. '{\"decoder\": \"efficient\"}'")
    parser.add_argument("--decoder", default=None, choices=["spark", "efficient"], help="shorthand for the SparK option")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="input size per axis (one value: every axis)")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's crops per step (2 otherwise)")
    parser.add_argument("--mask-ratio", type=float, default=None)
    parser.add_argument("--modes", nargs="+", default=None, help="default: dense and every mode of the method")
    parser.add_argument("--scope", default="step", choices=["step", "encoder"],
                        help="time the whole method's forward + backward, or the encoder's alone")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", default=None, help="write the full report (with the machine description) here")
    args = parser.parse_args(argv)
    import json

    from ..bench import BenchmarkSpec, format_table, measure
    from ..errors import ConfigError

    try:
        method_args, backbone_kwargs = json.loads(args.method_args), json.loads(args.backbone_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--method-args / --backbone-kwargs must be JSON: {err}") from None
    if args.decoder:
        method_args["decoder"] = args.decoder
    _check_benchmark_args(args)
    spec = BenchmarkSpec(config=args.config, method=args.method, backbone=args.backbone, source=args.source,
                         spatial_dims=2 if args.source == "timm" else args.spatial_dims,
                         in_channels=args.in_channels or (3 if args.source == "timm" else 1),
                         backbone_kwargs=backbone_kwargs, input_size=args.size, batch=args.batch,
                         mask_ratio=args.mask_ratio, method_args=method_args)
    report = measure(spec, args.modes, args.scope, args.repeats, args.warmup, not args.no_memory, args.threads,
                     log=lambda line: print(line, file=sys.stderr))
    print(format_table(report))
    if report.get("compute_decision"):
        print(f"\nsparse path: {report['compute_decision']}")
    if report.get("plan"):
        print("plan: " + "\n  ".join(report["plan"]))
    if args.json:
        from ..provenance import write_result

        write_result(args.json, report, ["spark3d", "benchmark", *argv])
    return 0

"""Time one ConvMAE training step (forward + backward) at mask ratio 0.75 against the same model at ratio 0.

The model is the one a pretraining config builds (default: configs/pretrain/ct_convmae.yaml, ConvMAE-B
in 3D at 96³), computing the way ``--compute`` says (default ``auto``: sparse, see
:class:`spark3d.methods.convmae.ConvMAE`). At ratio 0.75 a quarter of the tokens go through the conv
part (sparse: only the visible cells) and the transformer; at ratio 0 all of them do. Every step draws a
fresh mask, as training does (the per-mask index tables are part of the step). The two steps alternate,
after warm-up, and the medians are compared, so a busy machine disturbs both alike. ``--masked-dense``
also times the masked-dense compute at both ratios (slow: torch's dense depthwise-conv weight gradient).
Also prints the parameter counts of the 2D ``base`` preset (224 px, 3 channels), and the forward FLOPs
of each model by part (``torch.utils.flop_counter``; exact, unlike times on a shared machine).
``--json`` writes everything, with the machine, its load average, the versions and the command.

    python benchmarks/convmae_step.py --batch 2 --repeats 3 --json docs/results/convmae_step.json
    python benchmarks/convmae_step.py --config configs/pretrain/demo_convmae_ct.yaml --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from spark3d import ConvMAE
from spark3d.backbones import BackboneSpec
from spark3d.bench import machine
from spark3d.masking import num_visible
from spark3d.methods import build_method

CONFIG = Path(__file__).parents[1] / "configs" / "pretrain" / "ct_convmae.yaml"


def model_of(config_path: Path, size: list[int] | None, compute: str = "auto") -> ConvMAE:
    """The ConvMAE model a pretraining config describes (its data ``roi_size`` unless ``size`` is given)."""
    config = yaml.safe_load(config_path.read_text())
    args, data = config["model"]["init_args"], config["data"]["init_args"]
    spec = BackboneSpec(args["backbone"], args["source"], args["spatial_dims"], args["in_channels"],
                        dict(args.get("backbone_kwargs") or {}))
    method_args = {**(args.get("method_args") or {}), "compute": compute}
    return build_method(args["method"], spec, size or data["roi_size"], args["mask_ratio"], **method_args)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


PARTS = ("encoder.stage1", "encoder.stage2", "encoder.stage3", "encoder.fuse1", "encoder.fuse2", "encoder.norm",
         "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred")


def _part(counts: dict[str, dict], name: str) -> float:
    """FLOPs counted under module ``name``: its own entry, or (a container never called itself) its outermost
    called descendants'."""
    if name in counts:
        return sum(counts[name].values())
    inside = [k for k in counts if k.startswith(name + ".")]
    outermost = [k for k in inside if not any(k.startswith(o + ".") for o in inside)]
    return sum(sum(counts[k].values()) for k in outermost)


def forward_flops(model: ConvMAE, x: torch.Tensor) -> dict[str, float]:
    """GFLOPs of one forward, in all and by part. (Backward is not counted: torch's counter takes a grouped conv's
    weight gradient for a dense one, C times too many for a depthwise conv; a step is about 3x the forward.)"""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out = {part: _part(counts, f"{root}.{part}") / 1e9 for part in PARTS}
    out["forward"] = sum(counts.get("Global", {}).values()) / 1e9
    # the sparse conv part runs the modules' weights without calling the modules: counted under no part
    out["conv part, no module"] = out["forward"] - sum(out[part] for part in PARTS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--size", type=int, nargs="+", default=None, help="input size (default: the config's roi_size)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each model (interleaved)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compute", default="auto", choices=["auto", "sparse", "masked-dense"])
    parser.add_argument("--masked-dense", action="store_true", help="also time compute='masked-dense' (slow)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = machine().get("load_average")
    started = time.time()

    base = ConvMAE.from_preset("base", spatial_dims=2, in_channels=3, input_size=(224, 224))
    print(f"2D base preset (224 px, 3 channels): encoder {count(base.encoder) / 1e6:.2f} M parameters, "
          f"decoder {(count(base) - count(base.encoder)) / 1e6:.2f} M, total {count(base) / 1e6:.2f} M")
    del base

    masked = model_of(args.config, args.size, args.compute)
    masked.mask_ratio = args.mask_ratio
    dense = copy.deepcopy(masked)
    dense.mask_ratio = 0.0  # every token through the conv part and the transformer (same weights)
    x = torch.randn(args.batch, masked.encoder.in_channels, *masked.input_size, generator=torch.Generator().manual_seed(0))
    runs = {"masked": (masked, None), "dense": (dense, None)}
    if args.masked_dense:
        runs.update({"masked, masked-dense": (masked, "masked-dense"), "dense, masked-dense": (dense, "masked-dense")})
    plans = {name: _plan(model, mode) for name, (model, mode) in runs.items()}

    def step(model: ConvMAE, mode: str | None) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        mask = model.random_mask(args.batch)  # a fresh mask every step, as in training
        if mode is None:
            model(x, mask=mask).loss.backward()
        else:
            with model.computing(mode):
                model(x, mask=mask).loss.backward()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for model, mode in runs.values():
            step(model, mode)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, (model, mode) in runs.items():
            times[name].append(step(model, mode))
            print(f"  {name:<22} repeat {r + 1}: {times[name][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    grid, total = masked.mask_grid, math.prod(masked.mask_grid)
    visible = num_visible(grid, args.mask_ratio)
    print(f"{args.config.name}: {type(masked).__name__} {masked.input_size}, widths {masked.encoder.widths}, "
          f"depths {masked.encoder.depths}, batch {args.batch}, {torch.get_num_threads()} threads, compute {args.compute}")
    for name in runs:
        where = plans[name]["path"] + (f", {plans[name]['layout']}" if "layout" in plans[name] else "")
        print(f"{name:<22} ({where}): median step "
              f"{medians[name]:.2f} s  (all: {', '.join(f'{t:.2f}' for t in times[name])})")
    ratio = medians["masked"] / medians["dense"]
    print(f"mask {args.mask_ratio} ({visible} of {total} tokens) / mask 0 ({total} of {total}): {ratio:.2f}")
    flops = {}
    if not args.no_flops:
        flops = {"masked": forward_flops(masked, x), "dense": forward_flops(dense, x)}
        print(f"forward GFLOPs, mask {args.mask_ratio} vs mask 0, in all and by part:")
        for key in ("forward", *PARTS, "conv part, no module"):
            f_masked, f_dense = flops["masked"][key], flops["dense"][key]
            print(f"  {key:<20} {f_masked:10.3f} {f_dense:10.3f}   ratio {f_masked / max(f_dense, 1e-9):.2f}")
    if args.json:
        from spark3d.provenance import write_result

        report = {"config": str(args.config), "input_size": list(masked.input_size),
                  "batch": args.batch, "mask_ratio": args.mask_ratio, "visible_tokens": visible, "tokens": total,
                  "compute": args.compute, "plans": plans, "warmup": args.warmup, "repeats": args.repeats,
                  "fresh_mask_every_step": True, "times_s": times, "median_s": medians,
                  "ratio_masked_to_dense": ratio, "forward_gflops": flops, "load_average_at_start": load_at_start}
        if args.masked_dense:
            report["ratio_masked_dense"] = medians["masked, masked-dense"] / medians["dense, masked-dense"]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_result(args.json, report, ["python", *sys.argv], started=started)
        print(f"wrote {args.json}")


def _plan(model: ConvMAE, mode: str | None) -> dict:
    """The model's compute plan for one of its random masks (``mode`` overriding its ``compute``)."""
    mask = model.random_mask(1)
    if mode is None:
        return model.compute_plan(mask)
    with model.computing(mode):
        return model.compute_plan(mask)


if __name__ == "__main__":
    main()

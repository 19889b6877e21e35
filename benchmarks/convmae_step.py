"""Time one ConvMAE training step (forward + backward) at mask ratio 0.75 against the same model at ratio 0.

The model is the one a pretraining config builds (default: configs/pretrain/ct_convmae.yaml, ConvMAE-B
in 3D at 96³). At ratio 0.75 a quarter of the tokens go through the transformer; at ratio 0 all of
them do (the conv stages compute masked-dense either way). The two steps alternate, after warm-up,
and the medians are compared, so a busy machine disturbs both alike. Also prints the parameter
counts of the 2D ``base`` preset (224 px, 3 channels), and the forward FLOPs of each model by part
(``torch.utils.flop_counter``; exact, unlike times on a shared machine).

    python benchmarks/convmae_step.py --batch 2 --repeats 5
    python benchmarks/convmae_step.py --config configs/pretrain/demo_convmae_ct.yaml --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch
import yaml

from spark3d import ConvMAE
from spark3d.backbones import BackboneSpec
from spark3d.masking import num_visible
from spark3d.methods import build_method

CONFIG = Path(__file__).parents[1] / "configs" / "pretrain" / "ct_convmae.yaml"


def model_of(config_path: Path, size: list[int] | None) -> ConvMAE:
    """The ConvMAE model a pretraining config describes (its data ``roi_size`` unless ``size`` is given)."""
    config = yaml.safe_load(config_path.read_text())
    args, data = config["model"]["init_args"], config["data"]["init_args"]
    spec = BackboneSpec(args["backbone"], args["source"], args["spatial_dims"], args["in_channels"],
                        dict(args.get("backbone_kwargs") or {}))
    return build_method(args["method"], spec, size or data["roi_size"], args["mask_ratio"], **(args.get("method_args") or {}))


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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = ConvMAE.from_preset("base", spatial_dims=2, in_channels=3, input_size=(224, 224))
    print(f"2D base preset (224 px, 3 channels): encoder {count(base.encoder) / 1e6:.2f} M parameters, "
          f"decoder {(count(base) - count(base.encoder)) / 1e6:.2f} M, total {count(base) / 1e6:.2f} M")
    del base

    masked = model_of(args.config, args.size)
    masked.mask_ratio = args.mask_ratio
    dense = copy.deepcopy(masked)
    dense.mask_ratio = 0.0  # every token through the transformer (same weights)
    x = torch.randn(args.batch, masked.encoder.in_channels, *masked.input_size, generator=torch.Generator().manual_seed(0))

    def step(model: ConvMAE) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(x).loss.backward()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step(masked), step(dense)
    times: dict[str, list[float]] = {"masked": [], "dense": []}
    for _ in range(args.repeats):
        times["masked"].append(step(masked))
        times["dense"].append(step(dense))
    t_masked, t_dense = statistics.median(times["masked"]), statistics.median(times["dense"])
    grid, total = masked.mask_grid, math.prod(masked.mask_grid)
    print(f"{args.config.name}: {type(masked).__name__} {masked.input_size}, widths {masked.encoder.widths}, "
          f"depths {masked.encoder.depths}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"mask {args.mask_ratio}: {num_visible(grid, args.mask_ratio)} of {total} tokens "
          f"through the transformer, median step {t_masked:.2f} s  (all: {', '.join(f'{t:.2f}' for t in times['masked'])})")
    print(f"mask 0   : {total} of {total} tokens "
          f"through the transformer, median step {t_dense:.2f} s  (all: {', '.join(f'{t:.2f}' for t in times['dense'])})")
    print(f"ratio masked / all tokens: {t_masked / t_dense:.2f}")
    f_masked, f_dense = forward_flops(masked, x), forward_flops(dense, x)
    print(f"forward GFLOPs, mask {args.mask_ratio} vs mask 0, in all and by part:")
    for key in ("forward", *PARTS):
        print(f"  {key:<16} {f_masked[key]:10.3f} {f_dense[key]:10.3f}   ratio {f_masked[key] / max(f_dense[key], 1e-9):.2f}")


if __name__ == "__main__":
    main()

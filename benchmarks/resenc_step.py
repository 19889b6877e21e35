"""SparK training-step time on nnU-Net's ResEnc-L against the default SegResNet config, same input, interleaved.

Each model is built as its shipped pretraining config describes it (``configs/pretrain/ct_resenc_l.yaml``,
``configs/pretrain/ct_segresnet.yaml``: backbone, widths, mask ratio, decoder width) at the input size
given here; one step is forward + backward of ``SparK(x, mask)`` with a fixed mask. The two models
alternate (order swapped every round) after a warm-up step each; medians and their ratio are printed.

    python benchmarks/resenc_step.py --size 96 --batch 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from spark3d import SparK
from spark3d.backbones import BackboneSpec
from spark3d.encoders import from_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def build(config: str, size: int) -> tuple[SparK, dict]:
    """SparK over the backbone of a shipped pretraining config, at a cubic input ``size``."""
    args = yaml.safe_load((CONFIGS / config).read_text())["model"]["init_args"]
    spec = BackboneSpec(args["backbone"], args.get("source", "monai"), args.get("spatial_dims", 3),
                        args.get("in_channels", 1), dict(args.get("backbone_kwargs") or {}))
    model = SparK(from_spec(spec), (size,) * 3, mask_ratio=args["mask_ratio"], decoder_width=args["decoder_width"])
    return model.train(), args


def timed_step(model: SparK, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Seconds of one forward + backward."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(x, mask=mask).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write every time (and the machine, versions, command) here")
    args = parser.parse_args()
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"resenc_l": build("ct_resenc_l.yaml", args.size), "segresnet": build("ct_segresnet.yaml", args.size)}
    x = torch.randn(args.batch, 1, *(args.size,) * 3)
    masks = {name: model.random_mask(args.batch, generator=torch.Generator().manual_seed(1))
             for name, (model, _) in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, (model, _) in models.items():
        timed_step(model, x, masks[name])  # warm-up
    order = list(models)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(timed_step(models[name][0], x, masks[name]))
    figures: dict = {"size": args.size, "batch": args.batch, "repeats": args.repeats, "models": {}}
    print(f"SparK step (forward + backward), input {args.size}³, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved repeats")
    for name, (model, cfg) in models.items():
        enc = model.encoder
        params = sum(p.numel() for n, p in enc.network.named_parameters() if n.rpartition(".")[0] in enc.participating)
        params /= 1e6
        print(f"  {name:<10} median {statistics.median(times[name]):7.2f} s  (all: "
              f"{', '.join(f'{t:.2f}' for t in times[name])})  encoder {params:.1f} M params, "
              f"mask ratio {cfg['mask_ratio']}, grid {model.mask_grid}")
        figures["models"][name] = {"times_s": times[name], "encoder_mparams": params, "mask_ratio": cfg["mask_ratio"],
                                   "mask_grid": list(model.mask_grid)}
    ratio = statistics.median(times["resenc_l"]) / statistics.median(times["segresnet"])
    print(f"  ratio resenc_l / segresnet: {ratio:.2f}")
    if args.json:
        from spark3d.provenance import write_result

        write_result(args.json, {**figures, "ratio": ratio}, ["python", "benchmarks/resenc_step.py", *sys.argv[1:]],
                     started)


if __name__ == "__main__":
    main()

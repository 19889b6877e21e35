"""Sliding-window inference time per volume on this machine (preprocess + sliding window + inversion).

    python benchmarks/inference_time.py --config configs/finetune/demo_ct.yaml \
        --datalist spark3d_demo/data/dataset.json --ckpt spark3d_demo/finetune/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import time

import torch

from spark3d.commands import SEG_LINKS
from spark3d.inference import load_checkpoint, predict_volume
from spark3d.train.cli import make_cli
from spark3d.train.segment import SegmentationModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--datalist", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()
    cli = make_cli(SegmentationModule, "inference_time", "", ["--config", args.config, "--data.init_args.datalist",
                   args.datalist], "runs/unused", links=SEG_LINKS)
    module, dm = cli.model, cli.datamodule
    dm.validate(need_validation=False)
    load_checkpoint(module, args.ckpt)
    files = dm.val_files if args.split == "validation" else dm.train_files
    predict_volume(module, dm, files[0]["image"])  # warm-up
    times = []
    for entry in files:
        t0 = time.perf_counter()
        label = predict_volume(module, dm, entry["image"])
        times.append(time.perf_counter() - t0)
        print(f"{entry['image']}: {times[-1]:.2f} s, output {label.shape}")
    hp = module.hparams
    print(f"mean {sum(times) / len(times):.2f} s per volume ({torch.get_num_threads()} threads; roi {tuple(hp.roi_size)}, "
          f"overlap {hp.sw_overlap}, {hp.sw_mode} blending)")


if __name__ == "__main__":
    main()

"""Sliding-window inference time per volume on this machine (preprocess + sliding window + inversion).

    python benchmarks/inference_time.py --config configs/finetune/demo_ct.yaml \
        --datalist spark3d_demo/data/dataset.json --ckpt spark3d_demo/finetune/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from spark3d.data import SegmentationData
from spark3d.inference import load_checkpoint, predict_volume
from spark3d.train import SegmentationModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--datalist", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    data_args = {**config["data"]["init_args"], "datalist": args.datalist}
    model_args = {**config["model"]["init_args"], "roi_size": data_args["roi_size"], "num_classes": data_args["num_classes"]}
    module, dm = SegmentationModule(**model_args), SegmentationData(**data_args)
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

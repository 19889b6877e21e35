"""Demo-config pretraining throughput on CPU: data loading vs training step, cached vs uncached data.

    python benchmarks/data_throughput.py [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

from spark3d.data import CTPretrainData, write_btcv_phantoms
from spark3d.train import SparKPretrain

CONFIG = Path(__file__).parents[1] / "configs" / "pretrain" / "demo_ct.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    config = yaml.safe_load(CONFIG.read_text())
    data_args = dict(config["data"]["init_args"])
    model_args = dict(config["model"]["init_args"])
    with tempfile.TemporaryDirectory() as tmp:
        data_args["datalist"] = str(write_btcv_phantoms(tmp, n_train=8, n_val=2, n_test=0, seed=0))
        module = SparKPretrain(**model_args, input_size=data_args["roi_size"])
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        for cache in ("ram", "none"):
            dm = CTPretrainData(**{**data_args, "cache": cache})
            t0 = time.perf_counter()
            dm.setup("fit")
            setup_s = time.perf_counter() - t0
            load_s = step_s = 0.0
            crops = 0
            while crops == 0 or step_s == 0.0 or crops < args.steps * dm.crops_per_batch:
                it = iter(dm.train_dataloader())
                while True:
                    t0 = time.perf_counter()
                    batch = next(it, None)
                    load_s += time.perf_counter() - t0
                    if batch is None or crops >= args.steps * dm.crops_per_batch:
                        break
                    t0 = time.perf_counter()
                    loss = module.model(batch["image"]).loss
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    step_s += time.perf_counter() - t0
                    crops += batch["image"].shape[0]
            total = load_s + step_s
            print(f"cache={cache:<4} setup {setup_s:5.2f} s | {crops} crops: data {load_s:6.2f} s "
                  f"({100 * load_s / total:4.1f}%), step {step_s:6.2f} s ({100 * step_s / total:4.1f}%) | "
                  f"{crops / total:5.2f} crops/s, {crops / total / data_args['num_samples']:5.2f} volumes/s")


if __name__ == "__main__":
    main()

"""Time one SparK training step (forward + backward) against the same encoder + decoder run densely.

    python benchmarks/step_time.py --backbone segresnet --size 96 --batch 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from spark3d import SparK
from spark3d.encoders import from_monai


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="segresnet")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = (args.size,) * 3
    model = SparK(from_monai(args.backbone, spatial_dims=3, in_channels=1), size, mask_ratio=args.mask_ratio)
    dense = copy.deepcopy(model)
    x = torch.randn(args.batch, 1, *size)

    def sparse_step():
        model.zero_grad(set_to_none=True)
        model(x).loss.backward()

    def dense_step():
        # the same encoder + densify projections + decoder with no mask context: plain dense compute
        dense.zero_grad(set_to_none=True)
        feats = dense.encoder(x)
        pred = dense.decoder([p(f) for f, p in zip(feats, dense.densify_projs)])
        (pred - x).pow(2).mean().backward()

    t_sparse = _time(sparse_step, args.repeats)
    t_dense = _time(dense_step, args.repeats)
    print(f"{args.backbone} {size} batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"SparK step (masked, ratio {args.mask_ratio}): {t_sparse:.2f} s")
    print(f"dense step (no mask):                 {t_dense:.2f} s")
    print(f"ratio sparse / dense:                 {t_sparse / t_dense:.2f}")


if __name__ == "__main__":
    main()

"""One process of the 2-process sparse SyncBatchNorm test (run by tests/test_ddp.py, gloo on CPU)."""

import sys

import torch
import torch.distributed as dist
from torch import nn

from spark3d.masking import random_mask
from spark3d.sparse import MaskContext, set_batchnorm_sync, sparsify


def rank_data(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, 4, 8, 8, 8, generator=gen) * (1 + rank) + rank
    mask = random_mask(2, (4, 4, 4), 0.5, generator=gen)
    return x, mask


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    layer = nn.BatchNorm3d(4).train()
    ctx = MaskContext()
    sparsify(layer, ctx)
    assert set_batchnorm_sync(layer) == 1
    x, mask = rank_data(rank)
    x.requires_grad_(True)
    with ctx.use(mask):
        y = layer(x)
    (y * (rank + 1)).sum().backward()
    torch.save({"y": y.detach(), "running_mean": layer.running_mean, "running_var": layer.running_var,
                "x_grad": x.grad, "type": type(layer).__name__}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

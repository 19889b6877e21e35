"""Cross-process statistics for sparse BatchNorm under DDP, on any device (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SYNC_FLAG", "needs_cross_process_sync", "synced_batch_norm"]

SYNC_FLAG = "_sync_stats"  # attribute set on a converted BatchNorm whose statistics are summed over processes


def _process_group(layer: nn.Module):
    return getattr(layer, "process_group", None) or torch.distributed.group.WORLD


def needs_cross_process_sync(layer: nn.Module) -> bool:
    """Batch statistics must be summed over processes: a SyncBatchNorm, or a BatchNorm marked for sync."""
    return (
        (isinstance(layer, nn.SyncBatchNorm) or getattr(layer, SYNC_FLAG, False))
        and layer.training
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size(_process_group(layer)) > 1
    )


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the gradients over processes too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def synced_batch_norm(layer: nn.modules.batchnorm._BatchNorm, packed: torch.Tensor) -> torch.Tensor:
    """Batch norm of packed visible sites with statistics summed over all processes (any device, gloo too).

    torch's own SyncBatchNorm runs on GPUs only; this keeps the same semantics: the mean and biased
    variance over every visible site of every process normalise, the unbiased variance updates the
    running statistics, and gradients flow through the all-reduce.
    """
    c = packed.shape[1]
    v_cn = packed.transpose(0, 1).reshape(c, -1).float()
    count = torch.full((1,), float(v_cn.shape[1]), device=v_cn.device)
    stats = torch.cat([v_cn.sum(1), v_cn.pow(2).sum(1), count])
    stats = _AllReduceSum.apply(stats, _process_group(layer))
    n = stats[-1]
    mean = stats[:c] / n
    var = (stats[c : 2 * c] / n - mean.pow(2)).clamp_min(0.0)
    if layer.track_running_stats:
        with torch.no_grad():
            layer.num_batches_tracked.add_(1)
            momentum = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
            layer.running_mean.mul_(1 - momentum).add_(momentum * mean.detach().to(layer.running_mean.dtype))
            unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
            layer.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(layer.running_var.dtype))
    shape = (1, c) + (1,) * (packed.ndim - 2)
    y = (packed - mean.view(shape).to(packed.dtype)) / (var.view(shape) + layer.eps).sqrt().to(packed.dtype)
    if layer.affine:
        y = y * layer.weight.view(shape) + layer.bias.view(shape)
    for extra in ("drop", "act"):  # timm's SyncBatchNormAct: BN, then dropout and activation
        fn = getattr(layer, extra, None)
        if isinstance(fn, nn.Module):
            y = fn(y)
    return y

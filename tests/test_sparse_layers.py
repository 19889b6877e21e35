"""Each sparse layer against an independent reference that gathers the visible sites explicitly."""

import pytest
import timm.layers
import torch
from torch import nn

from spark3d.masking import random_mask, upsample_mask
from spark3d.sparse import MaskContext, UnsafeLayerError, desparsify, sparsify

from conftest import rel


def _setup(shape, grid, ratio=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * 3 + 1
    mask = random_mask(shape[0], grid, ratio, generator=gen)
    return x, mask, upsample_mask(mask, shape[2:])


def _convert(layer):
    ctx = MaskContext()
    sparsify(layer, ctx)
    return ctx


@pytest.mark.parametrize("affine,track", [(True, False), (False, True), (True, True)])
def test_instance_norm_visible_stats_per_sample(affine, track):
    x, mask, vis = _setup((3, 4, 8, 8, 4), (4, 4, 2))
    layer = nn.InstanceNorm3d(4, affine=affine, track_running_stats=track).train()
    if affine:
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
    ctx = _convert(layer)
    with ctx.use(mask):
        y = layer(x)
    for b in range(3):
        v = x[b][:, vis[b, 0]]  # (C, K): explicit gather of sample b's visible sites
        ref = (v - v.mean(1, keepdim=True)) / (v.var(1, unbiased=False, keepdim=True) + layer.eps).sqrt()
        if affine:
            ref = ref * layer.weight[:, None] + layer.bias[:, None]
        assert rel(y[b][:, vis[b, 0]], ref) < 1e-5
        assert torch.all(y[b][:, ~vis[b, 0]] == 0)
    if track:
        ref_mean = torch.stack([x[b][:, vis[b, 0]].mean(1) for b in range(3)]).mean(0) * layer.momentum
        assert rel(layer.running_mean, ref_mean) < 1e-5


def test_group_norm_visible_stats_per_sample():
    x, mask, vis = _setup((3, 6, 8, 12), (4, 4))
    layer = nn.GroupNorm(3, 6)
    nn.init.normal_(layer.weight)
    ctx = _convert(layer)
    with ctx.use(mask):
        y = layer(x)
    for b in range(3):
        v = x[b][:, vis[b, 0]]  # (C, K)
        for g in range(3):
            vg = v[2 * g : 2 * g + 2]
            ref = (vg - vg.mean()) / (vg.var(unbiased=False) + layer.eps).sqrt()
            ref = ref * layer.weight[2 * g : 2 * g + 2, None] + layer.bias[2 * g : 2 * g + 2, None]
            assert rel(y[b][2 * g : 2 * g + 2][:, vis[b, 0]], ref) < 1e-5
    assert torch.all(y.masked_select(~vis.expand_as(y)) == 0)


@pytest.mark.parametrize("cls,shape,grid", [
    (nn.BatchNorm1d, (3, 5, 16), (4,)),
    (nn.BatchNorm2d, (3, 5, 8, 8), (4, 4)),
    (nn.BatchNorm3d, (3, 5, 4, 8, 8), (2, 4, 4)),
])
def test_batch_norm_visible_stats_over_batch(cls, shape, grid):
    x, mask, vis = _setup(shape, grid)
    layer = cls(5).train()
    ctx = _convert(layer)
    with ctx.use(mask):
        y = layer(x)
    v = x.movedim(1, -1)[vis[:, 0]]  # (N_visible_total, C)
    mean, var = v.mean(0), v.var(0, unbiased=False)
    ref = (v - mean) / (var + layer.eps).sqrt()
    assert rel(y.movedim(1, -1)[vis[:, 0]], ref) < 1e-5
    assert torch.all(y.movedim(1, -1)[~vis[:, 0]] == 0)
    assert rel(layer.running_mean, 0.1 * mean) < 1e-5
    assert rel(layer.running_var, 0.9 + 0.1 * v.var(0, unbiased=True)) < 1e-5
    # eval mode uses the running statistics, still zero at masked sites
    layer.eval()
    with ctx.use(mask):
        y = layer(x)
    ref = (x - layer.running_mean.view(1, -1, *[1] * len(grid))) / (layer.running_var.view(1, -1, *[1] * len(grid)) + layer.eps).sqrt()
    assert rel(y * vis, ref * vis) < 1e-5 and torch.all(y.masked_select(~vis.expand_as(y)) == 0)


def test_timm_batchnorm_act_keeps_activation_and_class():
    x, mask, vis = _setup((2, 4, 8, 8), (2, 2))
    layer = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU).train()
    keys = list(layer.state_dict())
    ctx = _convert(layer)
    assert isinstance(layer, timm.layers.BatchNormAct2d) and list(layer.state_dict()) == keys
    with ctx.use(mask):
        y = layer(x)
    v = x.movedim(1, -1)[vis[:, 0]]
    ref = torch.relu((v - v.mean(0)) / (v.var(0, unbiased=False) + layer.eps).sqrt())
    assert rel(y.movedim(1, -1)[vis[:, 0]], ref) < 1e-5
    assert (y >= 0).all()


def test_layer_norms_channels_last_and_first():
    x, mask, vis = _setup((2, 6, 8, 8), (4, 4))
    cf = timm.layers.LayerNorm2d(6)
    cl = nn.LayerNorm(6)
    for layer in (cf, cl):
        nn.init.normal_(layer.bias)
    ctx_f, ctx_l = _convert(cf), _convert(cl)
    with ctx_f.use(mask):
        y_f = cf(x)
    with ctx_l.use(mask):
        y_l = cl(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    ref = nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), cf.weight, cf.bias).permute(0, 3, 1, 2)
    assert rel(y_f * vis, ref * vis) < 1e-5 and torch.all(y_f.masked_select(~vis.expand_as(y_f)) == 0)
    assert torch.all(y_l.masked_select(~vis.expand_as(y_l)) == 0)


def test_conv_reads_and_writes_visible_sites_only():
    x, mask, vis = _setup((2, 3, 16, 16), (4, 4))
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    dense = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    dense.load_state_dict(conv.state_dict())
    ctx = _convert(conv)
    with ctx.use(mask):
        y = conv(x)
    vis_out = upsample_mask(mask, y.shape[2:])
    ref = dense(x * vis) * vis_out
    assert rel(y, ref) < 1e-6


def test_padding_same_and_weight_standardised_convs_are_covered():
    x, mask, vis = _setup((2, 3, 16, 16), (4, 4))
    for conv in (timm.layers.Conv2dSame(3, 4, 3, stride=2), timm.layers.StdConv2d(3, 4, 3, padding=1, groups=1),
                 nn.Conv2d(4 - 1, 3, 3, padding=2, dilation=2, groups=3)):
        ctx = _convert(conv)
        with ctx.use(mask):
            y = conv(x)
            y2 = conv(x + 50 * torch.randn_like(x) * (~vis))
        assert torch.equal(y, y2)
        assert torch.all(y.masked_select(~upsample_mask(mask, y.shape[2:]).expand_as(y)) == 0)


def test_pools_use_visible_sites_only():
    x, mask, vis = _setup((2, 3, 8, 8), (4, 4))
    x = x - 30  # all negative: a max pool that saw masked zeros would return 0
    mp, ap, gap = nn.MaxPool2d(2), nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), nn.AdaptiveAvgPool2d(1)
    ctxs = [_convert(m) for m in (mp, ap, gap)]
    with ctxs[0].use(mask):
        y = mp(x)
    vis_out = upsample_mask(mask, (4, 4))
    # each 2x2 window lies inside one mask cell: visible outputs are the dense max of visible inputs
    assert torch.equal(y, torch.where(vis_out, nn.functional.max_pool2d(x, 2), 0.0))
    assert (y.masked_select(vis_out.expand_as(y)) < 0).all()
    with ctxs[1].use(mask):
        y = ap(x)
    w = vis.float()
    window_sum = lambda t: nn.functional.avg_pool2d(t, 3, 1, 1, count_include_pad=True) * 9  # noqa: E731
    ref = window_sum(x * w) / window_sum(w).clamp_min(1e-12)  # mean over the visible sites of each window
    assert rel(y * vis, ref * vis) < 1e-5
    with ctxs[2].use(mask):
        y = gap(x)
    ref = torch.stack([x[b][:, vis[b, 0]].mean(1) for b in range(2)])
    assert rel(y.flatten(1), ref) < 1e-5


def test_conversion_keeps_class_lineage_and_state_dict_and_reverts():
    net = timm.create_model("resnet18")
    keys = {k: v.shape for k, v in net.state_dict().items()}
    dense_types = {n: type(m) for n, m in net.named_modules()}
    sparsify(net, MaskContext(), only=[n for n, _ in net.named_modules() if not n.startswith(("fc", "global_pool"))])
    assert {k: v.shape for k, v in net.state_dict().items()} == keys
    for n, m in net.named_modules():
        assert isinstance(m, dense_types[n])
    assert type(net.bn1).__name__ == "SparseBatchNorm2d"
    desparsify(net)
    assert {n: type(m) for n, m in net.named_modules()} == dense_types


class TokenMixer(nn.Module):
    """A custom attention over spatial positions (mixes every position)."""

    def __init__(self, c):
        super().__init__()
        self.qkv = nn.Conv2d(c, 3 * c, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        return (v @ attn.transpose(1, 2)).view_as(x)


def test_refuses_position_mixing_layers_with_their_names():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.ReLU(), TokenMixer(8)), nn.Upsample(scale_factor=2))
    with pytest.raises(UnsafeLayerError) as err:
        sparsify(net, MaskContext())
    text = str(err.value)
    assert "1.1" in text and "TokenMixer" in text
    assert "2" in text and "Upsample" in text
    # nothing was changed before refusing
    assert type(net[0]) is nn.Conv2d
    # with the block explicitly trusted only the upsampling remains
    with pytest.raises(UnsafeLayerError, match="Upsample") as err:
        sparsify(net, MaskContext(), trusted=[TokenMixer])
    assert "TokenMixer" not in str(err.value)


def test_refuses_mednext_global_response_norm():
    from monai.networks.nets import MedNeXt

    net = MedNeXt(spatial_dims=3, in_channels=1, out_channels=2, init_filters=4, global_resp_norm=True)
    with pytest.raises(UnsafeLayerError, match="global response"):
        sparsify(net, MaskContext())

"""The sparse path is exact by construction: per-sample random draws, SE pooling, AvgPool and own-forward convs
packed, on weights that cannot hide a difference; what it cannot do it says (plan, refusals, one line)."""

import copy

import pytest
import timm.layers
import torch
from torch import nn

from spark3d import SparK
from spark3d.check import build_encoder
from spark3d.encoders import HierarchicalEncoder
from spark3d.errors import ConfigError
from spark3d.masking import random_mask, upsample_mask
from spark3d.sparse import MaskContext, UnsafeLayerError, sparsify
from spark3d.sparse.compute import packed_flow
from spark3d.sparse.verify import perturbed_copy

from conftest import rel


def _twins(name, size, kwargs=None, mask_ratio=0.5):
    """A float64 SparK on perturbed weights (compute='sparse') and its masked-dense copy, input and mask."""
    torch.manual_seed(0)
    model = SparK(build_encoder(name, backbone_kwargs=kwargs), (size, size), mask_ratio=mask_ratio, decoder_width=16,
                  decoder="efficient", compute="sparse")
    model, _ = perturbed_copy(model, model.ctx)
    dense = copy.deepcopy(model)
    dense.compute = "masked-dense"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
    return model, dense, x, model.random_mask(2, generator=gen)


def _features_and_grads(model, x, mask, training):
    model.train(training)
    torch.manual_seed(7)  # the same seed for both paths: the same stochastic-depth / dropout decisions
    xi = x.clone().requires_grad_()
    feats = model.encode(xi, mask)
    gen = torch.Generator().manual_seed(3)
    loss = sum((f * torch.randn(f.shape, generator=gen, dtype=f.dtype)).sum() for f in feats)
    params = [p for p in model.encoder.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [xi, *params], allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip([xi, *params], grads)])
    return feats, flat


@pytest.mark.parametrize("name,kwargs", [
    ("timm/resnet18", {"drop_path_rate": 0.3}),  # timm DropPath inside residual blocks
    ("mobilenetv3_small_050", {"drop_path_rate": 0.2}),  # squeeze-excitation (x.mean), hard-swish, depthwise
    ("regnety_002", {}),  # SE in every block, group convs
    ("efficientnet_b0", {"drop_path_rate": 0.2}),  # SE (conv_reduce / conv_expand), depthwise, drop path
    ("convnext_atto", {"drop_path_rate": 0.2}),  # layer scale, 7x7 depthwise, LayerNorm, drop path
])
def test_sparse_equals_masked_dense_on_perturbed_weights(name, kwargs):
    """Float64, perturbed weights (no zero branch can hide a difference), train and eval, features and gradients;
    the sparse path ran, and no layer of its plan runs dense."""
    sparse, dense, x, mask = _twins(name, 64, kwargs)
    state = copy.deepcopy(sparse.state_dict())
    for training in (True, False):
        f_s, g_s = _features_and_grads(sparse, x, mask, training)
        assert sparse.last_path == "sparse"
        f_d, g_d = _features_and_grads(dense, x, mask, training)
        assert dense.last_path == "masked-dense"
        assert max(rel(s, d) for s, d in zip(f_s, f_d)) < 1e-8, training
        assert rel(g_s, g_d) < 1e-8, training
        sparse.load_state_dict(state)
        dense.load_state_dict(state)
    plan = sparse.compute_plan(mask)
    assert plan and not [e for e in plan if e.strategy == "dense"]
    assert sparse.compute_decision.startswith("sparse")


def test_drop_path_draws_per_sample_in_packed_mode():
    """With a drop path between cells, the packed flow drops whole samples exactly as masked-dense does."""
    ctx = MaskContext()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), timm.layers.DropPath(0.5), nn.Dropout(0.3), nn.Dropout2d(0.3))
    sparsify(net, ctx)
    net.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 16, 16, generator=gen, dtype=torch.float64)
    net.double()
    mask = random_mask(6, (4, 4), 0.5, generator=gen)
    with ctx.use(mask):
        torch.manual_seed(5)
        ref = net(x * upsample_mask(mask, x.shape[2:]))
        torch.manual_seed(5)
        with packed_flow(ctx) as layout:
            got = layout.unpack(net(layout.pack(x)))
    assert rel(got, ref * upsample_mask(mask, x.shape[2:])) < 1e-12
    dropped = (ref.flatten(1).abs().sum(1) == 0)
    assert 0 < int(dropped.sum()) < 6  # the seed drops some samples, not all: the comparison means something


LAYERS = [
    nn.AvgPool2d(2, 2),
    nn.AvgPool2d(3, 1, padding=1),
    nn.AvgPool2d(3, 1, padding=1, count_include_pad=False),
    nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),  # timm ResNet-D's downsample
    timm.layers.Conv2dSame(3, 5, 3, stride=2),
    timm.layers.StdConv2d(3, 5, 3, padding=1),
    timm.layers.StdConv2dSame(3, 5, 5, stride=1),
]


@pytest.mark.parametrize("case", range(len(LAYERS)))
def test_pools_and_own_forward_convs_run_packed_and_exact(case):
    layer = copy.deepcopy(LAYERS[case]).double()
    ctx = MaskContext()
    sparsify(layer, ctx)
    gen = torch.Generator().manual_seed(case)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    mask = random_mask(2, (4, 4), 0.5, generator=gen)
    params = list(layer.parameters())
    with ctx.use(mask):
        ref = layer(x.requires_grad_())
        g_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64) * upsample_mask(mask, ref.shape[2:])
        ref_grads = torch.autograd.grad(ref, [x, *params], g_out)
        with packed_flow(ctx) as layout:
            layout.plan = {}
            xp = layout.pack(x.detach()).requires_grad_()
            y = layout.unpack(layer(xp))
            grads = torch.autograd.grad(y, [xp, *params], g_out)
    assert [s for _, s, _ in layout.plan.values()] != ["dense"], layout.plan
    vis = upsample_mask(mask, ref.shape[2:])
    assert rel(y, ref * vis) < 1e-10
    assert rel(layout.unpack(grads[0]), ref_grads[0] * upsample_mask(mask, x.shape[2:])) < 1e-10
    for g, r in zip(grads[1:], ref_grads[1:]):
        assert rel(g, r) < 1e-10


class ScriptedRoll(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return _roll(self.conv(x))


@torch.jit.script
def _roll(x: torch.Tensor) -> torch.Tensor:
    return torch.roll(x, 1, 2)


class VmappedRoll(ScriptedRoll):
    def forward(self, x):
        return torch.vmap(lambda t: torch.roll(t, 1, 1))(self.conv(x))


@pytest.mark.parametrize("block", [ScriptedRoll, VmappedRoll])
def test_blocks_the_probe_cannot_see_into_are_refused(block):
    net = nn.Sequential(block(), nn.Conv2d(8, 8, 3, 2, 1))
    with pytest.raises(UnsafeLayerError, match=r"^.*\n  - 0 \(.*" + block.__name__ + r"\).*cannot record") as err:
        SparK(HierarchicalEncoder(net, ["0", "1"], 2, 3), (32, 32), mask_ratio=0.75, decoder_width=16)
    assert err.value.refusals[0].path == "0"
    # vouched for: converts
    SparK(HierarchicalEncoder(copy.deepcopy(net), ["0", "1"], 2, 3), (32, 32), mask_ratio=0.75, decoder_width=16,
          trusted=[block])


def test_a_layer_that_would_run_dense_makes_sparse_refuse_and_auto_say_why(capsys):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                        nn.Conv2d(8, 8, 3, 2, 1))
    make = lambda compute: SparK(HierarchicalEncoder(copy.deepcopy(net), ["0", "2"], 2, 3), (32, 32),  # noqa: E731
                                 mask_ratio=0.75, decoder_width=16, compute=compute)
    x = torch.randn(2, 3, 32, 32)
    mask = make("auto").random_mask(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"compute='sparse' refused: 1 \(SparseConv2d\) would run dense: "
                                          r"padding_mode='reflect'"):
        make("sparse")(x, mask=mask)
    auto = make("auto")
    auto(x, mask=mask)
    auto(x, mask=mask)
    assert auto.last_path == "masked-dense"
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spark3d: compute=auto")]
    assert said == ["spark3d: compute=auto: masked-dense: 1 (SparseConv2d) would run dense: padding_mode='reflect' "
                    "(only zero padding is packed)"]
    assert [e.strategy for e in auto.compute_plan(mask)] == ["sites", "dense", "sites"]


def test_the_check_is_weight_independent_and_redone_when_the_structure_changes():
    """A zero-initialised branch cannot hide a per-cell draw: the check runs on redrawn weights; after a layer swap
    the verdict is made again."""
    sparse, _, _, mask = _twins("timm/resnet18", 64, {"drop_path_rate": 0.3})
    report = sparse.sparse_check(mask)
    assert report.exact() and report.gradients > 0  # gradients were compared
    sparse.encoder.network.layer1[0].drop_path = nn.Identity()
    assert sparse.sparse_check(mask) is not report


def test_a_data_parallel_replica_is_refused_in_one_line():
    """nn.DataParallel's replicas (marked ``_is_replica`` by torch's replicate, as on several GPUs) would share one
    mask context: the forward refuses them and names DDP; the model itself still runs."""
    model, _, x, mask = _twins("timm/resnet18", 32)
    replica = copy.copy(model)
    replica._is_replica = True  # what torch.nn.parallel.replicate sets on every copy it makes
    with pytest.raises(ConfigError, match=r"^nn\.DataParallel over a SparK model is not supported .* use DDP"):
        replica(x, mask=mask)
    assert torch.isfinite(model(x, mask=mask).loss)

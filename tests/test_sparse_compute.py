"""The sparse-compute path equals masked-dense (features, predictions, gradients, statistics), keeps masked
content out, and does work that follows the visible fraction."""

import copy

import pytest
import torch
from torch import nn

from spark3d import SparK
from spark3d.backbones import examples
from spark3d.check import relative_difference
from spark3d.encoders import HierarchicalEncoder, from_spec
from spark3d.masking import random_mask, upsample_mask
from spark3d.sparse import MaskContext, sparsify
from spark3d.sparse.compute import PackedLayout, packed_flow

from conftest import rel

EXAMPLES = {ex.id: (ex, spec) for ex, spec in examples()}
REQUIRED = {"timm-resnet18", "timm-convnext_atto", "monai-resnet18-3d", "monai-segresnet-3d", "monai-dynunet-3d",
            "monai-mednext-3d"}


def _pair(key, dtype=torch.float32, mask_ratio=0.6):
    ex, spec = EXAMPLES[key]
    torch.manual_seed(0)
    dense = SparK(from_spec(spec, probe_size=ex.input_size), ex.input_size, mask_ratio=mask_ratio, decoder_width=32,
                  decoder="efficient", compute="masked-dense").to(dtype)
    sparse = copy.deepcopy(dense)
    sparse.compute = "sparse"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, spec.in_channels, *ex.input_size, generator=gen).to(dtype)
    mask = dense.random_mask(2, generator=gen)
    return dense, sparse, x, mask


def test_examples_cover_the_required_backbones():
    assert REQUIRED <= set(EXAMPLES)
    ex, _ = EXAMPLES["monai-dynunet-3d"]
    assert any(isinstance(s, (list, tuple)) and len(set(s)) > 1 for s in ex.kwargs["strides"])  # anisotropic


def _grads(model):
    return [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]


def _gradients_agree(dense, sparse, x, mask, training, grad_rel, grad_floor) -> str | None:
    """Backward both models' losses; None when the whole gradient agrees to 1e-4 and every parameter's to
    ``grad_rel`` (or below ``grad_floor`` of the whole gradient's norm), else what differs."""
    for model in (dense, sparse):
        model.train(training)
        model.zero_grad()
        model(x, mask=mask).loss.backward()
    g_d, g_s = _grads(dense), _grads(sparse)
    assert [n for n, _ in g_d] == [n for n, _ in g_s]
    total = torch.cat([g.flatten() for _, g in g_d]).norm()
    whole = rel(torch.cat([g.flatten() for _, g in g_s]), torch.cat([g.flatten() for _, g in g_d]))
    if whole >= 1e-4:
        return f"the whole gradient by {whole:.1e}"
    for (n, gd), (_, gs) in zip(g_d, g_s):
        err = (gs - gd).double().norm()
        if not (err < grad_rel * gd.double().norm() or err < grad_floor * total):
            return f"the gradient of {n} by {err / gd.double().norm():.1e}"
    return None


def _check_equal_and_leak_free(key, dtype, grad_rel, grad_floor):
    """Predictions, features, gradients and running statistics of the sparse path equal masked-dense's in train
    and eval mode; replacing the masked content by noise changes nothing."""
    dense, sparse, x, mask = _pair(key, dtype)
    vis = upsample_mask(mask, x.shape[2:])
    noisy = torch.where(vis, x, torch.randn_like(x) * 100)
    for training in (True, False):
        states = [copy.deepcopy(m.state_dict()) for m in (dense, sparse)]  # train-mode passes update statistics
        dense.train(training)
        sparse.train(training)
        with torch.no_grad():
            out_d, out_s = dense(x, mask=mask), sparse(x, mask=mask)
            assert sparse.compute_path(mask) == "sparse"
            assert rel(out_s.pred, out_d.pred) < 1e-4 and rel(out_s.loss, out_d.loss) < 1e-4
            for (n, bd), (_, bs) in zip(dense.named_buffers(), sparse.named_buffers()):  # BN / IN running statistics
                assert (rel(bs, bd) < 1e-4) if bd.is_floating_point() else torch.equal(bs, bd), n
            feats_d, feats_s = dense.encode(x, mask), sparse.encode(x, mask)
            assert max(rel(s, d) for s, d in zip(feats_s, feats_d)) < 1e-4
            for f in feats_s:  # masked sites of every level are exactly zero
                assert torch.all(f.masked_select(~upsample_mask(mask, f.shape[2:]).expand_as(f)) == 0)
            sparse.load_state_dict(states[1])
            leaked = sparse(noisy, mask=mask).pred
            assert relative_difference(leaked, out_s.pred) < 1e-6, "masked content reaches the prediction"
        for m, state in zip((dense, sparse), states):
            m.load_state_dict(state)
        differs = _gradients_agree(dense, sparse, x, mask, training, grad_rel, grad_floor)
        if differs and dtype == torch.float32:
            # float32 round-off, or a real difference? The same configuration in float64 decides.
            d64, s64, x64, mask64 = _pair(key, torch.float64)
            differs = _gradients_agree(d64, s64, x64, mask64, training, 1e-8, 1e-12)
            assert differs is None, f"in float64 too, the sparse path differs in {differs} (train={training})"
        assert differs is None, f"the sparse path differs in {differs} (train={training})"
        for m, state in zip((dense, sparse), states):
            m.load_state_dict(state)


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_sparse_path_equals_masked_dense_and_keeps_masked_content_out(key):
    """Float32, what training runs: the whole gradient within 1e-4 (where float32 round-off exceeds that, e.g. a
    3D ResNet whose deepest BatchNorm sees 6 sites in train mode, the float64 gradients agree to 1e-8); single
    parameters within 1e-3, or 1e-5 of the whole gradient's norm, as round-off allows for sums over every site
    that (nearly) cancel — a conv bias right before a norm has a zero gradient."""
    _check_equal_and_leak_free(key, torch.float32, grad_rel=1e-3, grad_floor=1e-5)


@pytest.mark.parametrize("key", ["monai-segresnet-3d", "monai-dynunet-3d"])
def test_sparse_path_gradients_equal_in_float64(key):
    """In float64 every parameter's gradient agrees to 1e-8 relative (floor 1e-12 of the total norm)."""
    _check_equal_and_leak_free(key, torch.float64, grad_rel=1e-8, grad_floor=1e-12)


CONVS = [  # (spatial dims, conv, cell size per axis in the grid): halo shapes the networks meet, and harder ones
    (3, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), (4, 4, 4)),
    (3, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), (4, 4, 2)),
    (3, dict(in_channels=3, out_channels=4, kernel_size=(3, 3, 1), padding=(1, 1, 0)), (4, 2, 2)),
    (3, dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False), (2, 2, 2)),
    (3, dict(in_channels=3, out_channels=4, kernel_size=7, stride=2, padding=3), (4, 4, 4)),
    (2, dict(in_channels=3, out_channels=5, kernel_size=7, padding=3), (2, 2)),  # halo beyond the next cell
    (2, dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, dilation=2), (4, 4)),
    (2, dict(in_channels=3, out_channels=5, kernel_size=2, stride=2), (4, 4)),
    (2, dict(in_channels=3, out_channels=5, kernel_size=1, stride=2), (2, 2)),
    (2, dict(in_channels=3, out_channels=5, kernel_size=3, padding="same"), (1, 1)),
    (1, dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (4,)),
]


@pytest.mark.parametrize("strategy", ["blocks", "sites", "dense", "auto"])
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_each_conv_strategy_equals_masked_dense_with_gradients(case, strategy):
    sd, kwargs, cell = CONVS[case]
    grid = (3,) * sd if sd > 1 else (5,)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[sd](**kwargs).double()
    ctx = MaskContext()
    sparsify(conv, ctx)
    gen = torch.Generator().manual_seed(case)
    x = torch.randn(2, kwargs["in_channels"], *[g * c for g, c in zip(grid, cell)], generator=gen, dtype=torch.float64)
    mask = random_mask(2, grid, 0.5, generator=gen)
    g_out = None
    with ctx.use(mask):
        y_ref = conv(x.requires_grad_())
        g_out = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
        grads_ref = torch.autograd.grad(y_ref, [x, conv.weight], g_out)
        with packed_flow(ctx, strategy) as layout:
            xp = layout.pack(x.detach()).requires_grad_()
            yp = conv(xp)
            assert layout.holds(yp)
            y = layout.unpack(yp)
            grads = torch.autograd.grad(y, [xp, conv.weight], g_out)
    assert rel(y, y_ref) < 1e-10
    assert rel(grads[1], grads_ref[1]) < 1e-10
    assert rel(layout.unpack(grads[0]), grads_ref[0] * upsample_mask(mask, x.shape[2:])) < 1e-10


def test_max_pool_and_global_pool_on_packed_cells():
    ctx = MaskContext()
    pool, gap = nn.MaxPool2d(3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1)
    for m in (pool, gap):
        sparsify(m, ctx)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen) - 5  # all negative: masked zeros must never win
    mask = random_mask(2, (4, 4), 0.5, generator=gen)
    with ctx.use(mask):
        ref_max, ref_mean = pool(x), gap(x)
        with packed_flow(ctx) as layout:
            got_max, got_mean = layout.unpack(pool(layout.pack(x))), gap(layout.pack(x))
    assert rel(got_max, ref_max) < 1e-6
    # the global pool gives each sample's visible mean, repeated for each of the sample's cells
    assert got_mean.shape == (layout.n, 3, 1, 1)
    assert rel(got_mean.view(2, layout.visible, 3), ref_mean.view(2, 1, 3).expand(2, layout.visible, 3)) < 1e-6


def test_layout_round_trips_and_orders_cells_like_the_context():
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(3, (2, 3, 4), 0.6, generator=gen)
    ctx = MaskContext()
    ctx.set(mask)
    layout = PackedLayout(mask, ctx.visible_cells)
    x = torch.randn(3, 5, 4, 9, 8, generator=gen)
    packed = layout.pack(x)
    assert packed.shape == (3 * ctx.visible_cells, 5, 2, 3, 2)
    assert torch.equal(layout.unpack(packed), x * upsample_mask(mask, x.shape[2:]))
    assert torch.equal(layout.from_per_sample(layout.per_sample(packed), packed.shape[2:]), packed)
    # packed cells are the visible cells of each sample in raster order (what the context's index gives)
    flat = ctx.visible_index(mask.shape[2:])[:, 0]
    assert torch.equal(layout.coords_n[:, 0] * 12 + layout.coords_n[:, 1] * 4 + layout.coords_n[:, 2], flat.flatten())


class GlobalContextBlock(nn.Module):
    """Adds each sample's spatial sum (a functional ``sum``: refused, so only ``trusted=`` converts it; a global
    mean would be made exact on both paths) — not a covered layer."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + y.sum((2, 3), keepdim=True) / 64


def test_forward_that_mixes_cells_falls_back_or_refuses():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), GlobalContextBlock(8), nn.Conv2d(8, 8, 3, 2, 1))
    make = lambda compute: SparK(HierarchicalEncoder(copy.deepcopy(net), ["0", "2"], 2, 3), (32, 32), mask_ratio=0.75,  # noqa: E731
                                 decoder_width=16, trusted=[GlobalContextBlock], compute=compute)
    auto = make("auto")
    mask = auto.random_mask(2, generator=torch.Generator().manual_seed(0))
    assert auto.compute_path(mask) == "masked-dense"  # the one-time check saw the difference
    with pytest.raises(ValueError, match="not exact"):
        make("sparse")(torch.randn(2, 3, 32, 32), mask=mask)


def test_auto_uses_the_sparse_path_only_when_few_cells_are_visible():
    _, sparse, x, mask = _pair("monai-segresnet-3d", mask_ratio=0.75)
    sparse.compute = "auto"
    assert sparse.compute_path(mask) == "sparse"
    assert sparse.compute_path(sparse.full_mask(2)) == "masked-dense"
    sparse.compute = "masked-dense"
    assert sparse.compute_path(mask) == "masked-dense"


def test_encoder_work_follows_the_visible_fraction():
    """Counted, not timed: the sparse encoder's FLOPs are about the visible fraction of masked-dense's."""
    from torch.utils.flop_counter import FlopCounterMode

    dense, sparse, x, mask = _pair("monai-segresnet-3d", mask_ratio=0.75)
    assert sparse.compute_path(mask) == "sparse"  # (runs the one-time check outside the count)
    counts = []
    for model in (dense, sparse):
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model.encode(x, mask)
        counts.append(flops.get_total_flops())
    visible = mask[0].float().mean().item()
    assert counts[1] < (visible + 0.1) * counts[0], (counts, visible)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sparse_path_equals_masked_dense_on_cuda():
    dense, sparse, x, mask = _pair("monai-segresnet-3d")
    dense, sparse, x, mask = dense.cuda(), sparse.cuda(), x.cuda(), mask.cuda()
    out_d, out_s = dense(x, mask=mask), sparse(x, mask=mask)
    out_d.loss.backward()
    out_s.loss.backward()
    assert rel(out_s.pred, out_d.pred) < 1e-4
    g_d = torch.cat([p.grad.flatten() for p in dense.parameters() if p.grad is not None])
    g_s = torch.cat([p.grad.flatten() for p in sparse.parameters() if p.grad is not None])
    assert rel(g_s, g_d) < 1e-4

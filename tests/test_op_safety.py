"""Safety from what runs: user blocks convert with no `trusted=`, position mixers are refused by path and op,
and functional global pooling (squeeze-excitation) becomes the visible-site statistic under a mask."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spark3d import SparK
from spark3d.check import dense_difference, leak_difference
from spark3d.cli import main
from spark3d.encoders import HierarchicalEncoder, from_timm
from spark3d.masking import upsample_mask
from spark3d.sparse import MaskContext, UnsafeLayerError, desparsify, sparsify

from conftest import rel


class UserResidualBlock(nn.Module):
    """A plain residual block of a user's own: convs, norms, an activation and an addition."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm3d(cout)
        self.skip = nn.Conv3d(cin, cout, 1, stride=stride)

    def forward(self, x):
        y = F.leaky_relu(self.norm1(self.conv1(x)), 0.01)
        y = self.norm2(self.conv2(y)) * 0.5 + 0.1  # per-position arithmetic
        return torch.relu(y + self.skip(x))


class ChannelGate(nn.Module):
    """CBAM-style channel attention: functional global average and max pooling, a shared MLP as 1x1 convs."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Sequential(nn.Conv3d(c, c, 1), nn.ReLU(), nn.Conv3d(c, c, 1))

    def forward(self, x):
        avg = F.adaptive_avg_pool3d(x, 1)
        top = x.amax(dim=(-3, -2, -1), keepdim=True)
        return x * torch.sigmoid(self.fc(avg) + self.fc(top))


class UserNet(nn.Module):
    def __init__(self, middle=None):
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.stage1 = nn.Sequential(UserResidualBlock(4, 8, 2), ChannelGate(8))
        self.stage2 = nn.Sequential(UserResidualBlock(8, 8, 2), middle or nn.Identity())
        self.stage3 = UserResidualBlock(8, 16, 2)

    def forward(self, x):
        return self.stage3(self.stage2(self.stage1(self.stem(x))))


TAPS = ["stage1", "stage2", "stage3"]
SIZE = (24, 24, 16)


def _encoder(middle=None):
    return HierarchicalEncoder(UserNet(middle), TAPS, spatial_dims=3, in_channels=1, probe_size=SIZE)


def test_user_residual_block_converts_without_trusted_and_is_safe():
    encoder = _encoder()
    dense = copy.deepcopy(encoder)
    model = SparK(encoder, SIZE, mask_ratio=0.5, decoder_width=16)  # no trusted=
    assert type(encoder.network.stage1[0].norm1).__name__ == "SparseInstanceNorm3d"
    assert isinstance(encoder.network.stage1[1], ChannelGate)  # the gate pools globally: made exact, same class
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, *SIZE, generator=gen)
    mask = model.random_mask(2, generator=gen)
    for training in (True, False):
        model.train(training)
        dense.train(training)
        assert leak_difference(model, x, mask) < 1e-5
        assert dense_difference(model, dense, x) < 1e-4
    # weights round-trip: the encoder's state dict loads into a fresh user network by key
    for p in encoder.network.parameters():
        p.data.normal_(0, 0.3)
    fresh = UserNet()
    fresh.load_state_dict(model.encoder_state_dict(), strict=True)
    fresh.eval()
    model.eval()
    reference = HierarchicalEncoder(fresh, TAPS, spatial_dims=3, in_channels=1, probe_size=SIZE)
    with torch.no_grad():
        for r, o in zip(reference(x), model.encode(x)):
            assert rel(o, r) < 1e-4


def test_global_mean_and_max_of_a_user_gate_are_visible_site_statistics():
    encoder = _encoder()
    model = SparK(encoder, SIZE, mask_ratio=0.5, decoder_width=16, compute="masked-dense").eval()  # dense maps seen
    gate = encoder.network.stage1[1]
    seen = {}
    gate.fc[0].register_forward_pre_hook(lambda m, args: seen.setdefault("stats", []).append(args[0]))
    gate.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, *SIZE, generator=gen)
    mask = model.random_mask(2, generator=gen)
    with torch.no_grad():
        model.encode(x, mask)
    feat = seen["x"]
    vis = upsample_mask(mask, feat.shape[2:])
    mean_ref = torch.stack([feat[b][:, vis[b, 0]].mean(1) for b in range(2)])
    max_ref = torch.stack([feat[b][:, vis[b, 0]].amax(1) for b in range(2)])
    mean, top = (s.flatten(1) for s in seen["stats"])
    assert rel(mean, mean_ref) < 1e-5 and rel(top, max_ref) < 1e-5
    assert rel(feat.mean((2, 3, 4)), mean_ref) > 0.1  # a dense mean would be off: the test can fail


class Resampler(nn.Module):
    def forward(self, x):
        return F.interpolate(x, size=x.shape[2:], mode="trilinear")


class OwnWeightConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3, 3) * 0.1)

    def forward(self, x):
        return F.conv3d(x, self.weight, padding=1)


class PositionMatmul(nn.Module):
    """MLP-Mixer-style token mixing: positions flattened into the axis a matmul sums over."""

    def __init__(self, positions):
        super().__init__()
        self.mix = nn.Parameter(torch.eye(positions))

    def forward(self, x):
        return (x.flatten(2) @ self.mix).view_as(x)


@pytest.mark.parametrize("block,op", [(Resampler(), "F.interpolate"), (OwnWeightConv(), "F.conv3d"),
                                      (PositionMatmul(6 * 6 * 4), "Tensor.matmul")])
def test_position_mixing_user_blocks_are_refused_with_path_and_op(block, op):
    encoder = _encoder(block)
    with pytest.raises(UnsafeLayerError) as err:
        SparK(encoder, SIZE, decoder_width=16)
    refused = [(r.path, r.op) for r in err.value.refusals]
    assert refused == [("stage2.1", op)]
    assert "stage2.1" in str(err.value) and op in str(err.value) and type(block).__name__ in str(err.value)
    assert type(encoder.network.stem) is nn.Conv3d  # nothing changed before refusing
    SparK(_encoder(copy.deepcopy(block)), SIZE, decoder_width=16, trusted=[type(block)])  # the override still works


def test_bare_sparsify_probes_by_itself():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.Flatten(2))  # flattening positions is a view: fine until something sums over them
    assert sparsify(net, MaskContext()) == ["0", "1", "3"]
    mixer = nn.Sequential(nn.Conv2d(3, 8, 1), PositionMatmul(16 * 16))
    with pytest.raises(UnsafeLayerError, match=r"1 \(.*PositionMatmul\): Tensor.matmul"):
        sparsify(mixer, MaskContext(), example_input=torch.zeros(1, 3, 16, 16))


def _se_statistics(name, se_input_child):
    """Each SE block's pooled statistic under a mask against an independent visible-site mean."""
    encoder = from_timm(name, probe_size=64)
    dense = copy.deepcopy(encoder)
    model = SparK(encoder, (64, 64), mask_ratio=0.5, decoder_width=32, compute="masked-dense").eval()
    exact = [op.path for op in encoder.op_trace.select("exact")]
    assert exact, f"{name}: no squeeze-excitation found"
    modules = dict(encoder.network.named_modules())
    seen, hooks = {}, []
    for path in exact:
        se = modules[path]
        hooks.append(se.register_forward_pre_hook(lambda m, a, path=path: seen.__setitem__((path, "x"), a[0])))
        hooks.append(getattr(se, se_input_child).register_forward_pre_hook(
            lambda m, a, path=path: seen.__setitem__((path, "stat"), a[0])))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    mask = model.random_mask(2, generator=gen)
    with torch.no_grad():
        model.encode(x, mask)
    for hook in hooks:
        hook.remove()
    worst, dense_gap = 0.0, 0.0
    for path in exact:
        feat, stat = seen[(path, "x")], seen[(path, "stat")].flatten(1)
        vis = upsample_mask(mask, feat.shape[2:])
        reference = torch.stack([feat[b][:, vis[b, 0]].mean(1) for b in range(2)])
        worst = max(worst, rel(stat, reference))
        dense_gap = max(dense_gap, rel(feat.mean((2, 3)), reference))
    assert worst < 1e-5, f"{name}: SE statistic differs from the visible-site mean by {worst:.1e}"
    assert dense_gap > 0.1  # the plain mean over all sites is not it: the check can fail
    for training in (False, True):
        model.train(training)
        dense.train(training)
        assert dense_difference(model, dense, x) < 1e-4  # every cell visible: the dense network
    return encoder, dense.network.eval(), x


def test_efficientnet_b0_squeeze_excitation_is_exact_under_a_mask():
    encoder, dense, x = _se_statistics("efficientnet_b0", "conv_reduce")
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(encoder.network(x), dense(x))  # no mask set: the converted blocks are the dense ones
    restored = pickle.loads(pickle.dumps(encoder.network))  # generated classes (SE blocks too) rebuild by name
    assert type(restored.blocks[1][0].se).__name__ == "SparseGlobalPoolSqueezeExcite"
    desparsify(restored)
    assert type(restored.blocks[1][0].se) is type(dense.blocks[1][0].se)


def test_regnety_002_squeeze_excitation_is_exact_under_a_mask():
    _se_statistics("regnety_002", "fc1")


def test_check_backbone_prints_each_refused_op_with_path_and_why(capsys):
    code = main(["check-backbone", "mednext", "--spatial-dims", "2", "--size", "32",
                 "--backbone-kwargs", '{"init_filters": 4, "global_resp_norm": true}'])
    out = capsys.readouterr().out
    assert code == 1 and "NOT safe" in out
    assert "enc_stages.0.0" in out and "torch.norm" in out and "global response normalisation" in out

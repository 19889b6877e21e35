"""The two safety properties and the weight round trip on real timm and MONAI networks."""

import copy

import pytest
import timm
import torch

from spark3d import SparK
from spark3d.backbones import examples
from spark3d.check import dense_difference, leak_difference
from spark3d.encoders import from_spec

# every example configuration of the backbone table
BACKBONES = {ex.id: ((lambda spec=spec, ex=ex: from_spec(spec, probe_size=ex.input_size)), ex.input_size)
             for ex, spec in examples()}


def _model(key):
    make, size = BACKBONES[key]
    encoder = make()
    dense = copy.deepcopy(encoder)
    model = SparK(encoder, size, mask_ratio=0.6, decoder_width=32)
    x = torch.randn(2, encoder.in_channels, *size, generator=torch.Generator().manual_seed(1))
    return model, dense, x


@pytest.mark.parametrize("key", list(BACKBONES))
def test_no_leak_and_dense_equivalence(key):
    model, dense, x = _model(key)
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(2))
    assert not mask.all() and mask.any()
    for training in (True, False):
        model.train(training)
        dense.train(training)
        assert leak_difference(model, x, mask) < 1e-5, f"masked content leaks (train={training})"
        assert dense_difference(model, dense, x) < 1e-4, f"not equal to the dense network (train={training})"


def test_unconverted_network_is_caught_by_the_leak_check():
    """The leak check can fail: undo the conversion of the first conv and masked content gets in."""
    model, _, x = _model("timm-resnet18")
    model.encoder.network.conv1._sparse_ctx = None  # this layer now ignores the mask
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(2))
    assert leak_difference(model, x, mask) > 1e-3


def test_sparse_encoder_differs_from_naive_masking():
    """Visible-only statistics really change the features versus a dense net on a zero-filled input."""
    model, dense, x = _model("monai-segresnet-3d")
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(3))
    from spark3d.masking import upsample_mask

    with torch.no_grad():
        sparse = model.encode(x, mask)[-1]
        naive = dense(x * upsample_mask(mask, x.shape[2:]))[-1] * upsample_mask(mask, sparse.shape[2:])
    assert (sparse - naive).abs().max() > 1e-2


def test_timm_weights_round_trip():
    model, dense, x = _model("timm-resnet18")
    for p in model.encoder.network.parameters():  # make the weights distinctive
        p.data.normal_()
    sd = model.encoder_state_dict()
    fresh = timm.create_model("resnet18")
    result = fresh.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"}
    fresh.eval()
    model.eval()
    reference = fresh.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    ours = model.encode(x)
    assert len(reference) == len(ours)
    for r, o in zip(reference, ours):
        assert ((r - o).norm() / r.norm()).item() < 1e-4


def test_monai_weights_round_trip_and_decoder_keys_missing():
    from monai.networks.nets import SegResNet

    model, dense, x = _model("monai-segresnet-3d")
    for p in model.encoder.network.parameters():
        p.data.normal_(0, 0.1)
    sd = model.encoder_state_dict()
    fresh = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8)
    result = fresh.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith(("up_", "conv_final")) for k in result.missing_keys)
    fresh.eval()
    model.eval()
    bottleneck, skips = fresh.encode(x)  # MONAI's own encoder path: one output per down layer
    ours = model.encode(x)
    assert len(skips) == len(ours) and torch.equal(skips[-1], bottleneck)
    for r, o in zip(skips, ours):
        assert ((r - o).norm() / r.norm()).item() < 1e-4

"""The SparK model: contract, loss, independence, anisotropy, and that it learns."""

import copy

import pytest
import torch

from spark3d import SparK, SparKOutput
from spark3d.encoders import from_monai
from spark3d.masking import upsample_mask
from spark3d.methods.common import patchify, unpatchify


def tiny(sd=3, **kw):
    size = (32,) * sd if sd == 3 else (64, 64)
    enc = from_monai("segresnet", spatial_dims=sd, in_channels=1, init_filters=8, blocks_down=(1, 1, 1, 1))
    return SparK(enc, size, decoder_width=32, **kw), size


def smooth_volume(size, seed=0):
    """A smooth random field (sum of Gaussian blobs): structured content a decoder can learn."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
    v = torch.zeros(size)
    for _ in range(6):
        centre = torch.rand(len(size), generator=g) * 1.6 - 0.8
        radius = torch.rand(1, generator=g) * 0.3 + 0.15
        d2 = sum((a - c) ** 2 for a, c in zip(axes, centre))
        v += torch.exp(-d2 / (2 * radius**2)) * (torch.rand(1, generator=g) * 2 - 1)
    return v


def train_steps(model, x, steps, stop_at_half=False):
    """AdamW steps on one batch; returns the losses (optionally stopping once the loss has halved)."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for step in range(steps):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if stop_at_half and step >= 20 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5:
            break
    return losses


def test_output_contract_and_mask_grid():
    model, size = tiny(mask_ratio=0.75)
    assert model.mask_grid == (4, 4, 4)
    mask = model.random_mask(3)
    assert mask.shape == (3, 1, 4, 4, 4) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [16, 16, 16]
    x = torch.randn(3, 1, *size)
    out = model(x, mask=mask)
    assert isinstance(out, SparKOutput)
    assert out.pred.shape == x.shape and torch.equal(out.mask, mask) and out.loss.ndim == 0
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 32, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32, 16))
    with pytest.raises(ValueError, match="not divisible"):
        SparK(from_monai("segresnet", spatial_dims=3, init_filters=8), (32, 32, 20))


def test_loss_counts_masked_patches_only_and_norm_pix():
    model, size = tiny()
    x = torch.randn(2, 1, *size)
    mask = model.random_mask(2)
    pred = torch.randn_like(x)
    # changing the prediction inside visible cells does not change the loss
    vis = upsample_mask(mask, size)
    pred2 = torch.where(vis, torch.randn_like(x) * 10, pred)
    assert torch.allclose(model.loss(x, pred, mask), model.loss(x, pred2, mask))
    # reference: explicit per-patch normalisation and mean over masked patches
    t = patchify(x, model.patch_size)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    per = (patchify(pred, model.patch_size) - t).pow(2).mean(-1)
    masked = ~mask.flatten(1)
    assert torch.allclose(model.loss(x, pred, mask), per[masked].mean(), rtol=1e-5)
    raw, _ = tiny(norm_pix_loss=False)
    per_raw = (patchify(pred, model.patch_size) - patchify(x, model.patch_size)).pow(2).mean(-1)
    assert torch.allclose(raw.loss(x, pred, mask), per_raw[masked].mean(), rtol=1e-5)


def test_patchify_round_trip_anisotropic():
    x = torch.randn(2, 3, 8, 12, 4)
    p = patchify(x, (2, 4, 2))
    assert p.shape == (2, 4 * 3 * 2, 2 * 4 * 2 * 3)
    assert torch.equal(unpatchify(p, (2, 4, 2), (4, 3, 2), 3), x)
    # patch l holds exactly the voxels of grid cell l (raster order)
    cell = 1 * (3 * 2) + 2 * 2 + 1  # grid cell (1, 2, 1)
    assert torch.equal(p[1, cell].view(2, 4, 2, 3).permute(3, 0, 1, 2), x[1, :, 2:4, 8:12, 2:4])


def test_pred_ignores_masked_content_after_reconstruct_pastes_visible():
    model, size = tiny()
    model.eval()
    x = torch.randn(2, 1, *size)
    out = model(x)
    rec = model.reconstruct(x, out)
    vis = upsample_mask(out.mask, size)
    assert torch.equal(rec[vis.expand_as(rec)], x[vis.expand_as(x)])


def test_two_models_do_not_interfere():
    a, size = tiny()
    b = copy.deepcopy(a)
    for m in (a, b):
        m.eval()
    x = torch.randn(2, 1, *size)
    mask_a = a.random_mask(2, generator=torch.Generator().manual_seed(1))
    mask_b = b.random_mask(2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone = a(x, mask=mask_a).pred
        # interleave: b sets its own mask while a's context holds a different one
        with a.ctx.use(mask_a), b.ctx.use(mask_b):
            b_feats = b.encoder(x)
            a_feats = a.encoder(x)
        again = a(x, mask=mask_a).pred
    assert torch.equal(alone, again)
    assert a.ctx is not b.ctx
    assert not torch.equal(a_feats[-1], b_feats[-1])  # same weights, different masks
    vis_b = upsample_mask(mask_b, b_feats[-1].shape[2:])
    assert torch.all(b_feats[-1].masked_select(~vis_b.expand_as(b_feats[-1])) == 0)


def test_anisotropic_input_and_strides_train():
    enc = from_monai("dynunet", spatial_dims=3, in_channels=1, strides=[1, (2, 2, 1), (2, 2, 2), (2, 2, 1)],
                     filters=[8, 16, 32, 32], probe_size=(64, 64, 32))
    assert enc.strides[-1] == (8, 8, 2)
    model = SparK(enc, (64, 64, 32), mask_ratio=0.75, decoder_width=32)
    assert model.mask_grid == (8, 8, 16)
    x = smooth_volume((64, 64, 32))[None, None].repeat(2, 1, 1, 1, 1)
    losses = train_steps(model, x, 30)
    assert model(x).pred.shape == x.shape
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


@pytest.mark.parametrize("sd", [3, 2])
def test_it_learns_loss_halves_within_200_steps(sd):
    model, size = tiny(sd, mask_ratio=0.6)
    x = smooth_volume(size)[None, None].repeat(2, 1, *[1] * sd)
    losses = train_steps(model, x, 200, stop_at_half=True)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses[::20]


def test_concat_fusion_and_explicit_densify_norm():
    model, size = tiny(fusion="concat", densify_norm="instance")
    out = model(torch.randn(2, 1, *size))
    assert out.pred.shape == (2, 1, *size) and torch.isfinite(out.loss)
    assert type(model.densify_norms[0]).__name__ == "SparseInstanceNorm3d"
    out.loss.backward()
    assert all(t.grad is not None for t in model.mask_tokens)


def test_densify_norm_follows_encoder_kind():
    model, _ = tiny()
    assert model.densify_norm_kind == "group"  # SegResNet uses GroupNorm
    bn = SparK(from_monai("resnet10", spatial_dims=3, in_channels=1), (32, 32, 32), decoder_width=32)
    assert bn.densify_norm_kind == "batch"


def test_bf16_autocast_on_cpu_keeps_masked_content_out():
    model, size = tiny()
    model.eval()
    x = torch.randn(2, 1, *size)
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(5))
    vis = upsample_mask(mask, size)
    noisy = torch.where(vis, x, torch.randn_like(x) * 100)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(x, mask=mask), model(noisy, mask=mask)
    assert a.pred.dtype == torch.bfloat16 and torch.isfinite(a.loss)
    assert torch.equal(a.pred, b.pred)

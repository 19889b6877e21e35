"""ConvMAE in 2D and 3D: no leak, visible-only transformer, exact masked convolution, any grid, it learns,
bf16, the encoder round trip into the segmentation network, and the CLI end to end."""

import json

import numpy as np
import pytest
import torch

from spark3d import ConvMAE
from spark3d.backbones import BackboneSpec, build_segmentation_network
from spark3d.backbones.hybrid import HybridEncoder, sincos_position_embedding, tokens_of
from spark3d.checkpoint import CheckpointError
from spark3d.errors import ConfigError
from spark3d.masking import num_visible, upsample_mask
from spark3d.methods import build_method
from spark3d.sparse import is_sparse

from conftest import rel


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine thread hand-offs cost more than they
    save: run this file's steps on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = {"3d": (3, 1, (64, 64, 32)), "2d": (2, 3, (96, 64))}  # non-cubic grids: (4, 4, 2) and (6, 4) tokens


def _model(case, **kw):
    sd, ch, size = CASES[case]
    return ConvMAE.from_preset("tiny", spatial_dims=sd, in_channels=ch, input_size=size, mask_ratio=0.75, **kw)


def _input(case, batch=2, seed=1):
    sd, ch, size = CASES[case]
    return torch.randn(batch, ch, *size, generator=torch.Generator().manual_seed(seed))


def _mask(model, batch=2, seed=2):
    mask = model.random_mask(batch, generator=torch.Generator().manual_seed(seed))
    assert mask.any() and not mask.all()
    return mask


def _dense_copy(model):
    """A plain dense HybridEncoder with the model's encoder weights (nothing converted)."""
    enc = model.encoder
    dense = HybridEncoder(enc.spatial_dims, enc.in_channels, widths=enc.widths, depths=enc.depths,
                          num_heads=enc.stage3.blocks[0].attn.num_heads)
    dense.load_state_dict(model.encoder_state_dict())
    return dense


@pytest.mark.parametrize("case", list(CASES))
def test_masked_content_does_not_reach_prediction(case):
    model, x = _model(case), _input(case)
    mask = _mask(model)
    noise = 1e3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x_noisy = torch.where(upsample_mask(mask, x.shape[2:]), x, noise)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            pred, pred_noisy = model(x, mask=mask).pred, model(x_noisy, mask=mask).pred
            # the converted conv stages keep masked content out by themselves, fed the raw (unzeroed) input
            with model.ctx.use(mask):
                f4, f4_noisy = model.encoder.stage1(x), model.encoder.stage1(x_noisy)
                f8, f8_noisy = model.encoder.stage2(f4), model.encoder.stage2(f4_noisy)
        assert rel(pred_noisy, pred) < 1e-5, f"masked content leaks into out.pred (train={training})"
        assert rel(f4_noisy, f4) < 1e-5 and rel(f8_noisy, f8) < 1e-5
    assert (pred - x).abs().max() > 1e-3  # the prediction is not a copy of the input


def test_anisotropic_stage_strides_give_their_own_token_grid():
    """Per-axis stage strides (4, 2, (2, 2, 1)): patches of 16 x 16 x 8, a (4, 4, 4) grid for (64, 64, 32); no leak."""
    model = ConvMAE.from_preset("tiny", spatial_dims=3, in_channels=1, input_size=(64, 64, 32), strides=[4, 2, [2, 2, 1]])
    assert model.patch_size == (16, 16, 8) and model.mask_grid == (4, 4, 4)
    x = _input("3d")
    mask = _mask(model)
    x_noisy = torch.where(upsample_mask(mask, x.shape[2:]), x, 1e3 * torch.randn_like(x))
    with torch.no_grad():
        out, out_noisy = model(x, mask=mask), model(x_noisy, mask=mask)
    assert out.pred.shape == x.shape and rel(out_noisy.pred, out.pred) < 1e-5


def test_unconverted_conv_stage_would_leak():
    """The leak check can fail: with the layers of stage 1 ignoring the mask, masked content gets in
    (through the depthwise conv: every other layer of the stage reads its own site or token only)."""
    model, x = _model("3d"), _input("3d")
    mask = _mask(model)
    for m in model.encoder.stage1.modules():
        if is_sparse(m):
            m._sparse_ctx = None  # this layer now ignores the mask
    x_noisy = torch.where(upsample_mask(mask, x.shape[2:]), x, 1e3 * torch.randn_like(x))
    with torch.no_grad(), model.ctx.use(mask):
        f4, f4_noisy = model.encoder.stage1(x), model.encoder.stage1(x_noisy)
    assert rel(f4_noisy, f4) > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_transformer_blocks_receive_exactly_the_visible_tokens(case):
    model, x = _model(case), _input(case)
    mask = _mask(model)
    k = num_visible(model.mask_grid, 0.75)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
             for b in model.encoder.stage3.blocks]
    with torch.no_grad():
        tokens = model.encode(x, mask)
        model(x, mask=mask)
    for h in hooks:
        h.remove()
    d = model.encoder.widths[-1]
    assert tokens.shape == (2, k, d)
    assert len(seen) == 2 * len(model.encoder.stage3.blocks) and all(s.shape == (2, k, d) for s in seen)
    # the first block's input: the visible tokens of the stage-3 patch embedding, in raster order, with positions
    stage3 = model.encoder.stage3
    with torch.no_grad(), model.ctx.use(mask):
        _, f8 = model.forward_conv_stages(x, mask)
        all_bld = stage3.proj(tokens_of(stage3.embed(f8))) + sincos_position_embedding(model.mask_grid, d)
    expected = all_bld[mask.flatten(1)].view(2, k, d)  # boolean selection, independent of the gather
    assert rel(seen[0], expected) < 1e-6


@pytest.mark.parametrize("case", list(CASES))
def test_masked_convolution_is_exact(case):
    model, x = _model(case), _input(case)
    model.eval()
    dense = _dense_copy(model).eval()
    assert is_sparse(model.encoder.stage1.blocks[0].dwconv) and is_sparse(model.encoder.stage2.blocks[0].norm1)
    assert not any(is_sparse(m) for m in model.encoder.stage3.blocks.modules())  # tokens are gathered instead
    with torch.no_grad():
        # every token visible: the conv stages, and the fused tokens, equal the plain dense network
        full = model.full_mask(2)
        f4, f8 = model.forward_conv_stages(x, full)
        d4, d8, d16 = dense(x)
        assert rel(f4, d4) < 1e-4 and rel(f8, d8) < 1e-4
        assert rel(model.encode(x, full), tokens_of(d16)) < 1e-4

        # under a mask: each visible site equals an independent reference, the dense stages on the input with
        # masked cells zeroed and the mask multiplied in before every depthwise conv (ConvMAE's published rule)
        mask = _mask(model)
        f4, f8 = model.forward_conv_stages(x, mask)
        x0 = x * upsample_mask(mask, x.shape[2:])

        def reference(mask_before_dwconv: bool):
            hooks = []
            if mask_before_dwconv:
                for name, m in dense.named_modules():
                    if name.endswith("dwconv"):
                        hooks.append(m.register_forward_pre_hook(
                            lambda mod, args: (args[0] * upsample_mask(mask, args[0].shape[2:]),)))
            r4 = dense.stage1(x0)
            r8 = dense.stage2(r4)
            for h in hooks:
                h.remove()
            return r4, r8

        r4, r8 = reference(True)
        for ours, ref in ((f4, r4), (f8, r8)):
            visible = upsample_mask(mask, ours.shape[2:]).expand_as(ours)
            assert rel(ours[visible], ref[visible]) < 1e-4
            assert torch.count_nonzero(ours[~visible]) == 0  # masked sites exactly zero
        # the reference can tell: without masking before the depthwise convs, visible sites change
        n4, _ = reference(False)
        visible = upsample_mask(mask, f4.shape[2:]).expand_as(f4)
        assert rel(n4[visible], f4[visible]) > 1e-3


def _phantom_volume(shape=(64, 64, 32)):
    from spark3d.data.phantoms import make_phantom

    hu, _, _ = make_phantom(3, shape)
    return torch.from_numpy(np.clip((hu.astype(np.float32) + 175.0) / 425.0, 0.0, 1.0))[None, None]


def _small_image(size=(96, 64)):
    """A small RGB picture: a phantom slice in three tints, resized."""
    s = _phantom_volume((64, 64, 32))[0, :, :, :, 16]
    rgb = torch.cat([s, s.pow(2), 1.0 - s], 0)[None]
    return torch.nn.functional.interpolate(rgb, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_preset_learns_on_one_volume_or_image(case):
    """The masked loss falls by at least half within 200 CPU steps (fresh random masks every step); also shows
    that a (64, 64, 32) volume and a (96, 64) image train."""
    x = _phantom_volume() if case == "3d" else _small_image()
    model = _model(case)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for _ in range(200):
        opt.zero_grad(set_to_none=True)
        loss = model(x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) >= 20 and np.mean(losses[-10:]) <= 0.5 * np.mean(losses[:10]):
            break
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) <= 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_bf16_mixed_step_is_finite():
    model, x = _model("3d"), _input("3d")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss) and out.pred.shape == x.shape
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _export(tmp_path, case="3d"):
    from spark3d.train import PretrainModule

    sd, ch, size = CASES[case]
    module = PretrainModule(method="convmae", backbone="convmae_tiny", source="hybrid", spatial_dims=sd,
                            in_channels=ch, input_size=size, mask_ratio=0.75)
    for p in module.model.encoder.parameters():  # distinctive weights
        p.data.normal_(0, 0.05)
    return module, module.save_encoder(tmp_path / f"encoder_{case}.pt")


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_state_dict_round_trip_into_segmentation_network(case, tmp_path):
    from spark3d.networks import load_pretrained_encoder

    module, path = _export(tmp_path, case)
    state = torch.load(path, weights_only=True)["state_dict"]
    sd, ch, size = CASES[case]
    spec = BackboneSpec("convmae_tiny", "hybrid", sd, ch)
    network = build_segmentation_network(spec, 3)
    report = load_pretrained_encoder(network, path, spec)
    encoder_state = network.encoder.state_dict()
    assert report["matched"] == len(state) == len(encoder_state) and report["prefix"] == "encoder."
    for key, value in state.items():
        assert torch.equal(encoder_state[key], value)
    # the same features: the segmentation network's encoder and ConvMAE with every token visible
    x = _input(case)
    model = module.model.eval()
    network.eval()
    with torch.no_grad():
        f4, f8, f16 = network.encoder(x)
        ours = model.forward_conv_stages(x, model.full_mask(2))
        assert rel(ours[0], f4) < 1e-4 and rel(ours[1], f8) < 1e-4
        assert rel(model.encode(x), tokens_of(f16)) < 1e-4
        assert network(x).shape == (2, 3, *size)


def test_finetuning_at_another_size_loads_and_runs(tmp_path):
    from spark3d.train import SegmentationModule

    _, path = _export(tmp_path)  # pretrained at (64, 64, 32): a (4, 4, 2) token grid
    kwargs = dict(backbone="convmae_tiny", source="hybrid", num_classes=3, backbone_kwargs={"feature_size": 8})
    module = SegmentationModule(roi_size=(48, 48, 48), pretrained=str(path), **kwargs)
    assert module.pretrained_report["matched"] == len(module.network.encoder.state_dict())
    with torch.no_grad():
        assert module(torch.randn(1, 1, 48, 48, 48)).shape == (1, 3, 48, 48, 48)
        assert module(torch.randn(1, 1, 96, 32, 64)).shape == (1, 3, 96, 32, 64)
    # integer sin-cos positions: a larger grid extends a smaller one, nothing is interpolated
    small, large = sincos_position_embedding((4, 4, 2), 64), sincos_position_embedding((6, 6, 3), 64)
    assert torch.equal(small.view(4, 4, 2, 64), large.view(6, 6, 3, 64)[:4, :4, :2])
    with pytest.raises(ValueError, match="not divisible"):
        module(torch.randn(1, 1, 40, 48, 48))
    with pytest.raises(CheckpointError, match="convmae_tiny"):
        SegmentationModule(roi_size=(48, 48, 48), pretrained=str(path), **{**kwargs, "backbone": "convmae_small"})


def test_method_options_and_backbone_are_checked():
    spec = BackboneSpec("convmae_tiny", "hybrid", 3, 1)
    model = build_method("convmae", spec, (32, 32, 32), 0.75, decoder_depth=1)
    assert isinstance(model, ConvMAE) and len(model.decoder_blocks) == 1
    with pytest.raises(ConfigError, match="decoder_wdith"):
        build_method("convmae", spec, (32, 32, 32), 0.75, decoder_wdith=32)
    with pytest.raises(ConfigError, match="needs a hybrid backbone"):
        build_method("convmae", BackboneSpec("segresnet", "monai", 3, 1), (32, 32, 32), 0.75)
    with pytest.raises(ValueError, match="not divisible"):
        ConvMAE.from_preset("tiny", spatial_dims=3, input_size=(64, 64, 40))
    with pytest.raises(ValueError, match="unknown ConvMAE preset"):
        ConvMAE.from_preset("huge", spatial_dims=3, input_size=(64, 64, 32))


def test_demo_convmae_pretrain_finetune_evaluate_through_the_cli(tmp_path, caplog):
    from spark3d.cli import main
    from spark3d.cli.demo import CONFIG_DIR
    from spark3d.data.phantoms import write_btcv_phantoms

    datalist = write_btcv_phantoms(tmp_path / "data", n_train=2, n_val=1, n_test=0, shape=(48, 48, 24), seed=1)
    pre, ft = tmp_path / "pretrain", tmp_path / "finetune"
    quiet = ["--trainer.enable_progress_bar", "false"]
    assert main(["pretrain", "--config", str(CONFIG_DIR / "pretrain" / "demo_convmae_ct.yaml"),
                 "--data.init_args.datalist", str(datalist), "--data.init_args.roi_size", "[32, 32, 32]",
                 "--data.init_args.batch_size", "1", "--trainer.default_root_dir", str(pre),
                 "--trainer.max_steps", "2", "--model.init_args.figure_every_n_epochs", "1", *quiet]) == 0
    export = torch.load(pre / "encoder.pt", weights_only=True)
    assert export["meta"]["method"] == "convmae" and export["meta"]["backbone"] == "convmae_tiny"
    assert export["meta"]["token_grid"] == [2, 2, 2] and export["meta"]["strides"][-1] == [16, 16, 16]
    assert list((pre / "figures").glob("*.png")) and "train/loss" in (pre / "metrics.csv").read_text()
    assert (pre / "checkpoints" / "last.ckpt").is_file()

    common = ["--config", str(CONFIG_DIR / "finetune" / "demo_convmae_ct.yaml"), "--data.init_args.datalist",
              str(datalist), "--data.init_args.roi_size", "[32, 32, 16]", "--data.init_args.spacing", "[8.0, 8.0, 8.0]"]
    assert main(["finetune", *common, "--model.init_args.pretrained", str(pre / "encoder.pt"),
                 "--trainer.default_root_dir", str(ft), "--trainer.max_steps", "1", "--trainer.max_epochs", "1",
                 "--trainer.check_val_every_n_epoch", "1", "--data.init_args.num_samples", "1", *quiet]) == 0
    assert f"loaded {len(export['state_dict'])} pretrained tensors" in caplog.text
    assert main(["evaluate", *common, "--ckpt_path", str(ft / "checkpoints" / "last.ckpt"),
                 "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert 0.0 <= summary["mean_dice"] <= 1.0


def test_demo_offers_the_convmae_method(capsys):
    from spark3d.cli import main
    from spark3d.cli.demo import CONFIG_DIR, METHOD_CONFIGS

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "convmae" in capsys.readouterr().out
    pretrain, finetune, _ = METHOD_CONFIGS["convmae"]
    assert "convmae" in (CONFIG_DIR / "pretrain" / pretrain).read_text()
    assert "hybrid" in (CONFIG_DIR / "finetune" / finetune).read_text()

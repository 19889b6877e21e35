"""ConvMAE's sparse compute (conv part on packed visible cells) against masked-dense and the dense network."""

import copy

import pytest
import torch
from timm.layers import DropPath
from torch import nn

import spark3d.methods.convmae as convmae_module
from spark3d import ConvMAE
from spark3d.backbones.hybrid import tokens_of
from spark3d.errors import ConfigError
from spark3d.masking import upsample_mask



@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread on a shared machine: run this file's steps on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (spatial dims, channels, input size): token grids 3x3x2 and 4x3, so cells have visible and masked neighbours
CASES = {"3d": (3, 1, (48, 48, 32)), "2d": (2, 3, (64, 48)), "3d-small": (3, 1, (32, 32, 32))}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _model(case: str, drop_path: float = 0.25) -> ConvMAE:
    """A tiny ConvMAE in float64 whose weights cannot hide a difference: every weight, norm scale and bias
    perturbed away from its initial value, and stochastic depth on every block (conv and transformer)."""
    sd, ch, size = CASES[case]
    torch.manual_seed(0)
    model = ConvMAE.from_preset("tiny", spatial_dims=sd, in_channels=ch, input_size=size, mask_ratio=0.5,
                                decoder_depth=1, drop_path_rate=drop_path)
    for stage in (model.encoder.stage1, model.encoder.stage2):
        for block in stage.blocks:
            block.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _input(case: str) -> torch.Tensor:
    sd, ch, size = CASES[case]
    return torch.randn(2, ch, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _run(model: ConvMAE, mode: str, x: torch.Tensor, mask: torch.Tensor, seed: int = 7, step: bool = True) -> dict:
    """Features and tokens, and (``step``) the loss and every parameter's gradient, computed the ``mode`` way."""
    model.zero_grad(set_to_none=True)
    out = {}
    with model.computing(mode):
        with torch.no_grad():
            torch.manual_seed(seed)
            out["f4"], out["f8"] = model.forward_conv_stages(x, mask)
            torch.manual_seed(seed)
            out["tokens"] = model.encode(x, mask)
        if step:
            torch.manual_seed(seed)
            loss = model(x, mask=mask).loss
            loss.backward()
            out["loss"] = loss.detach()
            out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out


def _count_sparse_runs(monkeypatch) -> list:
    calls = []
    real = convmae_module.conv_stages

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(convmae_module, "conv_stages", counting)
    return calls


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ["3d", "2d"])
def test_sparse_equals_masked_dense_in_float64(case, training, monkeypatch):
    """Features, fused tokens, loss and every gradient agree (float64, rel < 1e-6), with drop path drawn per sample."""
    model, x = _model(case), _input(case)
    model.train(training)
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(3))
    assert 0 < int(mask[0].sum()) < mask[0].numel()
    calls = _count_sparse_runs(monkeypatch)
    dense = _run(model, "masked-dense", x, mask)
    assert calls == []
    sparse = _run(model, "sparse", x, mask)
    assert len(calls) == 3  # the sparse code ran for the features, the tokens and the step
    with model.computing("sparse"):
        assert model.compute_plan(mask)["path"] == "sparse" and model.compute_plan(mask)["layout"] == "visible cells"
    for key in ("f4", "f8", "tokens", "loss"):
        assert rel(sparse[key], dense[key]) < 1e-6, key
    assert sparse["grads"].keys() == dense["grads"].keys() and len(dense["grads"]) == len(list(model.parameters()))
    for name, grad in dense["grads"].items():
        assert rel(sparse["grads"][name], grad) < 1e-6, name
    # masked sites of the unpacked features are exactly zero, and nothing masked is left out of the comparison
    for key in ("f4", "f8"):
        masked = ~upsample_mask(mask, sparse[key].shape[2:]).expand_as(sparse[key])
        assert torch.all(sparse[key][masked] == 0) and torch.all(dense[key][masked] == 0)
    if training:  # stochastic depth really drew: another seed, other numbers (so the agreement above is not vacuous)
        other = _run(model, "sparse", x, mask, seed=8, step=False)
        assert rel(other["tokens"], sparse["tokens"]) > 1e-3


@pytest.mark.parametrize("case", ["3d", "2d"])
def test_every_token_visible_equals_the_dense_network(case, monkeypatch):
    """With nothing masked, the sparse code runs whole maps (one cell per sample) and equals the plain network."""
    model, x = _model(case, drop_path=0.0), _input(case)
    model.eval()
    dense_net = copy.deepcopy(model.encoder)
    from spark3d.sparse import desparsify

    desparsify(dense_net)
    full = model.full_mask(2)
    calls = _count_sparse_runs(monkeypatch)
    with torch.no_grad(), model.computing("sparse"):
        assert model.compute_plan(full)["layout"] == "whole maps" and model.compute_plan(full)["cells"] == 1
        f4, f8 = model.forward_conv_stages(x, full)
        tokens = model.encode(x)
        d4, d8, d16 = dense_net(x)
    assert len(calls) == 2
    assert rel(f4, d4) < 1e-10 and rel(f8, d8) < 1e-10 and rel(tokens, tokens_of(d16)) < 1e-10


def test_sparse_features_ignore_masked_content():
    """Changing the masked voxels changes nothing the sparse path computes."""
    model, x = _model("3d-small", drop_path=0.0), _input("3d-small")
    model.eval()
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(5))
    visible = upsample_mask(mask, x.shape[2:])
    x_other = torch.where(visible, x, 100 * torch.randn_like(x))
    with torch.no_grad(), model.computing("sparse"):
        assert rel(model.encode(x_other, mask), model.encode(x, mask)) == 0.0
        out, out_other = model(x, mask), model(x_other, mask)
    assert rel(out_other.pred, out.pred) == 0.0


def test_float32_and_bfloat16_agree_to_rounding():
    """float32: the two paths agree to float32 rounding (rel < 1e-4); bf16 autocast runs the sparse path's
    custom backward in bf16 and stays within bf16 rounding of masked-dense (rel < 5e-2)."""
    model, x = _model("3d-small").float(), _input("3d-small").float()
    model.train()
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(3))
    dense, sparse = _run(model, "masked-dense", x, mask), _run(model, "sparse", x, mask)
    assert rel(sparse["tokens"], dense["tokens"]) < 1e-4
    assert max(rel(sparse["grads"][n], g) for n, g in dense["grads"].items()) < 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense, sparse = _run(model, "masked-dense", x, mask), _run(model, "sparse", x, mask)
    assert all(g.dtype == torch.float32 for g in sparse["grads"].values())
    assert rel(sparse["loss"], dense["loss"]) < 5e-2
    assert rel(sparse["grads"]["encoder.stage1.blocks.0.dwconv.weight"],
               dense["grads"]["encoder.stage1.blocks.0.dwconv.weight"]) < 5e-2


def test_auto_says_its_path_once_and_falls_back_only_with_a_reason(capsys):
    """auto: one line naming the path; a structure the sparse code does not know → masked-dense with the module
    path and why; compute='sparse' refuses in one line instead."""
    model, x = _model("2d", drop_path=0.0), _input("2d")
    model.eval()
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(3))
    assert model.compute == "auto"
    with torch.no_grad():
        model(x, mask)
        model(x, mask)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["spark3d: ConvMAE computes sparse (conv stages, token embedding and fusion on the visible cells only)"]

    handle = model.encoder.stage1.blocks[0].dwconv.register_forward_hook(lambda *a: None)
    with torch.no_grad():
        tokens_auto = model.encode(x, mask)
    line = capsys.readouterr().err.strip()
    assert line == "spark3d: ConvMAE computes masked-dense: encoder.stage1.blocks.0.dwconv has forward hooks " \
                   "(this path does not call the modules' forward)"
    assert model.compute_plan(mask)["path"] == "masked-dense"
    with model.computing("sparse"), pytest.raises(ConfigError, match=r"encoder\.stage1\.blocks\.0\.dwconv has forward hooks"):
        model.encode(x, mask)
    handle.remove()
    with torch.no_grad(), model.computing("masked-dense"):
        assert rel(tokens_auto, model.encode(x, mask)) == 0.0  # the fallback is masked-dense itself

    model.encoder.stage2.blocks[0].mlp.act = nn.ReLU()
    assert model.compute_plan(mask) == {"path": "masked-dense",
                                        "reason": "encoder.stage2.blocks.0.mlp.act is a ReLU, not GELU"}


def test_compute_option_is_checked():
    with pytest.raises(ConfigError, match="compute must be one of auto, sparse, masked-dense"):
        ConvMAE.from_preset("tiny", spatial_dims=2, in_channels=1, input_size=(32, 32), compute="fast")


@pytest.mark.parametrize("nd, cin, k, cell", [(3, 16, 4, 4), (3, 24, 4, 4), (2, 16, 4, 4), (3, 1, 4, 16), (3, 32, 2, 4)])
def test_patch_conv_equals_the_dense_conv_in_bf16(nd, cin, k, cell):
    """The patch-embedding / fusion conv of the sparse path equals torch's conv: exactly in float64, to bf16 rounding
    under bf16 (oneDNN's bf16 channels-last conv is wrong for kernel = stride 4 onto one site from 16 or 24 channels
    on AVX512-BF16 CPUs, so the sparse path must not rely on it)."""
    from spark3d.backbones.hybrid_sparse import _patch_conv

    conv = (nn.Conv2d if nd == 2 else nn.Conv3d)(cin, 64, k, stride=k)
    x = torch.randn(6, cin, *([cell] * nd), generator=torch.Generator().manual_seed(0))
    reference = conv.double()(x.double())
    assert rel(_patch_conv(conv, x.double()), reference) < 1e-12
    conv.float()
    cl = torch.channels_last if nd == 2 else torch.channels_last_3d
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _patch_conv(conv, x.contiguous(memory_format=cl))
    assert out.dtype == torch.bfloat16 and rel(out, reference) < 1e-2

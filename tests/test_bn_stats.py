"""benchmarks/bn_stats.py measures what it says: one entry per BatchNorm layer of the encoder, re-estimated statistics
that are the mean and variance of each layer's input over the fine-tuning crops, a washout at the network's own
momentum, and a result file with its provenance and a decision."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("bn_stats", ROOT / "benchmarks" / "bn_stats.py")
bn_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bn_stats)

TINY = ["--steps", "4", "--unlabelled", "2", "--labelled", "2", "--val", "1", "--shape", "48", "48", "24",
        "--estimate-batches", "2", "--washout-steps", "3", "--seed", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bn_stats")
    threads = torch.get_num_threads()
    try:
        payload = bn_stats.main([*TINY, "--work", str(work), "--json", str(work / "bn_stats.json")])
    finally:
        torch.set_num_threads(threads)  # main() takes one thread
    return work, payload, bn_stats.parse([*TINY, "--work", str(work)])


def test_one_entry_per_batchnorm_layer_of_the_encoder(run):
    from monai.networks.nets.resnet import ResNetFeatures

    _, payload, _ = run
    reference = ResNetFeatures("resnet18", pretrained=False, spatial_dims=3, in_channels=1)
    names = [n for n, m in reference.named_modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(names) == 17  # stem + 2 per basic block, 8 blocks
    assert [r["layer"] for r in payload["per_layer"]] == names and payload["bn_layers"] == len(names)


def test_reestimated_statistics_are_the_mean_and_variance_of_the_layer_input(run):
    from spark3d.backbones import BackboneSpec
    from spark3d.checkpoint import read_encoder
    from spark3d.networks import build_segmentation_network, encoder_module_of, load_pretrained_encoder

    work, payload, args = run
    encoder_file = bn_stats.run_dir(args) / "encoder.pt"
    spec = BackboneSpec("resnet18", "monai", 3, 1, {})
    network = build_segmentation_network(spec, 14)
    load_pretrained_encoder(network, encoder_file, spec)
    encoder, _ = encoder_module_of(network, spec)
    datalist = next((work / "phantoms").glob("labelled_*")) / "dataset.json"
    data = bn_stats.finetune_data(datalist, args.roi, [args.spacing] * 3)
    batches = bn_stats.finetune_batches(data, args.estimate_batches, args.seed)
    layer = "layer2.0.bn2"
    inputs = []
    hook = encoder.get_submodule(layer).register_forward_hook(lambda m, inp, out: inputs.append(inp[0].double()))
    encoder.train()  # every earlier BN normalises with its batch statistics: the inputs do not depend on running ones
    with torch.no_grad():
        for x in batches:
            encoder(x)
    hook.remove()
    assert len(inputs) == args.estimate_batches and inputs[0].shape[0] == 4
    dims = (0, *range(2, inputs[0].ndim))
    mean = torch.cat([x.movedim(1, 0).reshape(x.shape[1], -1) for x in inputs], 1).mean(1)  # over every site
    var = torch.stack([x.var(dim=dims, unbiased=True) for x in inputs]).mean(0)  # BN's running var: per-batch, unbiased
    dense = torch.load(work / "bn_dense.pt", weights_only=True)[layer]
    torch.testing.assert_close(dense["running_mean"].double(), mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dense["running_var"].double(), var, rtol=1e-4, atol=1e-6)
    # the JSON's figure for that layer is the gap between the file's statistics and these
    state, _ = read_encoder(encoder_file)
    mu_pre = state[f"{layer}.running_mean"].double()
    row = next(r for r in payload["per_layer"] if r["layer"] == layer)
    assert row["mean_rel_diff"] == pytest.approx(float((mu_pre - mean).norm() / mean.norm()), rel=1e-4)
    log_ratio = torch.log(state[f"{layer}.running_var"].double() / var)
    assert row["var_abs_log_ratio"] == pytest.approx(float(log_ratio.abs().mean()), rel=1e-4)


def test_the_pretrained_statistics_fade_at_the_networks_momentum(run):
    _, payload, args = run
    wash = payload["washout"]
    assert wash["momentum"] == 0.1 and wash["k_under_1pc"] == math.ceil(math.log(0.01) / math.log(0.9)) == 44
    last = wash["steps"][-1]
    assert last["step"] == args.washout_steps
    assert last["measured_weight_mean"] == pytest.approx(0.9 ** args.washout_steps, rel=1e-3)
    assert last["measured_weight_var"] == pytest.approx(0.9 ** args.washout_steps, rel=1e-3)
    assert wash["steps"][0]["pretrained_start"]["mean_rel_diff"] == pytest.approx(
        sorted(r["mean_rel_diff"] for r in payload["per_layer"])[8])  # step 0 is the pretrained statistics: the median


def test_the_result_file_has_provenance_a_decision_and_the_path_that_ran(run):
    work, payload, _ = run
    saved = json.loads((work / "bn_stats.json").read_text())
    prov = saved["provenance"]
    assert prov["command"].startswith("python benchmarks/bn_stats.py") and prov["git"]["commit"]
    assert prov["machine"]["threads"] == 1 and "load_average" in prov["machine"]
    assert saved["pretraining"]["compute"] == "sparse" and saved["pretraining"]["steps"] == 4
    assert isinstance(saved["decision"], str) and saved["decision"]
    assert set(saved["eval_features_rel_l2"]) == {"layer1", "layer2", "layer3", "layer4", "logits"}

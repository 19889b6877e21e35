"""BatchNorm running statistics from masked pretraining against what dense fine-tuning sees (MONAI resnet18, 3D).

Sparse BatchNorm computes its batch statistics, and updates its running statistics, over the visible sites only,
so the ``running_mean`` / ``running_var`` in ``encoder.pt`` were estimated from masked inputs (features near a
masked cell saw zeros). Fine-tuning loads them by key and trains in train mode (BatchNorm normalises with batch
statistics and replaces the running ones at momentum 0.1); eval mode (validation, inference) uses the running ones.
This script measures that link of the chain, one BN network of the backbone table:

1. SparK-pretrains ``resnet18`` (``spark3d.train.SparKPretrain`` + ``spark3d.data.CTPretrainData`` under Lightning,
   ``compute: auto``; the path that ran is recorded) on wide-variation phantoms (seed 21) and exports ``encoder.pt``
   with the module's own ``save_encoder``;
2. loads it into the fine-tuning network (``SegmentationModule(backbone="resnet18", pretrained=…)``, a MONAI
   FlexibleUNet) and re-estimates every encoder BN's running statistics densely: fine-tuning crops of the labelled
   phantoms (seed 22; ``SegmentationData``'s training loader, 4 crops a step as configs/finetune/demo_ct.yaml) go
   through the encoder in train mode, no grad, each BN reset with ``momentum=None`` (a cumulative average). The
   encoder part alone runs: its BN inputs do not depend on the decoder, and the decoder's statistics stay as built;
3. per BN layer: ``‖μ_pre − μ_dense‖ / ‖μ_dense‖``, the same shift in dense standard deviations (RMS over channels
   of ``|μ_pre − μ_dense| / sqrt(var_dense + eps)``, what the normalised output moves by) and mean
   ``|log(var_pre / var_dense)|`` (and its signed mean);
4. downstream, in eval mode on the validation phantoms (whole preprocessed volumes): relative L2 difference of each
   tapped encoder feature map, and of the network's sliding-window logits (its decoder as built, the same in both),
   with the pretrained statistics against the re-estimated ones;
5. washout: at the BN momentum ``m`` found in the network, the pretrained statistics' weight after ``k`` fine-tuning
   steps is ``(1 − m)^k``, under 1 % from ``k = ceil(log 0.01 / log(1 − m))``. Checked by running train-mode
   forward passes of the dense encoder on further fine-tuning crops (weights fixed: what moves is the statistics)
   from two starts on the same batches, the pretrained statistics and the dense estimate: the distance of each
   chain to the dense estimate (the second chain is the floor that batch sampling leaves), and the measured weight
   ``‖chain_pre − chain_dense‖ / ‖start_pre − start_dense‖`` per layer against ``(1 − m)^j``;
6. a decision from these figures and the first validation of the shipped fine-tuning configs
   (``check_val_every_n_epoch`` in configs/finetune/*.yaml).

Sizes: resnet18's last stride is 32, so 64³ crops are the smallest with a mask grid of 2 per axis (8 cells, 3
visible at mask ratio 0.6); at 4 mm spacing a 64³ crop is a real crop of a phantom (at the demo's 6 mm it would
hold the whole body). 150 pretraining steps of 4 crops (about 0.8 s a step on one core, sparse path) keep the whole
measurement near 4 minutes on one core: the gap measured is the mask's, at weights SparK has moved for 150 steps,
not at the end of a long pretraining. 32 estimate batches (128 crops) and a 60-step washout (past k = 44).

    python benchmarks/bn_stats.py --work runs/bn_stats --json docs/results/bn_stats.json

``--work`` holds the phantoms, the pretraining run and the re-estimated statistics (``bn_dense.pt``); a second
invocation with the same settings reuses them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_runs import quiet  # noqa: E402  (Lightning's lines and warnings off, one thread, for a call only)
UNLABELLED_SEED, LABELLED_SEED = 21, 22
WINDOW = (-175.0, 250.0)  # the BTCV fine-tuning window (the phantoms are abdomen only), as the demo configs
STEPS_SHOWN = (0, 1, 2, 5, 10, 20, 30)  # washout steps recorded besides k and the last


# ------------------------------------------------------------------------------------------------ data and runs
def phantoms(work: Path, name: str, n_train: int, n_val: int, shape: list[int], seed: int) -> Path:
    """The datalist of a wide-variation phantom set in WORK (written once per settings, then reused)."""
    from spark3d.data.phantoms import write_btcv_phantoms

    folder = work / "phantoms" / f"{name}_t{n_train}_v{n_val}_{'x'.join(map(str, shape))}_s{seed}"
    datalist = folder / "dataset.json"
    if not datalist.is_file():
        write_btcv_phantoms(folder, n_train=n_train, n_val=n_val, n_test=0, shape=shape, seed=seed, variation="wide")
    return datalist


def pretrain(datalist: Path, out: Path, steps: int, seed: int, roi: list[int], spacing: list[float]) -> dict:
    """SparK pretraining of resnet18 through the library's Lightning pieces; ``out/encoder.pt`` by ``save_encoder``.
    Reused when ``out/run.json`` exists (the settings are in ``out``'s name)."""
    record = out / "run.json"
    if record.is_file() and (out / "encoder.pt").is_file():
        return {**json.loads(record.read_text()), "reused": True}  # its seconds are the earlier invocation's
    import pytorch_lightning as pl

    from spark3d.data import CTPretrainData
    from spark3d.train import SparKPretrain

    pl.seed_everything(seed, verbose=False)
    data = CTPretrainData(datalist=str(datalist), roi_size=roi, num_samples=2, batch_size=2, spacing=spacing,
                          intensity_range=WINDOW, cache="ram", num_workers=0)
    data.in_channels = 1
    # configs/pretrain/demo_ct.yaml's recipe, resnet18 instead of the small SegResNet, the shipped 3D decoder
    model = SparKPretrain(backbone="resnet18", source="monai", spatial_dims=3, in_channels=1, input_size=roi,
                          mask_ratio=0.6, decoder_width=64, decoder="efficient", compute="auto", optimizer="adamw",
                          lr=0.002, weight_decay=0.04, weight_decay_end=0.2, warmup_epochs=2,
                          figure_every_n_epochs=10**9)
    losses: list[tuple[int, float]] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append((trainer.global_step, float(outputs["loss"])))

    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=3.0,
                         default_root_dir=str(out / "lightning"), callbacks=[Losses()])
    t0 = time.time()
    trainer.fit(model, data)
    seconds = time.time() - t0
    model.save_encoder(out / "encoder.pt")
    first, last = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    result = {"steps": int(trainer.global_step), "crops_per_step": data.crops_per_batch, "seconds": round(seconds, 1),
              "seconds_per_step": round(seconds / max(1, steps), 3),
              "compute": model.model.compute_path(model.model.random_mask(1)),  # the path the run's masks took
              "mask_grid": list(model.model.mask_grid),
              "visible_cells": int(model.model.random_mask(1)[0].sum()),
              "loss_first_10pc": statistics.mean(v for _, v in first),
              "loss_last_10pc": statistics.mean(v for _, v in last)}
    record.write_text(json.dumps(result, indent=1))
    return result


def finetune_data(datalist: Path, roi: list[int], spacing: list[float]):
    """The fine-tuning data module of the labelled phantoms (configs/finetune/demo_ct.yaml's crops), set up."""
    from spark3d.data import SegmentationData

    data = SegmentationData(datalist=str(datalist), num_classes=14, roi_size=roi, num_samples=4, batch_size=1,
                            spacing=spacing, intensity="ct", intensity_range=WINDOW, crop_sampling="classes",
                            cache="ram", num_workers=0)
    data.in_channels = 1
    data.setup("fit")
    return data


def finetune_batches(data, n: int, seed: int) -> list[torch.Tensor]:
    """The first ``n`` batches of fine-tuning crops ``(4, 1, *roi)`` the training loader yields from ``seed``, epoch
    after epoch as Lightning sets them (the same crops for the same arguments)."""
    torch.manual_seed(seed)  # the loader's sampler draws its seed from the global generator
    loader = data.train_dataloader()
    out: list[torch.Tensor] = []
    epoch = 0
    while len(out) < n:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            x = batch["image"]
            out.append(x.as_tensor() if hasattr(x, "as_tensor") else x)
            if len(out) == n:
                break
        epoch += 1
    return out


# ------------------------------------------------------------------------------------------------ statistics
def bn_layers(encoder: nn.Module, keys: set[str]) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The encoder's BatchNorm layers whose running statistics ``encoder.pt`` carries, by their key prefix there."""
    return {name: m for name, m in encoder.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{name}.running_mean" in keys}


def running_stats(layers: dict[str, nn.modules.batchnorm._BatchNorm]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name → (running_mean, running_var)``, copies."""
    return {n: (m.running_mean.detach().clone(), m.running_var.detach().clone()) for n, m in layers.items()}


@torch.no_grad()
def reestimate(encoder: nn.Module, layers: dict, batches: list[torch.Tensor]) -> dict:
    """Dense running statistics: reset each BN, ``momentum=None`` (cumulative average of the batches' statistics),
    train-mode forwards of ``batches``, then the momentum restored. Changes ``encoder``'s BN buffers."""
    momenta = {n: m.momentum for n, m in layers.items()}
    for m in layers.values():
        m.reset_running_stats()
        m.momentum = None
    encoder.train()
    for x in batches:
        encoder(x)
    for n, m in layers.items():
        m.momentum = momenta[n]
    return running_stats(layers)


def gap(pre: tuple[torch.Tensor, torch.Tensor], dense: tuple[torch.Tensor, torch.Tensor], eps: float) -> dict:
    """How far pretrained statistics are from dense ones (see the module docstring, point 3)."""
    (mu_p, var_p), (mu_d, var_d) = [(m.double(), v.double()) for m, v in (pre, dense)]
    log_ratio = torch.log(var_p.clamp_min(1e-12) / var_d.clamp_min(1e-12))
    return {"channels": int(mu_p.numel()),
            "mean_rel_diff": float((mu_p - mu_d).norm() / mu_d.norm().clamp_min(1e-12)),
            "mean_shift_sd": float(((mu_p - mu_d) / (var_d + eps).sqrt()).pow(2).mean().sqrt()),
            "var_abs_log_ratio": float(log_ratio.abs().mean()),
            "var_log_ratio": float(log_ratio.mean())}


def summary(rows: list[dict], key: str) -> dict:
    """Median and max of one figure over the layers, and the layer of the max."""
    top = max(rows, key=lambda r: r[key])
    return {"median": statistics.median(r[key] for r in rows), "max": top[key], "max_layer": top["layer"]}


def set_stats(layers: dict, stats: dict) -> None:
    for n, m in layers.items():
        m.running_mean.copy_(stats[n][0])
        m.running_var.copy_(stats[n][1])


# ------------------------------------------------------------------------------------------------ downstream
@torch.no_grad()
def taps_of(encoder: nn.Module, taps: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The tapped feature maps of one eval-mode encoder forward."""
    got: list[torch.Tensor] = []
    hooks = [encoder.get_submodule(t).register_forward_hook(lambda mod, inp, out: got.append(out)) for t in taps]
    try:
        encoder.eval()
        encoder(x)
    finally:
        for h in hooks:
            h.remove()
    return got


@torch.no_grad()
def downstream(module_pre, module_dense, encoder_pre, encoder_dense, taps: list[str], volumes) -> dict:
    """Relative L2 difference (pretrained vs re-estimated statistics, eval mode) of each tap and of the logits,
    accumulated over the validation volumes."""
    num = {t: 0.0 for t in taps + ["logits"]}
    den = dict(num)
    for x in volumes:
        for t, a, b in zip(taps, taps_of(encoder_pre, taps, x), taps_of(encoder_dense, taps, x)):
            num[t] += float((a - b).double().pow(2).sum())
            den[t] += float(b.double().pow(2).sum())
        module_pre.eval()
        module_dense.eval()
        a, b = module_pre.sliding_window(x), module_dense.sliding_window(x)
        num["logits"] += float((a - b).double().pow(2).sum())
        den["logits"] += float(b.double().pow(2).sum())
    return {t: math.sqrt(num[t] / den[t]) if den[t] > 0 else float("nan") for t in num}


@torch.no_grad()
def washout(encoder: nn.Module, layers: dict, pre: dict, dense: dict, batches: list[torch.Tensor], k: int) -> list[dict]:
    """Train-mode forwards at the layers' own momentum from two starts (pretrained, dense estimate) on the same
    batches; per recorded step, over layers: the distance of each chain to the dense estimate (median) and the
    measured weight of the pretrained start (max over layers, mean and var) against ``(1 − m)^j``."""
    momentum = next(iter(layers.values())).momentum
    chains = {}
    for start, stats in (("pretrained", pre), ("dense", dense)):
        set_stats(layers, stats)
        encoder.train()
        states = [running_stats(layers)]
        for x in batches:
            encoder(x)
            states.append(running_stats(layers))
        chains[start] = states
    shown = sorted({j for j in (*STEPS_SHOWN, k, len(batches)) if j <= len(batches)})
    eps = next(iter(layers.values())).eps
    out = []
    for j in shown:
        row: dict = {"step": j, "predicted_weight": (1 - momentum) ** j}
        for start in chains:
            gaps = [gap(chains[start][j][n], dense[n], eps) for n in layers]
            row[f"{start}_start"] = {"mean_rel_diff": statistics.median(g["mean_rel_diff"] for g in gaps),
                                     "var_abs_log_ratio": statistics.median(g["var_abs_log_ratio"] for g in gaps)}
        weights_mean, weights_var = [], []
        for n in layers:
            (ma, va), (mb, vb) = chains["pretrained"][j][n], chains["dense"][j][n]
            weights_mean.append(float((ma - mb).double().norm() / (pre[n][0] - dense[n][0]).double().norm()))
            weights_var.append(float((va - vb).double().norm() / (pre[n][1] - dense[n][1]).double().norm()))
        row["measured_weight_mean"] = max(weights_mean)
        row["measured_weight_var"] = max(weights_var)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ decision
def shipped_validation() -> dict:
    """``check_val_every_n_epoch`` and the batch size of every shipped fine-tuning config."""
    import yaml

    out = {}
    for path in sorted((ROOT / "configs" / "finetune").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        every = (cfg.get("trainer") or {}).get("check_val_every_n_epoch")
        if every is not None:
            out[path.name] = {"check_val_every_n_epoch": int(every),
                              "batch_size": int(cfg["data"]["init_args"].get("batch_size", 1))}
    return out


def decide(k: int, momentum: float, stats: dict, features: dict, wash: list[dict], configs: dict) -> str:
    """The decision, in words, from the measured figures."""
    at_k = next(r for r in wash if r["step"] == k) if any(r["step"] == k for r in wash) else wash[-1]
    worst_tap = max((t for t in features if t != "logits"), key=lambda t: features[t])
    if features[worst_tap] < 0.01:
        return (f"no re-estimation needed: eval-mode encoder features with the pretrained statistics differ from "
                f"those with dense ones by at most {features[worst_tap]:.1%} ({worst_tap})")
    checked = at_k["step"] == k and max(at_k["measured_weight_mean"], at_k["measured_weight_var"]) < 0.01
    if not checked:
        return (f"undecided: the washout check did not reach k = {k} steps or the measured weight of the pretrained "
                f"statistics at step {at_k['step']} is {max(at_k['measured_weight_mean'], at_k['measured_weight_var']):.3f}")
    # the first validation comes after E epochs of ceil(N / B) steps: at or after step k once N >= (ceil(k/E)-1)*B+1
    need = {name: (math.ceil(k / c["check_val_every_n_epoch"]) - 1) * c["batch_size"] + 1 for name, c in configs.items()}
    binding = max(need, key=need.get)
    c = configs[binding]
    return (f"no re-estimation at load time for fine-tuning: the pretrained statistics differ from dense ones (mean "
            f"shift median {stats['mean_shift_sd']['median']:.2f} dense sd, max {stats['mean_shift_sd']['max']:.2f} in "
            f"{stats['mean_shift_sd']['max_layer']}; eval-mode features differ by up to {features[worst_tap]:.0%} in "
            f"{worst_tap}), but train-mode fine-tuning normalises with batch statistics and never reads them, and "
            f"momentum {momentum:g} leaves them under 1 % weight after k = {k} steps (measured "
            f"{max(at_k['measured_weight_mean'], at_k['measured_weight_var']):.4f}); every shipped fine-tuning config "
            f"validates first at or after step {k} once its dataset has >= {need[binding]} training cases (the "
            f"tightest: {binding}, every {c['check_val_every_n_epoch']} epochs at batch {c['batch_size']}). "
            f"Re-estimate only where encoder.pt's encoder runs in eval mode without {k} train-mode steps first "
            f"(feature extraction, an eval-mode probe, a validation before step {k})")


# ------------------------------------------------------------------------------------------------ main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "bn_stats.json")
    p.add_argument("--work", type=Path, default=Path("runs/bn_stats"), help="phantoms and the run (reused)")
    p.add_argument("--steps", type=int, default=150, help="SparK pretraining steps (4 crops each)")
    p.add_argument("--seed", type=int, default=0, help="pretraining, crop order and network initialisation")
    p.add_argument("--unlabelled", type=int, default=8, help="phantoms of the pretraining pool")
    p.add_argument("--labelled", type=int, default=4, help="labelled phantoms the fine-tuning crops come from")
    p.add_argument("--val", type=int, default=2, help="validation phantoms (the eval-mode comparison)")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 48], help="phantom size in voxels")
    p.add_argument("--roi", type=int, nargs=3, default=[64, 64, 64], help="crop size (a multiple of 32)")
    p.add_argument("--spacing", type=float, default=4.0, help="isotropic spacing in mm")
    p.add_argument("--estimate-batches", type=int, default=32, help="fine-tuning batches for the dense estimate")
    p.add_argument("--washout-steps", type=int, default=60, help="train-mode steps of the washout check")
    return p.parse_args(argv)


def run_dir(args: argparse.Namespace) -> Path:
    """The pretraining run's folder: its settings in its name (a changed setting never reuses another run)."""
    return args.work / (f"pretrain_resnet18_steps{args.steps}_seed{args.seed}_n{args.unlabelled}_"
                        f"{'x'.join(map(str, args.shape))}_roi{'x'.join(map(str, args.roi))}_sp{args.spacing:g}")


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    words = sys.argv[1:] if argv is None else list(argv)
    with quiet(threads=1):  # for this call only: the tests run main in-process
        return _measure(args, words, time.time())


def _measure(args: argparse.Namespace, words: list[str], started: float) -> dict:
    """Everything :func:`main` promises, with ``args`` parsed from ``words`` (``started``: the wall clock at the call)."""
    from spark3d.checkpoint import read_encoder
    from spark3d.networks import encoder_module_of
    from spark3d.provenance import write_result
    from spark3d.train import SegmentationModule

    spacing = [args.spacing] * 3
    unlabelled = phantoms(args.work, "unlabelled", args.unlabelled, 0, args.shape, UNLABELLED_SEED)
    labelled = phantoms(args.work, "labelled", args.labelled, args.val, args.shape, LABELLED_SEED)
    out = run_dir(args)
    run = pretrain(unlabelled, out, args.steps, args.seed, args.roi, spacing)
    encoder_file = out / "encoder.pt"
    state, meta = read_encoder(encoder_file)

    torch.manual_seed(args.seed)  # the decoder's initialisation (the same in both networks: a copy)
    module_pre = SegmentationModule(backbone="resnet18", source="monai", spatial_dims=3, in_channels=1,
                                    num_classes=14, pretrained=str(encoder_file), roi_size=args.roi, sw_overlap=0.25,
                                    sw_batch_size=4)
    module_dense = copy.deepcopy(module_pre)
    encoder_pre, _ = encoder_module_of(module_pre.network, module_pre.spec)
    encoder_dense, _ = encoder_module_of(module_dense.network, module_dense.spec)
    layers_pre, layers_dense = bn_layers(encoder_pre, set(state)), bn_layers(encoder_dense, set(state))
    pre = running_stats(layers_pre)
    assert all(torch.equal(pre[n][0], state[f"{n}.running_mean"]) for n in pre), "encoder.pt did not load"

    data = finetune_data(labelled, args.roi, spacing)
    batches = finetune_batches(data, args.estimate_batches + args.washout_steps, args.seed)
    estimate, chain = batches[: args.estimate_batches], batches[args.estimate_batches:]
    dense = reestimate(encoder_dense, layers_dense, estimate)
    torch.save({n: {"running_mean": m, "running_var": v} for n, (m, v) in dense.items()}, args.work / "bn_dense.pt")

    eps = next(iter(layers_pre.values())).eps
    rows = [{"layer": n, **gap(pre[n], dense[n], eps)} for n in layers_pre]
    stats = {key: summary(rows, key) for key in ("mean_rel_diff", "mean_shift_sd", "var_abs_log_ratio")}
    volumes = [b["image"].as_tensor() if hasattr(b["image"], "as_tensor") else b["image"]
               for b in data.val_dataloader()]
    features = downstream(module_pre, module_dense, encoder_pre, encoder_dense, list(meta["taps"]), volumes)

    momenta = {m.momentum for m in layers_pre.values()}
    assert len(momenta) == 1 and None not in momenta, f"encoder BN momenta {momenta}: one momentum expected"
    momentum = momenta.pop()
    k = math.ceil(math.log(0.01) / math.log(1 - momentum))
    probe = copy.deepcopy(encoder_pre)  # the washout runs on a copy: the chains move its statistics
    wash = washout(probe, bn_layers(probe, set(state)), pre, dense, chain, k)
    configs = shipped_validation()
    payload = {
        "network": "resnet18 (MONAI ResNetFeatures, 3D), fine-tuned as a FlexibleUNet",
        "settings": {"roi": args.roi, "spacing_mm": spacing, "window_hu": list(WINDOW), "mask_ratio": 0.6,
                     "phantoms": {"unlabelled": args.unlabelled, "labelled": args.labelled, "validation": args.val,
                                  "shape": args.shape, "variation": "wide",
                                  "seeds": {"unlabelled": UNLABELLED_SEED, "labelled": LABELLED_SEED}},
                     "seed": args.seed, "estimate_batches": args.estimate_batches,
                     "estimate_crops": sum(int(b.shape[0]) for b in estimate), "washout_steps": len(chain),
                     "crops_per_step": int(batches[0].shape[0]), "validation_volumes": [list(v.shape[2:]) for v in volumes]},
        "pretraining": run,
        "bn_layers": len(rows),
        "per_layer": rows,
        "summary": stats,
        "eval_features_rel_l2": features,
        "washout": {"momentum": momentum, "k_under_1pc": k, "steps": wash},
        "shipped_validation": configs,
        "decision": decide(k, momentum, stats, features, wash, configs),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.json, payload, ["python", "benchmarks/bn_stats.py", *words], started)
    return payload


if __name__ == "__main__":
    result = main()
    print(json.dumps({k: result[k] for k in ("summary", "eval_features_rel_l2", "decision")}, indent=1))

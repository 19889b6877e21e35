"""MONAI bundle export: a fine-tuned segmentation model as a bundle that runs with MONAI alone (no spark3d).

The bundle holds ``configs/metadata.json``, ``configs/inference.json`` (the preprocessing, sliding window
and post-processing of ``spark3d predict``, written as MONAI components), ``models/model.pt`` (the
network's state dict), ``models/model.ts`` where the network compiles to TorchScript, ``docs/README.md``
and ``LICENSE``. ``python -m monai.bundle run --config_file DIR/configs/inference.json --dataset_dir X
--output_dir Y`` writes ``<case>_seg.nii.gz`` label maps equal to ``spark3d predict``'s.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import monai
import numpy as np
import torch

from ..version import __version__
from ..backbones import segmentation_network_definition
from ..checkpoint import read_lightning_checkpoint
from ..data.segmentation import SegmentationData
from ..errors import ConfigError, DataError
from ..inference import load_checkpoint

__all__ = ["SCHEMA_URL", "preprocessing_config", "inference_config", "bundle_metadata", "export_bundle"]

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
BUNDLE_VERSION = "0.1.0"
_FOREGROUND = {"ct": "$lambda x: x > 0", "mri": "$lambda x: x != 0"}  # what ct_preprocess crops to


def _package_version(name: str, fallback: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return fallback


def preprocessing_config(data: SegmentationData) -> list[dict[str, Any]]:
    """The inference preprocessing of ``data`` (``SegmentationData.preprocess(keys=("image",), pad=False)``) as
    MONAI config components. Raises RuntimeError if spark3d's chain has steps this writer does not know."""
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": None},
    ]
    source = ["LoadVolumed", "Orientationd"]
    if data.spacing is not None:
        steps.append({"_target_": "Spacingd", "keys": "image", "pixdim": list(data.spacing), "mode": "bilinear"})
        source.append("Spacingd")
    if data.intensity == "ct":
        lo, hi = data.intensity_range
        steps.append({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi, "b_min": 0.0,
                      "b_max": 1.0, "clip": True})
        source.append("ScaleIntensityRanged")
    else:
        steps.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True})
        source.append("NormalizeIntensityd")
    steps.append({"_target_": "CropForegroundd", "keys": "image", "source_key": "image",
                  "select_fn": _FOREGROUND[data.intensity], "allow_smaller": True, "margin": 2})
    source.append("CropForegroundd")
    used = [type(t).__name__ for t in data.preprocess(keys=("image",), track_meta=True, pad=False).flatten().transforms]
    if used != source:
        raise RuntimeError(f"spark3d's inference preprocessing is {used}, the bundle writer mirrors {source}: "
                           "update spark3d/export/bundle.py")
    return steps


def inference_config(module, data: SegmentationData, network_def: dict[str, Any]) -> dict[str, Any]:
    """``configs/inference.json``: ``spark3d predict``'s pipeline as MONAI components (``dataset_dir``,
    ``output_dir`` and ``bundle_root`` are overridable on the ``monai.bundle run`` command line)."""
    hp = module.hparams
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) "
                    "+ glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_config(data)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [int(s) for s in hp.roi_size],
                    "sw_batch_size": int(hp.sw_batch_size), "overlap": float(hp.sw_overlap), "mode": hp.sw_mode},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_ext": ".nii.gz", "output_dtype": "$np.uint8", "resample": False, "separate_folder": False,
             "print_log": False},
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }


def _tensor_format(kind: str, fmt: str, channels: int, shape: list[int], value_range: list, channel_def: dict,
                   modality: str = "n/a") -> dict[str, Any]:
    """A tensor format specifier with every key the MONAI Bundle Specification requires (modality default "n/a")."""
    return {"type": kind, "format": fmt, "modality": modality, "num_channels": channels, "spatial_shape": shape,
            "dtype": "float32", "value_range": value_range, "is_patch_data": True, "channel_def": channel_def}


def bundle_metadata(module, data: SegmentationData, label_names: list[str], summary: Mapping[str, Any] | None,
                    training: Mapping[str, Any]) -> dict[str, Any]:
    """``configs/metadata.json``: versions, task, the network's inputs and outputs, label names, provenance."""
    hp, spec = module.hparams, module.spec
    ct = data.intensity == "ct"
    roi = [int(s) for s in hp.roi_size]
    organs = ", ".join(label_names[1:])
    image_def = {str(c): f"image channel {c}" for c in range(spec.in_channels)} if spec.in_channels > 1 else {"0": "image"}
    packages = {"nibabel": _package_version("nibabel", "5.0"),
                "pytorch-ignite": _package_version("pytorch-ignite", "0.4.11")}
    window = f"HU window {data.intensity_range[0]:g}..{data.intensity_range[1]:g} scaled to [0, 1]" if ct else \
        "z-scored per channel over non-zero voxels"
    meta: dict[str, Any] = {
        "schema": SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by spark3d {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": packages,
        "name": f"spark3d {spec.name} segmentation",
        "task": f"{spec.spatial_dims}D segmentation of {len(label_names) - 1} structures from {'CT' if ct else 'MRI'}",
        "description": (f"A MONAI {network_class(module)} fine-tuned with spark3d"
                        f"{' from a SparK-pretrained encoder' if hp.pretrained else ''}; segments {organs}."),
        "authors": "spark3d",
        "copyright": "Copyright (c) the spark3d authors",
        "data_source": training.get("data", "see docs/README.md"),
        "data_type": "nibabel",
        "image_classes": f"{spec.in_channels} channel(s), {window}",
        "label_classes": "; ".join(f"{i} is {n}" for i, n in enumerate(label_names)),
        "pred_classes": f"{len(label_names)} channels of logits (one per class); the label is the largest channel",
        "intended_use": "Research and demonstration only; not for clinical use",
        "references": ["Tian et al., Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked "
                       "Modeling, ICLR 2023. https://arxiv.org/abs/2301.03580"],
        "network_data_format": {
            "inputs": {"image": _tensor_format("image", "hounsfield" if ct else "magnitude", int(spec.in_channels), roi,
                                               [0, 1] if ct else [], image_def, "CT" if ct else "MR")},
            "outputs": {"pred": _tensor_format("image", "labels", len(label_names), roi, [],
                                               {str(i): n for i, n in enumerate(label_names)})},
        },
        "spark3d": {"version": __version__, "backbone": spec.name, "source": spec.source,
                    "backbone_kwargs": dict(spec.kwargs), **{k: v for k, v in training.items() if k != "data"}},
    }
    if summary and summary.get("mean_dice") is not None:
        meta["eval_metrics"] = {"mean_dice": round(float(summary["mean_dice"]), 4)}
    return meta


def network_class(module) -> str:
    """The class name of the fine-tuning network (``SegResNet``, ``FlexibleUNet``, …)."""
    return type(module.network).__name__


def _readme(module, data: SegmentationData, meta: dict[str, Any], summary: Mapping[str, Any] | None,
            scripted: str | None) -> str:
    hp, io = module.hparams, meta["network_data_format"]
    sp = meta["spark3d"]
    lines = [f"# {meta['name']}", "", meta["description"], "",
             "Exported by spark3d `export-bundle`; runs with MONAI alone (no spark3d needed).", "",
             "## Run it", "", "```bash",
             "pip install monai nibabel pytorch-ignite fire",
             "python -m monai.bundle run --config_file configs/inference.json \\",
             "    --dataset_dir /path/to/images --output_dir /path/to/labels     # from this folder",
             "# elsewhere: add --bundle_root /path/to/this/bundle", "```", "",
             "Every `*.nii` / `*.nii.gz` in `dataset_dir` gives `<case>_seg.nii.gz` (uint8 labels, the input's shape "
             "and affine), the same label map as `spark3d predict`.", "",
             "## Data", "", f"- training data: {meta['data_source']}",
             f"- input: {meta['image_classes']}, oriented RAS, resampled to "
             f"{'x'.join(f'{s:g}' for s in data.spacing) + ' mm' if data.spacing else 'the native spacing'}, "
             "cropped to the body (foreground), sliding windows of "
             f"{'x'.join(str(s) for s in io['inputs']['image']['spatial_shape'])} voxels "
             f"(overlap {hp.sw_overlap:g}, {hp.sw_mode} blending)",
             f"- labels: {meta['label_classes']}", "",
             "## Training recipe", "",
             f"- network: MONAI `{network_class(module)}` ({sp['backbone']}, {sp['backbone_kwargs'] or 'defaults'}), "
             f"{len(io['outputs']['pred']['channel_def'])} output channels",
             f"- encoder: {'SparK-pretrained (' + Path(str(hp.pretrained)).name + ')' if hp.pretrained else 'random init'}",
             f"- fine-tuning: DiceCE, AdamW lr {hp.lr:g}, weight decay {hp.weight_decay:g}, warm-up {hp.warmup_epochs:g} "
             f"epochs then cosine; crops {'x'.join(str(s) for s in data.roi_size)} x{data.num_samples} per volume "
             f"({data.crop_sampling} sampling), batch {data.batch_size}; "
             f"trained for {sp.get('global_step', '?')} optimiser steps ({sp.get('epoch', '?')} epochs)", ""]
    lines += ["## Evaluation", ""]
    if summary and summary.get("per_organ"):
        lines += [f"Dice per structure on {summary.get('cases', '?')} '{summary.get('split', 'validation')}' case(s), "
                  "at the original resolution (`spark3d evaluate`):", "", "| structure | Dice | cases |", "|---|---|---|"]
        for organ, v in summary["per_organ"].items():
            dice = "-" if v.get("mean") is None else f"{v['mean']:.3f}"
            lines.append(f"| {organ} | {dice} | {v.get('cases', '')} |")
        if summary.get("mean_dice") is not None:
            lines.append(f"| **mean** | **{summary['mean_dice']:.3f}** | |")
    else:
        lines.append("No evaluation was given (run `spark3d evaluate … --out E`, then `export-bundle … "
                     "--summary E/summary.json`).")
    lines += ["", "## Files", "", "- `configs/metadata.json`, `configs/inference.json`",
              "- `models/model.pt`: the network's state dict (`network_def` in `inference.json` builds the network)",
              "- `models/model.ts`: " + ("TorchScript, with the metadata embedded" if scripted is None
                                          else "absent: " + scripted),
              "", "## Intended use", "", meta["intended_use"] + ".", ""]
    return "\n".join(lines)


_LICENSE = """MIT License

Copyright (c) the spark3d authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and the model
weights in this bundle (the "Software"), to deal in the Software without restriction, including without
limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the
Software, and to permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions
of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO
THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
DEALINGS IN THE SOFTWARE. THE MODEL IS NOT A MEDICAL DEVICE AND IS NOT FOR CLINICAL USE.
"""


_LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _script(network: torch.nn.Module, roi: list[int], in_channels: int) -> tuple[Any, str | None]:
    """TorchScript of the network when it compiles and computes what the eager network computes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(network)
    except Exception as err:  # TorchScript refuses many constructs; the bundle then has model.pt only
        return None, f"{type(network).__name__} does not compile to TorchScript ({str(err).strip().splitlines()[0][:120]})"
    x = torch.rand(1, in_channels, *roi, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.allclose(scripted(x), network(x), atol=1e-5, rtol=1e-4)
    return (scripted, None) if same else (None, "the TorchScript network computed other values than the eager one")


def _label_names(data: SegmentationData, num_classes: int) -> list[str]:
    try:
        names = data.read_label_names()
    except DataError as err:
        print(f"spark3d export-bundle: note: labels named class0..class{num_classes - 1} ({err})", file=sys.stderr)
        names = [f"class{i}" for i in range(num_classes)]
    return ["background" if i == 0 and n == "class0" else n for i, n in enumerate(names)]


def _training_facts(module, data: SegmentationData, ckpt_path: str) -> dict[str, Any]:
    ckpt = read_lightning_checkpoint(ckpt_path)
    facts: dict[str, Any] = {"checkpoint": Path(ckpt_path).name, "global_step": int(ckpt.get("global_step", 0)),
                             "epoch": int(ckpt.get("epoch", 0)) + 1,
                             "pretrained_encoder": None}
    if module.hparams.pretrained:
        facts["pretrained_encoder"] = Path(module.hparams.pretrained).name
    try:
        listing = json.loads(Path(data.datalist).read_text())
        facts["data"] = (f"{listing.get('name', Path(data.datalist).name)}: {listing.get('description', '')} "
                         f"({len(listing.get(data.train_key, []))} training, "
                         f"{len(listing.get(data.val_key or '', []))} validation cases)").replace(":  (", " (")
    except (OSError, json.JSONDecodeError):
        facts["data"] = str(data.datalist)
    return facts


BUNDLE_FILES = ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "models/model.pt",
                "models/model.ts", "docs/README.md", "LICENSE")  # what export_bundle writes


def _prepare_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    meta = out / "configs" / "metadata.json"
    try:
        ours = meta.is_file() and "spark3d" in json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        ours = False
    if out.is_file() or (any(out.iterdir()) and not ours):
        raise ConfigError(f"--out {out} exists and is not a spark3d bundle: choose another folder or remove it")
    if ours and not overwrite:
        raise ConfigError(f"--out {out} already holds a spark3d bundle: pass --overwrite true to replace it, or choose "
                          "another folder")


def export_bundle(module, data: SegmentationData, ckpt_path: str | None, out: str | Path,
                  summary: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the MONAI bundle of a fine-tuned checkpoint to ``out`` (an earlier spark3d bundle there only with
    ``overwrite``: its files are replaced, any other file in it is kept).

    ``module`` is the fine-tuning config's ``SegmentationModule`` and ``data`` its ``SegmentationData``;
    ``summary`` is an optional ``spark3d evaluate`` ``summary.json`` for the Dice table. Nothing is written
    when the network, the checkpoint or the summary is refused.
    """
    out = Path(out)
    _prepare_out(out, overwrite)
    num_classes = int(module.hparams.num_classes)
    definition = segmentation_network_definition(module.spec, num_classes)
    if definition is None:
        raise ConfigError(f"export-bundle: the {module.spec.describe()} fine-tuning network needs spark3d code to build; "
                          "bundles run with MONAI alone: use a MONAI backbone (segresnet, dynunet, mednext, resnet10..50)")
    summary_data = None
    if summary is not None:
        try:
            summary_data = json.loads(Path(summary).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"--summary {summary}: cannot read a spark3d evaluate summary.json ({err})") from None
    load_checkpoint(module, ckpt_path)
    network = module.network.cpu().eval()
    from monai.bundle import ConfigParser

    rebuilt = ConfigParser({"network_def": definition}).get_parsed_content("network_def")
    rebuilt.load_state_dict(network.state_dict())  # strict: the definition builds this very network
    names = _label_names(data, num_classes)
    meta = bundle_metadata(module, data, names, summary_data, _training_facts(module, data, str(ckpt_path)))
    config = inference_config(module, data, definition)
    scripted, no_script = _script(network, [int(s) for s in module.hparams.roi_size], int(module.spec.in_channels))

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for sub in ("configs", "models", "docs"):
            (stage / sub).mkdir()
        (stage / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
        (stage / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
        (stage / "configs" / "logging.conf").write_text(_LOGGING)
        torch.save(network.state_dict(), stage / "models" / "model.pt")
        if scripted is not None:
            from monai.data import save_net_with_metadata

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save's deprecation notice
                save_net_with_metadata(scripted, str(stage / "models" / "model.ts"), include_config_vals=False,
                                       meta_values=meta,
                                       more_extra_files={"inference.json": json.dumps(config).encode()})
        (stage / "docs" / "README.md").write_text(_readme(module, data, meta, summary_data, no_script))
        (stage / "LICENSE").write_text(_LICENSE)
        if out.exists():
            for path in sorted(p for p in out.rglob("*") if p.is_file()):  # the user's files move into the new bundle
                rel = path.relative_to(out)
                if rel.as_posix() not in BUNDLE_FILES and not (stage / rel).exists():
                    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, stage / rel)
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if no_script:
        print(f"spark3d export-bundle: note: no models/model.ts: {no_script}", file=sys.stderr)
    return out

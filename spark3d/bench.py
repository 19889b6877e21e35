"""What ``spark3d benchmark`` measures: step time, peak memory and FLOPs by part, for dense / masked modes.

For one pretraining method on one network (from a pretraining config, or a backbone-table name)
and one fixed input, each mode is measured the same way, with a fresh mask every repeat (as training
draws one every step: the per-mask index tables are part of a step; their build time is reported as
``setup_s``, the median per repeat):

- ``dense``: the method's networks with nothing masked (:meth:`forward_encoder` / :meth:`forward_decoder`
  with ``mask=None``, MSE on every pixel): the cost a dense network would have;
- each of the method's :meth:`~spark3d.methods.common.MaskedModelingMethod.compute_modes` (SparK:
  ``masked-dense``, the reference, and ``sparse``): a masked step as training runs it.

``scope="step"`` times forward + backward of the whole method (loss included), ``scope="encoder"``
the encoder alone (forward + backward of a sum of squares of its features). Times are medians
after warm-up, with the modes interleaved so a shared machine disturbs them alike. Peak memory is
CUDA's peak allocated memory on a GPU; on a CPU it is the peak resident-memory growth of one step,
measured in a fresh process per mode (after a warm-up step, with large allocations returned to the
system at once, so the numbers of different modes are comparable). FLOPs are forward FLOPs per
sample (``torch.utils.flop_counter``), split into the encoder and densify + decoder.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .backbones import BackboneSpec
from .errors import ConfigError
from .methods import MaskedModelingMethod, build_method
from .provenance import machine

__all__ = ["BenchmarkSpec", "ModeResult", "build", "measure", "format_table", "machine"]

_MODULE_CLASSES = ("spark3d.train.SparKPretrain", "spark3d.train.pretrain.SparKPretrain",
                   "spark3d.train.PretrainModule", "spark3d.train.pretrain.PretrainModule")


@dataclass
class BenchmarkSpec:
    """What to build: a pretraining config (``config``), or a method over a backbone-table network."""

    config: str | None = None
    method: str = "spark"
    backbone: str = "segresnet"
    source: str = "monai"
    spatial_dims: int = 3
    in_channels: int = 1
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: list[int] | None = None  # one value per axis, or one value for every axis
    batch: int | None = None
    mask_ratio: float | None = None
    method_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class ModeResult:
    """One mode's numbers (times in seconds, memory in MB, forward GFLOP per sample)."""

    mode: str
    times: list[float]
    median_s: float
    samples_per_s: float
    peak_mb: float | None
    encoder_gflop: float
    decoder_gflop: float
    error: str | None = None
    setup_s: float | None = None  # median seconds per step building the mask's index tables (sparse path)
    setup_times: list[float] = field(default_factory=list)


def build(spec: BenchmarkSpec) -> tuple[MaskedModelingMethod, int, tuple[int, ...], str]:
    """The method, batch size, input size and a one-line description the spec names (a ConfigError otherwise)."""
    if spec.config:
        import yaml

        path = Path(spec.config)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        config = yaml.safe_load(path.read_text()) or {}
        model, data = config.get("model") or {}, (config.get("data") or {}).get("init_args") or {}
        if model.get("class_path") not in _MODULE_CLASSES:
            raise ConfigError(f"{path}: model.class_path must be one of {_MODULE_CLASSES[::2]}, "
                              f"got {model.get('class_path')!r}")
        kwargs = dict(model.get("init_args") or {})
        default = data.get("roi_size") or kwargs.get("input_size")
        size = spec.input_size or default
        if size is None:
            raise ConfigError(f"{path}: no data.init_args.roi_size; pass --size")
        dims = len(default) if default else int(kwargs.get("spatial_dims", 3))
        kwargs["input_size"] = _per_axis(size, dims)
        if spec.mask_ratio is not None:
            kwargs["mask_ratio"] = spec.mask_ratio
        from .train import pretrain  # the Lightning module builds the method exactly as training does

        cls = pretrain.SparKPretrain if model["class_path"].endswith("SparKPretrain") else pretrain.PretrainModule
        if cls is pretrain.SparKPretrain:
            kwargs.update(spec.method_args)
        else:
            kwargs["method_args"] = {**dict(kwargs.get("method_args") or {}), **spec.method_args}
        try:
            method = cls(**kwargs).model
        except TypeError as err:
            raise ConfigError(f"{path}: model.init_args: {err}") from None
        batch = spec.batch or int(data.get("batch_size", 1)) * int(data.get("num_samples", 1))
        name = f"{path.stem} ({kwargs.get('backbone', '?')})"
    else:
        bb = BackboneSpec(spec.backbone, spec.source, spec.spatial_dims, spec.in_channels, dict(spec.backbone_kwargs))
        size = _per_axis(spec.input_size or ([224] if spec.spatial_dims == 2 else [96]), spec.spatial_dims)
        ratio = spec.mask_ratio if spec.mask_ratio is not None else (0.6 if spec.spatial_dims == 2 else 0.75)
        try:
            method = build_method(spec.method, bb, size, ratio, **spec.method_args)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        batch = spec.batch or 2
        name = bb.describe()
    return method, batch, tuple(method.input_size), name


def _per_axis(size: Sequence[int], dims: int) -> list[int]:
    """One value per axis: a single value is repeated for every axis."""
    return list(size) * dims if len(size) == 1 else list(size)


# ------------------------------------------------------------------------------------ one step
def _inputs(method: MaskedModelingMethod, batch: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    channels = _in_channels(method)
    x = torch.randn(batch, channels, *method.input_size, generator=gen).to(device)
    mask = method.random_mask(batch, generator=gen).to(device)
    return x, mask


def _in_channels(method: MaskedModelingMethod) -> int:
    encoder = getattr(method, "encoder", None)
    return int(getattr(encoder, "in_channels", getattr(method, "in_channels", 1)))


def _step(method: MaskedModelingMethod, mode: str, scope: str, x: torch.Tensor, mask: torch.Tensor) -> Callable:
    """A callable running one forward + backward of ``mode`` (parameters' grads cleared first), under ``mask`` or
    the mask it is given."""

    def features_loss(latent) -> torch.Tensor:
        tensors = latent if isinstance(latent, (list, tuple)) else [latent]
        return sum(t.float().pow(2).mean() for t in tensors)

    def run(step_mask: torch.Tensor | None = None) -> None:
        mask_now = mask if step_mask is None else step_mask
        method.zero_grad(set_to_none=True)
        if mode == "dense":
            latent = method.forward_encoder(x, None)
            loss = features_loss(latent) if scope == "encoder" else \
                (method.forward_decoder(latent, None).float() - x.float()).pow(2).mean()
        else:
            with method.computing(mode):
                loss = features_loss(method.forward_encoder(x, mask_now)) if scope == "encoder" else \
                    method(x, mask=mask_now).loss
        loss.backward()

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flops(method: MaskedModelingMethod, mode: str, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Forward GFLOP per sample of the encoder and of densify + decoder, in ``mode``."""
    from torch.utils.flop_counter import FlopCounterMode

    m = None if mode == "dense" else mask
    ctx = contextlib.nullcontext() if mode == "dense" else method.computing(mode)
    with torch.no_grad(), ctx:
        with FlopCounterMode(display=False) as enc:
            latent = method.forward_encoder(x, m)
        with FlopCounterMode(display=False) as dec:
            method.forward_decoder(latent, m)
    return enc.get_total_flops() / 1e9 / x.shape[0], dec.get_total_flops() / 1e9 / x.shape[0]


def _peak_memory_here(step: Callable, device: torch.device) -> float:
    """Peak memory (MB) of one call of ``step``: CUDA peak allocated, or peak RSS growth on CPU (Linux)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    import gc

    gc.collect()
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current RSS
    step()
    return (_status_kb("VmHWM") - base) / 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _memory_in_subprocess(spec: BenchmarkSpec, mode: str, scope: str, threads: int) -> float | None:
    """Peak RSS growth of one ``mode`` step in a fresh process (large blocks returned to the OS when freed)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    job = json.dumps({"spec": asdict(spec), "mode": mode, "scope": scope, "threads": threads})
    done = subprocess.run([sys.executable, "-m", "spark3d.bench", job], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of mode {mode} failed:\n{done.stderr.strip()[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


# ------------------------------------------------------------------------------------ the benchmark
def measure(spec: BenchmarkSpec, modes: list[str] | None = None, scope: str = "step", repeats: int = 3,
                  warmup: int = 1, memory: bool = True, threads: int | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every mode (see the module docstring); returns a JSON-able report with ratios."""
    if threads:
        torch.set_num_threads(threads)
    if scope not in ("step", "encoder"):
        raise ConfigError(f"scope must be 'step' or 'encoder', got '{scope}'")
    torch.manual_seed(spec.seed)
    method, batch, size, name = build(spec)
    spec.batch = batch
    known = ["dense", *method.compute_modes()]
    modes = modes or known
    unknown = [m for m in modes if m not in known]
    if unknown:
        raise ConfigError(f"unknown mode(s) {unknown}; {type(method).__name__} has {known}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method.to(device).train()
    x, mask = _inputs(method, batch, spec.seed, device)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    masks = [method.random_mask(batch, generator=gen).to(device) for _ in range(warmup + repeats)]  # fresh per repeat
    steps = {m: _step(method, m, scope, x, mask) for m in modes}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {m: [] for m in modes}
    setups: dict[str, list[float]] = {m: [] for m in modes}
    say = log or (lambda _: None)
    plan, decision = _plan(method, mask, say)
    for r in range(warmup + repeats):
        for m in modes:
            if m in errors:
                continue
            try:
                _sync(device)
                t0 = time.perf_counter()
                steps[m](masks[r].clone())  # a new tensor: nothing cached from an earlier step
                _sync(device)
                elapsed = time.perf_counter() - t0
            except (ValueError, RuntimeError) as err:
                errors[m] = str(err).splitlines()[0]
                continue
            layout = getattr(method, "last_layout", None)
            ran_sparse = m != "dense" and getattr(method, "last_path", None) == "sparse"
            setup = layout.setup_s if layout is not None and ran_sparse else None
            if hasattr(method, "last_layout"):
                method.last_layout = None
            if r >= warmup:
                times[m].append(elapsed)
                if setup is not None:
                    setups[m].append(setup)
            say(f"  {m:<13} {'warm-up' if r < warmup else f'repeat {r - warmup + 1}'}: {elapsed:.3f} s"
                + (f" (mask setup {setup:.3f} s)" if setup is not None else ""))
    results: dict[str, ModeResult] = {}
    for m in modes:
        if m in errors:
            results[m] = ModeResult(m, [], float("nan"), float("nan"), None, float("nan"), float("nan"), errors[m])
            continue
        enc, dec = _flops(method, m, x, mask)
        peak = None
        if memory:
            peak = _peak_memory_here(steps[m], device) if device.type == "cuda" else \
                _memory_in_subprocess(spec, m, scope, torch.get_num_threads())
            say(f"  {m:<13} peak memory {peak if peak is None else round(peak)} MB")
        med = statistics.median(times[m])
        results[m] = ModeResult(m, times[m], med, batch / med, peak, enc, dec,
                                setup_s=statistics.median(setups[m]) if setups[m] else None, setup_times=setups[m])
    reference = method.compute_modes()[0]
    return {"name": name, "method": type(method).__name__, "input_size": list(size), "batch": batch,
            "mask_ratio": float(method.mask_ratio), "visible_fraction": float(mask[0].float().mean()), "scope": scope,
            "repeats": repeats, "warmup": warmup, "machine": machine(), "spec": asdict(spec),
            "modes": {m: asdict(r) for m, r in results.items()}, "ratios": _ratios(results, reference),
            "fresh_mask_per_repeat": True, "plan": plan, "compute_decision": decision,
            "exactness": "asserted in float64 (perturbed weights, train and eval, features and gradients); float32 "
                         "differences from masked-dense are rounding (about 1e-4 relative in features)"}


def _plan(method: MaskedModelingMethod, mask: torch.Tensor, say: Callable[[str], None]) -> tuple[list[str], str | None]:
    """The sparse path's plan under ``mask`` (one line per converted layer, counts first) and the decision line."""
    if not hasattr(method, "compute_plan"):
        return [], None
    if not hasattr(method, "sparse_check"):  # ConvMAE: its conv part's plan is one dict, no per-layer check
        plan = method.compute_plan(mask)
        decision = f"{plan['path']} ({plan['reason']})"
        say(f"  sparse path: {decision}")
        return [f"{k}: {v}" for k, v in plan.items()], decision
    from .sparse.verify import plan_lines

    try:
        report = method.sparse_check(mask)
    except (ValueError, RuntimeError) as err:
        return [], f"no plan: {str(err).splitlines()[0]}"
    decision = report.reason()
    say(f"  sparse path: {decision}")
    return plan_lines(report.plan), decision


def _ratios(results: dict[str, ModeResult], reference: str) -> dict[str, dict[str, float | None]]:
    """``a/b`` → time, memory and FLOP ratios for every other mode against the reference and against dense."""
    out = {}
    for base in (reference, "dense"):
        for m, r in results.items():
            if m == base or base not in results:
                continue
            b = results[base]
            ratio = lambda u, v: None if u is None or v is None or not v == v or not u == u or v == 0 else u / v  # noqa: E731
            out[f"{m}/{base}"] = {
                "time": ratio(r.median_s, b.median_s), "memory": ratio(r.peak_mb, b.peak_mb),
                "encoder_flops": ratio(r.encoder_gflop, b.encoder_gflop),
                "step_flops": ratio(r.encoder_gflop + r.decoder_gflop, b.encoder_gflop + b.decoder_gflop)}
    return out


def format_table(report: dict[str, Any]) -> str:
    """The human-readable table ``spark3d benchmark`` prints (Markdown)."""
    mach = report["machine"]
    head = (f"{report['name']} · {report['method']} · input {'×'.join(map(str, report['input_size']))} · "
            f"batch {report['batch']} · mask {report['mask_ratio']} (visible {report['visible_fraction']:.3f}) · "
            f"scope {report['scope']} · median of {report['repeats']}\n"
            f"machine: {mach['device']} {mach.get('gpu', mach['processor'])}, {mach['threads']} threads, "
            f"torch {mach['torch']}" + (f", load {mach['load_average']}" if "load_average" in mach else ""))
    ref = next(iter(k.split("/")[1] for k in report["ratios"] if not k.endswith("/dense")), None)
    lines = [head, "", f"| mode | {report['scope']} fwd+bwd s | mask setup s | samples/s | peak MB | encoder GFLOP | "
             f"densify+decoder GFLOP | time / {ref} | memory / {ref} |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p=2: "–" if v is None or v != v else f"{v:.{p}f}"  # noqa: E731
    for m, r in report["modes"].items():
        if r["error"]:
            lines.append(f"| {m} | error: {r['error']} | | | | | | | |")
            continue
        rat = report["ratios"].get(f"{m}/{ref}", {})
        lines.append(f"| {m} | {fmt(r['median_s'], 3)} | {fmt(r.get('setup_s'), 3)} | {fmt(r['samples_per_s'], 2)} | "
                     f"{fmt(r['peak_mb'], 0)} | "
                     f"{fmt(r['encoder_gflop'], 1)} | {fmt(r['decoder_gflop'], 1)} | "
                     f"{fmt(rat.get('time', 1.0 if m == ref else None))} | "
                     f"{fmt(rat.get('memory', 1.0 if m == ref and r['peak_mb'] is not None else None))} |")
    return "\n".join(lines)


def _worker(job_json: str) -> None:
    """Subprocess entry: one warm-up step, then the peak memory of one more (printed as JSON)."""
    job = json.loads(job_json)
    torch.set_num_threads(int(job["threads"]))
    spec = BenchmarkSpec(**job["spec"])
    torch.manual_seed(spec.seed)
    method, batch, _, _ = build(spec)
    method.train()
    x, mask = _inputs(method, batch, spec.seed, torch.device("cpu"))
    step = _step(method, job["mode"], job["scope"], x, mask)
    step()
    print(json.dumps({"peak_mb": _peak_memory_here(step, torch.device("cpu"))}))


if __name__ == "__main__":
    _worker(sys.argv[1])

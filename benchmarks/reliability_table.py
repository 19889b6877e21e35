#!/usr/bin/env python
"""The reliability cases of issue 9, run as a user would: exit code, lines of output, the error line, what was
written or kept. Prints a markdown table (and writes rows.json into the work folder).

    python benchmarks/reliability_table.py [WORK_DIR]      # ~10 min on 2 CPU cores

Every case runs the real command line (``python -m spark3d.cli …``) on synthetic phantoms.
"""
import csv, hashlib, json, os, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

WT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(WT))
from spark3d.data.phantoms import write_btcv_phantoms  # noqa

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="spark3d_reliability_"))
shutil.rmtree(OUT, ignore_errors=True)
OUT.mkdir(parents=True)
MARKER = OUT / "MARKER"
ENV = {**os.environ, "PYTHONPATH": f"{WT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
ROWS = []


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()[:12]


def run(case, argv, note=""):
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "spark3d.cli", *argv], capture_output=True, text=True, env=ENV, cwd=OUT)
    lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
    err = [l for l in lines if " error: " in l or "Traceback" in l]
    row = {"case": case, "rc": p.returncode, "lines": len(lines), "error": err[-1] if err else "",
           "marker": MARKER.exists(), "note": note, "seconds": round(time.time() - t, 1)}
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    return p


data = write_btcv_phantoms(OUT / "data", n_train=3, n_val=1, n_test=2, shape=(64, 64, 32), seed=0)
PRE = ["--config", str(WT / "configs/pretrain/demo_ct.yaml"), "--data.init_args.datalist", str(data),
       "--data.init_args.roi_size", "[32,32,32]", "--data.init_args.batch_size", "1", "--trainer.enable_progress_bar", "false",
       "--model.init_args.figure_every_n_epochs", "100"]
FT = ["--config", str(WT / "configs/finetune/demo_ct.yaml"), "--data.init_args.datalist", str(data),
      "--data.init_args.roi_size", "[32,32,32]", "--data.init_args.batch_size", "1", "--data.init_args.num_samples", "1",
      "--trainer.enable_progress_bar", "false"]

# a good pretraining run and a fine-tuning run (4 epochs, validation every epoch) to work with
run("setup: good pretraining run (4 steps)", ["pretrain", *PRE, "--trainer.max_steps", "4", "--trainer.default_root_dir", str(OUT / "good")])
run("setup: fine-tuning 4 epochs, val every epoch", ["finetune", *FT, "--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "1",
                                                   "--trainer.default_root_dir", str(OUT / "ft")])
ft_last = OUT / "ft/checkpoints/last.ckpt"
c = torch.load(ft_last, weights_only=True)
best = [p.name for p in (OUT / "ft/checkpoints").glob("epoch*.ckpt")]
ROWS.append({"case": "fine-tuning last.ckpt after 4 epochs", "rc": 0, "lines": 0, "error": "",
             "note": f"last.ckpt holds epoch {c['epoch']} step {c['global_step']}; best-Dice checkpoint: {best}"})
print(ROWS[-1], flush=True)

# hostile files
torch.save({"state_dict": {}, "x": Evil()}, OUT / "evil.ckpt")
c["extra"] = Evil()
torch.save(c, OUT / "evil_last.ckpt")
torch.save({"state_dict": {}, "meta": {"x": Evil()}}, OUT / "evil.pt")
inp = data.parent / "RawData/Testing/img"
for name in ("evil.ckpt", "evil_last.ckpt"):
    run(f"evaluate --ckpt_path {name}", ["evaluate", *FT, "--ckpt_path", str(OUT / name), "--out", str(OUT / "eval_evil")],
        f"eval folder written: {(OUT / 'eval_evil').exists()}")
    run(f"predict --ckpt_path {name}", ["predict", *FT, "--ckpt_path", str(OUT / name), "--input", str(inp), "--out", str(OUT / "pred_evil")],
        f"pred folder written: {(OUT / 'pred_evil').exists()}")
run("pretrain --ckpt_path evil.ckpt", ["pretrain", *PRE, "--ckpt_path", str(OUT / "evil.ckpt"), "--trainer.default_root_dir", str(OUT / "p_evil")],
    f"run folder: {(OUT / 'p_evil').exists()}")
run("finetune --ckpt_path evil.ckpt", ["finetune", *FT, "--ckpt_path", str(OUT / "evil.ckpt"), "--trainer.default_root_dir", str(OUT / "f_evil")],
    f"run folder: {(OUT / 'f_evil').exists()}")
run("finetune --model.init_args.pretrained evil.pt", ["finetune", *FT, "--model.init_args.pretrained", str(OUT / "evil.pt"),
                                                     "--trainer.default_root_dir", str(OUT / "f_evil2")])

# NaN and friends
hu = nib.load(data.parent / "RawData/Training/img/img0001.nii.gz")
vol = np.asanyarray(hu.dataobj).astype(np.float32)
nan = vol.copy(); nan[np.random.default_rng(0).random(vol.shape) < 0.05] = np.nan
nib.save(nib.Nifti1Image(nan, hu.affine), OUT / "data/nan.nii.gz")
nib.save(nib.Nifti1Image(np.full(vol.shape, np.nan, np.float32), hu.affine), OUT / "data/allnan.nii.gz")
lists = {}
for name in ("nan", "allnan"):
    d = json.loads(data.read_text()); d["training"] = d["training"][:2] + [{"image": f"{name}.nii.gz", "label": d["training"][2]["label"]}]
    lists[name] = OUT / "data" / f"{name}.json"; lists[name].write_text(json.dumps(d))
run("5% NaN voxels in a pretraining volume", ["pretrain", *PRE, "--data.init_args.datalist", str(lists["nan"]), "--trainer.max_steps", "2",
                                              "--trainer.default_root_dir", str(OUT / "p_nan")], f"run folder: {(OUT / 'p_nan').exists()}")
run("lr 1e6", ["pretrain", *PRE, "--model.init_args.lr", "1e6", "--model.init_args.warmup_epochs", "0", "--trainer.max_steps", "4",
               "--checkpoint_every_n_steps", "1", "--trainer.default_root_dir", str(OUT / "p_lr")])
bad = [k for p in (OUT / "p_lr").rglob("*.ckpt") for k, v in torch.load(p, weights_only=True)["state_dict"].items()
       if v.is_floating_point() and not torch.isfinite(v).all()]
ROWS[-1]["note"] = f"on disk: {sorted(str(p.relative_to(OUT)) for p in (OUT / 'p_lr').rglob('*.*t'))}, non-finite tensors in checkpoints: {len(bad)}"
before = digest(OUT / "good")
run("resume a good run on a datalist with a NaN volume", ["pretrain", *PRE, "--data.init_args.datalist", str(lists["nan"]),
    "--trainer.max_steps", "8", "--ckpt_path", "last", "--trainer.default_root_dir", str(OUT / "good")],
    f"good run folder byte-identical: {digest(OUT / 'good') == before}")
run("an all-NaN volume", ["pretrain", *PRE, "--data.init_args.datalist", str(lists["allnan"]), "--trainer.max_steps", "2",
                          "--trainer.default_root_dir", str(OUT / "p_allnan")])
d = json.loads(data.read_text()); d["validation"] = [{"image": "nan.nii.gz", "label": d["validation"][0]["label"]}]
(OUT / "data/nanval.json").write_text(json.dumps(d))
run("NaN in an evaluate input", ["evaluate", *FT, "--data.init_args.datalist", str(OUT / "data/nanval.json"), "--ckpt_path", str(ft_last),
                                 "--out", str(OUT / "eval_nan")], f"written: {(OUT / 'eval_nan').exists()}")
(OUT / "pin").mkdir()
shutil.copy(inp / "img0061.nii.gz", OUT / "pin/a.nii.gz"); shutil.copy(OUT / "data/nan.nii.gz", OUT / "pin/b_nan.nii.gz")
run("NaN in a predict input", ["predict", *FT, "--ckpt_path", str(ft_last), "--input", str(OUT / "pin"), "--out", str(OUT / "pred_nan")],
    f"written: {(OUT / 'pred_nan').exists()}")

# truncated .nii.gz
raw = (data.parent / "RawData/Training/img/img0002.nii.gz").read_bytes()
(OUT / "data/trunc.nii.gz").write_bytes(raw[: int(len(raw) * 0.6)])
rawdir = OUT / "rawbtcv/RawData"
shutil.copytree(data.parent / "RawData", rawdir)
(rawdir / "Training/img/img0002.nii.gz").write_bytes(raw[: int(len(raw) * 0.6)])
p = subprocess.run([sys.executable, str(WT / "data_prep/btcv.py"), "--raw", str(rawdir), "--out", str(OUT / "prep")], capture_output=True, text=True, env=ENV)
ROWS.append({"case": "truncated .nii.gz: data_prep/btcv.py", "rc": p.returncode, "lines": len(p.stderr.splitlines()) + len(p.stdout.splitlines()),
             "error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "", "note": f"written: {(OUT / 'prep').exists()}"})
print(ROWS[-1], flush=True)
d = json.loads(data.read_text()); d["training"] = [d["training"][0], {"image": "trunc.nii.gz"}]; d["validation"] = []
(OUT / "data/trunc.json").write_text(json.dumps(d))
run("truncated: up-front check", ["pretrain", *PRE, "--data.init_args.datalist", str(OUT / "data/trunc.json"), "--trainer.max_steps", "2",
                                  "--trainer.default_root_dir", str(OUT / "p_tr")], f"run folder: {(OUT / 'p_tr').exists()}")
for w in (0, 2):
    run(f"truncated: mid-run (check header, cache none, {w} workers)", ["pretrain", *PRE, "--data.init_args.datalist", str(OUT / "data/trunc.json"),
        "--data.init_args.check", "header", "--data.init_args.cache", "none", "--data.init_args.num_workers", str(w), "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(OUT / f"p_trw{w}")], f"run folder: {(OUT / f'p_trw{w}').exists()}")
(OUT / "pin2").mkdir()
shutil.copy(inp / "img0061.nii.gz", OUT / "pin2/a.nii.gz"); (OUT / "pin2/b.nii.gz").write_bytes(raw[: int(len(raw) * 0.6)])
run("truncated: predict", ["predict", *FT, "--ckpt_path", str(ft_last), "--input", str(OUT / "pin2"), "--out", str(OUT / "pred_tr")],
    f"written: {(OUT / 'pred_tr').exists()}")

# 2 channels
nib.save(nib.Nifti1Image(np.stack([vol, vol], -1), hu.affine), OUT / "data/two.nii.gz")
d = json.loads(data.read_text()); d["training"] = d["training"][:2] + [{"image": "two.nii.gz", "label": d["training"][2]["label"]}]
(OUT / "data/two.json").write_text(json.dumps(d))
run("a 2-channel volume in a 1-channel config", ["pretrain", *PRE, "--data.init_args.datalist", str(OUT / "data/two.json"),
    "--trainer.max_steps", "2", "--trainer.default_root_dir", str(OUT / "p_two")])

# kill -9 mid-epoch, then --ckpt_path last; against an uninterrupted run
common = ["pretrain", *PRE, "--trainer.max_steps", "6", "--checkpoint_every_n_steps", "1"]
run("uninterrupted reference (6 steps)", [*common, "--trainer.default_root_dir", str(OUT / "ref")])
proc = subprocess.Popen([sys.executable, "-m", "spark3d.cli", *common, "--trainer.default_root_dir", str(OUT / "killed")], env=ENV,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=OUT)
last = OUT / "killed/checkpoints/last.ckpt"
while proc.poll() is None:
    if last.is_file() and torch.load(last, weights_only=True)["global_step"] >= 4:
        proc.send_signal(signal.SIGKILL); break
    time.sleep(0.02)
proc.wait()
step = torch.load(last, weights_only=True)["global_step"]
run("kill -9 mid-epoch, then --ckpt_path last", [*common, "--trainer.default_root_dir", str(OUT / "killed"), "--ckpt_path", "last"])
a, b = torch.load(OUT / "ref/checkpoints/last.ckpt", weights_only=True)["state_dict"], torch.load(last, weights_only=True)["state_dict"]
rel = max(((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-12)).item() for k in a if a[k].is_floating_point())
with (OUT / "killed/metrics.csv").open() as f:
    steps = [int(r["step"]) for r in csv.DictReader(f) if r["train/loss"]]
ROWS[-1]["note"] = (f"killed (rc {proc.returncode}) with last.ckpt at step {step}; final weights vs uninterrupted: max rel {rel:.1e}; "
                    f"metrics.csv train steps {steps}; identical to the reference's: "
                    f"{(OUT / 'killed/metrics.csv').read_text() == (OUT / 'ref/metrics.csv').read_text()}")
print(ROWS[-1], flush=True)

# resume changes
before = digest(OUT / "good")
run("resume with --model.init_args.lr 1e6", ["pretrain", *PRE, "--model.init_args.lr", "1e6", "--trainer.max_steps", "8", "--ckpt_path", "last",
    "--trainer.default_root_dir", str(OUT / "good")], f"folder byte-identical: {digest(OUT / 'good') == before}")
d = json.loads(data.read_text()); d["training"] = d["training"][:2]
(OUT / "data/short.json").write_text(json.dumps(d))
run("resume with a datalist of another length", ["pretrain", *PRE, "--data.init_args.datalist", str(OUT / "data/short.json"),
    "--trainer.max_steps", "8", "--ckpt_path", "last", "--trainer.default_root_dir", str(OUT / "good")],
    f"folder byte-identical: {digest(OUT / 'good') == before}")

# runs never clobber
before = digest(OUT / "good")
run("a fresh run into a finished run's folder", ["pretrain", *PRE, "--trainer.max_steps", "2", "--trainer.default_root_dir", str(OUT / "good")],
    f"folder byte-identical: {digest(OUT / 'good') == before}")
(OUT / "pin3").mkdir()
shutil.copy(inp / "img0061.nii.gz", OUT / "pin3/case.nii.gz")
run("predict --out equal to --input", ["predict", *FT, "--ckpt_path", str(ft_last), "--input", str(OUT / "pin3"), "--out", str(OUT / "pin3")],
    f"input folder now: {sorted(p.name for p in (OUT / 'pin3').iterdir())}")
nib.save(nib.load(OUT / "pin3/case.nii.gz"), OUT / "pin3/case.nii")
run("case.nii and case.nii.gz in one predict folder", ["predict", *FT, "--ckpt_path", str(ft_last), "--input", str(OUT / "pin3"),
    "--out", str(OUT / "pred_coll")], f"written: {(OUT / 'pred_coll').exists()}")
run("2 spacing values for a 3D config", ["pretrain", *PRE, "--data.init_args.spacing", "[1.5, 2.0]", "--trainer.max_steps", "2",
                                         "--trainer.default_root_dir", str(OUT / "p_sp")], f"run folder: {(OUT / 'p_sp').exists()}")
(OUT / "rows.json").write_text(json.dumps(ROWS, indent=1))
print(f"\nthe hostile files' payload ever ran (marker file created): {MARKER.exists()}\n")
print("| case | exit | lines | error line | written / kept |\n|---|---|---|---|---|")
for r in ROWS:
    clean = lambda t: str(t).replace(str(OUT) + "/", "").replace("|", "/")  # noqa: E731
    print(f"| {r['case']} | {r['rc']} | {r['lines']} | {clean(r['error'])} | {clean(r.get('note', ''))} |")

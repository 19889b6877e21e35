"""Where a result came from: the command, the machine, the library versions, the code and the date (one block, every writer).

Every result file behind a README table (``spark3d benchmark --json``, ``benchmarks/*.py --json``, the demo's
``demo.json``) carries :func:`provenance` under the key ``"provenance"``, so a reader can see what ran, where, and
how loaded the machine was.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch

from .version import __version__

__all__ = ["machine", "versions", "provenance", "write_result"]

LIBRARIES = ("torch", "timm", "monai", "pytorch-lightning", "numpy", "nibabel", "dynamic-network-architectures")


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine the numbers were taken on: device, CPU model, cores, torch threads, load average, torch version."""
    info: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cores_available"] = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def versions() -> dict[str, str | None]:
    """Installed versions of spark3d and the libraries it stands on (``None``: not installed)."""
    out: dict[str, str | None] = {"spark3d": __version__}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(root: Path) -> dict[str, Any]:
    """The commit of the source tree and the tracked files changed since (when written; empty outside a git clone)."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        modified = [line[3:] for line in status.stdout.splitlines() if line.strip()]
        return {"commit": commit.stdout.strip(), "dirty": bool(modified), "modified": modified[:50]}
    except (OSError, subprocess.SubprocessError):
        return {}


def provenance(command: Sequence[str], started: float | None = None) -> dict[str, Any]:
    """The provenance block: ``command`` (the words that ran it), date (UTC), machine, versions, git commit."""
    now = datetime.datetime.now(datetime.timezone.utc)
    block: dict[str, Any] = {"command": shlex.join(list(command)), "date": now.isoformat(timespec="seconds"),
                             "machine": machine(), "versions": versions(), "git": _git(Path(__file__).resolve().parents[1])}
    if started is not None:
        block["wall_s"] = round(now.timestamp() - started, 1)
    return block


def write_result(path: str | Path, figures: dict[str, Any], command: Sequence[str],
                 started: float | None = None) -> Path:
    """Write ``figures`` plus its provenance block as JSON to ``path`` (atomically: a temporary file renamed)."""
    path = Path(path)
    payload = {**figures, "provenance": provenance(command, started)}
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path

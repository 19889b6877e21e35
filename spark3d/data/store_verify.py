"""Checking a CT store against its records without writing: every volume's size, header and full sha256
(``spark3d preprocess --verify --out STORE``, ``--data.init_args.verify_store true``)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import DataError
from .store import MANIFEST, open_volume, sha256_file

__all__ = ["volume_problem", "verify_store", "refuse_problems"]


def volume_problem(root: Path, vid: str, record: dict[str, Any], full: bool = True) -> str | None:
    """What is wrong with one stored volume against its manifest ``record`` (None: nothing): missing, another
    size, a header of another shape or dtype, a record file that disagrees, or (``full``) another sha256."""
    path = root / record["file"]
    if not path.is_file():
        return "missing"
    try:  # the header first: a pickle or a truncated file is named as such
        open_volume(path, record["shape"], record["dtype"])
    except DataError as err:
        return re.split(r"[:;] re-run", str(err).split(" is refused: ", 1)[-1])[0]
    if path.stat().st_size != record["bytes"]:
        return f"{path.stat().st_size} bytes, the manifest says {record['bytes']}"
    own = path.with_suffix(".json")
    try:
        if json.loads(own.read_text()).get("sha256") != record["sha256"]:
            return f"its record {own.name} and the manifest disagree on its sha256"
    except (OSError, ValueError):
        return f"its record {own.name} is missing or unreadable"
    if full and sha256_file(path) != record["sha256"]:
        return "its bytes' sha256 is not the recorded one (changed or corrupted)"
    return None


def verify_store(root: str | Path, full: bool = True,
                 progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, Any]:
    """Check every volume of ``root/manifest.json`` (:func:`volume_problem`); nothing is written. Returns
    ``{"volumes", "bytes", "seconds", "problems": [(file, what)]}``; a store without a readable manifest is a
    DataError."""
    root = Path(root)
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        records = manifest["volumes"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"store {root}: cannot read {path} ({type(err).__name__}: {err})") from None
    start, problems, total = time.perf_counter(), [], 0
    items = list(records.items())
    for vid, record in (progress(items) if progress is not None else items):
        problem = volume_problem(root, vid, record, full)
        total += int(record.get("bytes", 0))
        if problem is not None:
            problems.append((str(record.get("file", vid)), problem))
    return {"volumes": len(items), "bytes": total, "seconds": time.perf_counter() - start, "problems": problems,
            "full": full}


def refuse_problems(report: dict[str, Any], root: str | Path) -> None:
    """A one-line DataError naming the first problem of a :func:`verify_store` report, if any."""
    problems = report["problems"]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"store {root}: {len(problems)} of {report['volumes']} volumes do not match their records: "
                        f"{problems[0][0]}: {problems[0][1]}{more}; re-run `spark3d preprocess --config CFG --out "
                        f"{root}` (it redoes them)")

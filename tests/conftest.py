import os
import re

import pytest
import torch

os.environ.setdefault("SPARK3D_TEST", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- skip policy
# A skip is allowed only for what the machine truly cannot have: a GPU. Any other skip (a declared dependency
# missing, an importorskip, a platform guard) fails the run, with its reason, so a broken install never turns
# tests into silent skips. `.ci/run` runs pytest with -rs, which lists every skip reason as well.
ALLOWED_SKIP = re.compile(r"\b(GPU|CUDA)\b", re.IGNORECASE)
_unexpected_skips: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and not ALLOWED_SKIP.search(_skip_reason(report)):
        _unexpected_skips.append((report.nodeid, _skip_reason(report)))


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_collectreport(report):
    _note_skip(report)


def pytest_terminal_summary(terminalreporter):
    for nodeid, reason in _unexpected_skips:
        terminalreporter.write_line(f"UNEXPECTED SKIP (only GPU skips are allowed): {nodeid}: {reason}", red=True)


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

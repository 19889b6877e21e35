"""CI fails on a skip other than a GPU skip (tests/conftest.py), and says why; a GPU skip passes."""

import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")
CASES = '''
import pytest

def test_runs():
    assert True

@pytest.mark.skipif(True, reason="needs a GPU")
def test_gpu_only():
    pass
'''


def _pytest(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(folder)],
                          capture_output=True, text=True, cwd=folder)


def test_a_gpu_skip_passes_and_any_other_skip_fails_the_run(tmp_path):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    done = _pytest(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "test_missing_dependency.py").write_text('import pytest\n\npytest.importorskip("no_such_package_x")\n')
    done = _pytest(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "UNEXPECTED SKIP" in done.stdout and "no_such_package_x" in done.stdout

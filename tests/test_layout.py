"""The house rules, checked on the source: rooms import only lower rooms, no private names across modules,
small modules, and packages whose __init__ only re-exports."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "spark3d"
# DESIGN.md section 3, bottom layer first: a room may import only from rooms before it (or itself)
ROOMS = ["version", "provenance", "errors", "masking", "layers", "viz", "sparse", "backbones", "encoders", "methods", "checkpoint",
         "data", "networks", "check", "inference", "train", "export", "bench", "cli"]
MAX_LINES = 400


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _room(module_path: Path, root: Path = PACKAGE) -> str:
    rel = module_path.relative_to(root)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path, root: Path = PACKAGE):
    """(absolute target module parts, imported names) of every spark3d import in a file."""
    tree = ast.parse(path.read_text())
    here = list(path.relative_to(root.parent).with_suffix("").parts)
    if here[-1] == "__init__":
        here = here[:-1]
    else:
        here = here[:-1]  # the package the module is in
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "spark3d":
                target = node.module.split(".")
            else:
                continue
            yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spark3d":
                    yield node.lineno, alias.name.split("."), []


def violations(path: Path, root: Path = PACKAGE) -> list[str]:
    """Every breach of the layering and privacy rules in one module."""
    room = _room(path, root)
    if room in ("__init__", "__main__"):
        return []  # the package root re-exports the public API
    if room not in ROOMS:
        return [f"{path.name}: room '{room}' is not in the layer list"]
    found = []
    for line, target, names in _imports(path, root):
        if len(target) == 1:
            found.append(f"{path}:{line} imports the package root (import from the room instead)")
            continue
        other = target[1]
        if other in ROOMS and ROOMS.index(other) > ROOMS.index(room):
            found.append(f"{path}:{line}: '{room}' imports the higher room '{other}'")
        for name in names:  # a private name (one underscore) belongs to its module
            if name.startswith("_") and not name.startswith("__"):
                found.append(f"{path}:{line} imports the private name {name} from {'.'.join(target)}")
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_lower_rooms_and_no_private_names(path):
    assert violations(path) == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (> {MAX_LINES}): split it along its jobs"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_init_only_reexports(path):
    allowed = {"cli", "methods"}  # DESIGN: cli/__init__ holds the command table, methods/__init__ the method table
    if path.parent.name in allowed:
        return
    tree = ast.parse(path.read_text())
    for node in tree.body:
        ok = isinstance(node, (ast.Import, ast.ImportFrom)) or (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) or (
            isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets))
        assert ok, f"{path.relative_to(PACKAGE)}:{node.lineno} does more than re-export"


def test_the_layer_check_can_fail(tmp_path):
    """Upward, root and private imports in a module written here are each caught, relative or absolute."""
    root = tmp_path / "spark3d"
    (root / "sparse").mkdir(parents=True)
    bad = root / "sparse" / "layers.py"
    bad.write_text("from ..train import pretrain\nfrom .convert import _kind_of\nimport spark3d\n"
                   "from spark3d.cli.demo import run_demo\nfrom ..masking import upsample_mask\n")
    found = violations(bad, root)
    assert len(found) == 4, found
    assert "higher room 'train'" in found[0] and "private name _kind_of" in found[1]
    assert "package root" in found[2] and "higher room 'cli'" in found[3]

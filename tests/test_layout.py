"""The package's layering (docs/layout.md) holds in the code: every import, at module level or inside a
function, goes from a folder to one on a lower layer (or stays inside its own folder)."""

from __future__ import annotations

import ast
from pathlib import Path

import moeprune

PACKAGE = Path(moeprune.__file__).parent

# room -> layer, as docs/layout.md lists them
LAYERS = {
    "errors": 0, "strict_json": 0, "testing": 0,
    "units": 1, "registry": 1, "inputs": 1, "distributed": 1, "models": 1,
    "checks": 2, "observe": 2, "evaluate": 2, "report": 2,
    "checkpoint": 3, "score": 3,
    "compress": 4, "inspect": 4,
    "methods": 5, "recover": 5, "publish": 5,
    "execution": 6,
    "pipeline": 7,
    "commands": 8,
    "cli": 9,
    "__main__": 10,
}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "moeprune" or len(parts) == 1:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[str, int]]:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "moeprune":  # `from moeprune import x`: x is the room
                out += [(f"moeprune.{a.name}", node.lineno) for a in node.names if a.name != "__version__"]
            else:
                out.append((module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def _sources() -> list[Path]:
    """Every module of the package but its own `__init__.py` (which imports nothing of the package)."""
    return [p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts and p != PACKAGE / "__init__.py"]


def test_every_room_has_a_layer():
    rooms = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0] for p in _sources()}
    assert rooms <= set(LAYERS), f"rooms without a layer in docs/layout.md: {sorted(rooms - set(LAYERS))}"
    assert set(LAYERS) <= rooms, f"layers of rooms that no longer exist: {sorted(set(LAYERS) - rooms)}"


def test_imports_only_run_downward():
    bad = []
    for path in _sources():
        here = path.stem if path.parent == PACKAGE else path.relative_to(PACKAGE).parts[0]
        for module, line in _imports(path):
            there = _room(module)
            if there is None or there == here:
                continue
            if LAYERS[there] >= LAYERS[here]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} "
                           f"(layer {LAYERS[there]} from layer {LAYERS[here]})")
    assert not bad, "imports that do not run downward:\n" + "\n".join(bad)


def test_every_folder_says_what_it_is_in_one_line():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()), clean=False)
        assert doc, f"{init} has no docstring"
        assert len(doc.splitlines()[0]) <= 120 and doc.splitlines()[0].rstrip().endswith("."), init


def test_scripts_never_import_tests():
    scripts = PACKAGE.parent / "scripts"
    if not scripts.is_dir():
        return
    for path in scripts.rglob("*.py"):
        text = path.read_text()
        assert '/ "tests"' not in text and "from tests" not in text and "import tiny_models" not in text, path

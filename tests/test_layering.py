"""The layering stays true: imports inside moe_local only go down, and models and cache never import
each other.

Every import statement counts, function-level ones included (they once hid a cycle). README's
architecture section draws the same layers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_local"

# Bottom first. A folder (or a top-level module) may import its own layer's files and lower layers;
# rooms that share a layer never import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("units",),
    ("experts",),  # the seam: imports nothing of moe_local
    ("loading",),
    ("formats",),
    ("models", "cache"),  # they meet at the seam (experts.py), wired by runtime
    ("runtime",),
    ("convert",),
    ("serve",),
    ("cli",),
]
RANK = {room: i for i, layer in enumerate(LAYERS) for room in layer}


def room_of(module: str) -> str:
    """moe_local.cache.tiered -> "cache"; moe_local.errors -> "errors"; moe_local -> "" (the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base))
            if base == "moe_local":  # `from moe_local import cache` names a room
                out += [(node.lineno, f"moe_local.{alias.name}") for alias in node.names if alias.name in RANK]
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = room_of(module_name(path))
        where = path.relative_to(PACKAGE.parent)
        for line, target in imports(path):
            if target.split(".")[0] != "moe_local":
                continue
            there = room_of(target)
            if there == here or there == "":  # own room, or the package's version string
                continue
            if here == "experts":
                found.append(f"{where}:{line} imports {target}: the seam imports nothing of moe_local")
            elif here not in RANK or there not in RANK:
                found.append(f"{where}:{line} imports {target}: add {(here if here not in RANK else there)!r} "
                             "to LAYERS in tests/test_layering.py (and README's architecture section)")
            elif RANK[there] > RANK[here]:
                found.append(f"{where}:{line} imports {target}: {here} sits below {there}")
            elif RANK[there] == RANK[here]:
                found.append(f"{where}:{line} imports {target}: {here} and {there} never import each other")
    return found


def test_imports_only_go_down():
    assert violations() == []


def test_the_check_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an upward import hidden in a function, and a relative one, are both caught."""
    pkg = tmp_path / "moe_local"
    (pkg / "models").mkdir(parents=True)
    (pkg / "cache").mkdir()
    (pkg / "models" / "a.py").write_text("def f():\n    from moe_local.runtime import loader\n")
    (pkg / "cache" / "b.py").write_text("from ..models import a\n")
    (pkg / "errors.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    found = violations()
    assert any("models/a.py:2 imports moe_local.runtime: models sits below runtime" in v for v in found)
    assert any("cache/b.py:1 imports moe_local.models: cache and models never import each other" in v for v in found)

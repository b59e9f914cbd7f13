"""The import rule: imports only run downward (docs/DESIGN.md, "Layers").

Every ``import`` in slam_pretrain/ and data_pipeline/ is read with ``ast`` (imports inside
functions included: a lazy import is still a dependency). Imports under ``if TYPE_CHECKING:`` are
annotations only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest floor first. A module may import its own floor and the floors below it.
FLOORS: list[tuple[str, ...]] = [
    ("data_pipeline",),
    ("slam_pretrain.errors", "slam_pretrain.redact", "slam_pretrain.distributed"),
    ("slam_pretrain.model",),
    ("slam_pretrain.engine",),
    ("slam_pretrain.training",),
    ("slam_pretrain.config",),
    ("slam_pretrain.downstream",),
    ("slam_pretrain.cli", "slam_pretrain.train_main", "slam_pretrain.demo", "slam_pretrain.__main__",
     "slam_pretrain"),
]


def floor_of(module: str) -> int:
    best, best_len = -1, -1
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path, package: str = "") -> list[tuple[int, str]]:
    """(line, imported module) for every import of our own packages outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                type_only.update(id(n) for n in ast.walk(child))
    if not package:  # the package a relative import starts from
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative import: resolve against this package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            found.append((node.lineno, mod))
    return [(line, m) for line, m in found if m.split(".")[0] in ("slam_pretrain", "data_pipeline")]


def sources() -> list[Path]:
    return sorted(p for pkg in ("slam_pretrain", "data_pipeline") for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_has_a_floor():
    unplaced = [module_name(p) for p in sources() if floor_of(module_name(p)) < 0]
    assert not unplaced, f"modules on no floor (add them to FLOORS and docs/DESIGN.md): {unplaced}"


def test_imports_only_run_downward():
    upward = []
    for path in sources():
        me = module_name(path)
        for line, target in project_imports(path):
            if floor_of(target) > floor_of(me):
                upward.append(f"{path.relative_to(ROOT)}:{line} {me} (floor {floor_of(me)}) imports "
                              f"{target} (floor {floor_of(target)})")
    assert not upward, "imports running upward:\n" + "\n".join(upward)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: in a model file, a lazy import of the engine is found and is upward; the
    same import under TYPE_CHECKING is not counted."""
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from slam_pretrain.training import trainer\n"
                     "def f():\n    from ..engine import build_engine\n")
    imports = project_imports(probe, package="slam_pretrain.model")
    assert imports == [(5, "slam_pretrain.engine")]
    assert floor_of("slam_pretrain.engine") > floor_of("slam_pretrain.model.slam_v1")

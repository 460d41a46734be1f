"""The package's layering: import-linter's contracts (.importlinter) and no private names across modules."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "langmamba", ROOT / "monailabel_app", ROOT / "slicer_extension")

# (importer, imported) pairs waiting on another change; each must still occur, so the list cannot go stale.
KNOWN: set[tuple[str, str]] = set()
"""Allowed (importer, private module) pairs while a move is under way; empty when none is."""


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    """Dotted name of a file: ``langmamba.io.atomic``; front-end files as their path under the repository."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _may_use(importer: str, is_package: bool, target: str) -> bool:
    """A private module (``a.b._c``) is for its own package ``a.b``; a private name is for its own module."""
    parts = target.split(".")
    for depth, part in enumerate(parts):
        if _private(part):
            owner = ".".join(parts[:depth])
            home = importer if is_package else importer.rpartition(".")[0]
            if not (home == owner or home.startswith(owner + ".")):
                return False
    return True


def private_imports(path: Path) -> list[tuple[str, str, int]]:
    """``(importer, imported, line)`` for each private module or name ``path`` takes from another module,
    by ``import``/``from ... import`` or as an attribute of an imported langmamba module."""
    module, is_package = _module_name(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _may_use(module, is_package, alias.name):
                    found.append((module, alias.name, node.lineno))
                if alias.asname and alias.name.startswith("langmamba"):
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if source != module and not _may_use(module, is_package, target):
                    found.append((module, target if _private(alias.name) else source, node.lineno))
                if source.startswith("langmamba"):
                    aliases[alias.asname or alias.name] = target
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id] != module
        ):
            found.append((module, f"{aliases[node.value.id]}.{node.attr}", node.lineno))
    return found


def test_no_private_names_cross_modules():
    found = [hit for source in SOURCES for path in sorted(source.rglob("*.py")) for hit in private_imports(path)]
    pairs = {(importer, imported) for importer, imported, _ in found}
    unexpected = [
        f"{importer} imports {imported} (line {line})"
        for importer, imported, line in found
        if (importer, imported) not in KNOWN
    ]
    assert not unexpected, "private names used across modules; make them public or move them:\n" + "\n".join(unexpected)
    assert not KNOWN - pairs, f"no longer imported, remove from KNOWN: {sorted(KNOWN - pairs)}"


def test_the_checker_sees_each_kind_of_private_import(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    package = tmp_path / "langmamba" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from langmamba.pkg._helpers import shared\n")
    (package / "user.py").write_text(
        "from . import _helpers\nfrom .other import _hidden, visible\nimport langmamba.pkg.other as other\n"
        "other._secret()\nfrom langmamba.pkg.other import __all__\n"
    )
    outside = tmp_path / "langmamba" / "front.py"
    outside.write_text("from langmamba.pkg._helpers import shared\nfrom .pkg import other\nother._x = 1\n")
    assert private_imports(package / "__init__.py") == []
    assert private_imports(package / "user.py") == [
        ("langmamba.pkg.user", "langmamba.pkg.other._hidden", 2),
        ("langmamba.pkg.user", "langmamba.pkg.other._secret", 4),
    ]
    assert private_imports(outside) == [
        ("langmamba.front", "langmamba.pkg._helpers", 1),
        ("langmamba.front", "langmamba.pkg.other._x", 3),
    ]


def test_import_contracts_hold():
    """The contracts of .importlinter: layers, forbidden imports and no cycles (what `.ci/run` checks)."""
    linter = Path(sys.executable).with_name("lint-imports")
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([str(linter), "--no-cache"], cwd=ROOT, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_reports_and_explanation_types_load_without_the_encoder():
    # report depends on the explanation data types, not on the explainer: importing it (and the explain package)
    # must not pull in the encoder or torch.
    code = (
        "import sys, langmamba.report, langmamba.explain as e; e.ExplainedBatch; e.paint_regions; "
        "heavy = ('torch', 'langmamba.explain.encode', 'langmamba.explain.writer'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, langmamba.explain as e; e.Explainer; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert loaded.stdout.strip() == "True"  # the lazy names still resolve

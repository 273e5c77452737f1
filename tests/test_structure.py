"""The package's structure rules, checked from the source: the import direction and the error root.

Imports run one way: the runtime (``molmoe_lite``) -> ``molmoe_lite.kernels`` (folder
``kernels/``) -> ``molmoe_lite.quantize`` (folder ``quantize/``). ``molmoe_lite.errors``
imports nothing and every layer may use it. The runtime never imports ``benchmarks``,
and only the offline demo uses the test fixtures in ``molmoe_lite.testing``. Every
exception class the package defines derives from ``MolmoeLiteError``, so callers can
catch what the package reports with one ``except`` and the CLI can tell it from a bug.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import molmoe_lite
from molmoe_lite.errors import MolmoeLiteError

ROOT = Path(__file__).resolve().parents[1]

# folder -> the dotted name it is installed as
PACKAGES = {"molmoe_lite": "molmoe_lite", "kernels": "molmoe_lite.kernels", "quantize": "molmoe_lite.quantize"}


def _modules(folder: str) -> list[tuple[str, Path]]:
    base = ROOT / folder
    out = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out.append((".".join([PACKAGES[folder], *parts]), path))
    return out


def _imports(module: str, path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _ours(name: str) -> bool:
    return name == "molmoe_lite" or name.startswith(("molmoe_lite.", "benchmarks"))


def _allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


RULES = {
    # folder: what of ours its modules may import
    "quantize": ("molmoe_lite.quantize", "molmoe_lite.errors"),
    "kernels": ("molmoe_lite.kernels", "molmoe_lite.quantize", "molmoe_lite.errors"),
}


@pytest.mark.parametrize("folder", sorted(RULES))
def test_lower_layers_import_only_below_themselves(folder):
    bad = []
    for module, path in _modules(folder):
        for name in sorted(_imports(module, path)):
            # `from molmoe_lite.quantize import x` records both the package and the name
            if _ours(name) and not _allowed(name, RULES[folder]) and name != "molmoe_lite":
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_runtime_never_imports_benchmarks_and_fixtures_only_in_the_demo():
    bad = []
    for module, path in _modules("molmoe_lite"):
        if module.startswith("molmoe_lite.testing"):
            continue
        for name in _imports(module, path):
            if name.startswith("benchmarks"):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if _allowed(name, ("molmoe_lite.testing",)) and module != "molmoe_lite.demo":
                bad.append(f"{path.relative_to(ROOT)} imports the test fixtures ({name})")
    assert not bad, "\n".join(bad)


def test_the_rule_checker_sees_a_violation(tmp_path):
    """The checker itself: a module-level and a function-level upward import are both found."""
    src = tmp_path / "m.py"
    src.write_text("import torch\nfrom molmoe_lite.api import load\n\ndef f():\n    from molmoe_lite.kernels import x\n")
    names = _imports("molmoe_lite.quantize.m", src)
    assert "molmoe_lite.api" in names and "molmoe_lite.kernels.x" in names
    assert not _allowed("molmoe_lite.api", RULES["quantize"])
    rel = tmp_path / "__init__.py"
    rel.write_text("from .configs import get_config\n")
    assert "molmoe_lite.kernels.configs" in _imports("molmoe_lite.kernels", rel)


def _all_module_names() -> list[str]:
    # kernels/ and quantize/ are installed from their own folders, so walk each package
    names = set()
    for package in PACKAGES.values():
        root = importlib.import_module(package)
        names.add(package)
        names.update(info.name for info in pkgutil.walk_packages(root.__path__, package + "."))
    return sorted(names)


def test_every_exception_class_derives_from_the_package_root():
    """Walks every importable module of the package (optional extras that are not installed skip)."""
    offenders, seen = [], 0
    for name in _all_module_names():
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # an optional extra (serve, ray) not installed here
            if "molmoe_lite" in str(e):
                raise
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, BaseException):
                continue
            seen += 1
            if not issubclass(cls, MolmoeLiteError):
                offenders.append(f"{name}.{cls.__name__}")
    assert seen >= 15, f"only {seen} exception classes found: the walk missed modules"
    assert not offenders, f"not derived from MolmoeLiteError: {offenders}"


def test_the_root_error_is_exported():
    assert molmoe_lite.MolmoeLiteError is MolmoeLiteError

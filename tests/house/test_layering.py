"""The house's import rules, read from the AST of every module (so a new arrow cannot slip in unnoticed).

* the ground (``rocket_deploy/*.py``, not the facade ``__init__``/``cli``) imports no stage, no orchestration, no CLI;
* a stage (``compress``, ``export``, ``runtime``) imports the ground and itself only;
* nothing but the CLI imports ``rocket_deploy.commands``;
* ``rocket_deploy.workflows`` (orchestration) may import every stage, never the CLI.

Relative imports are resolved against the installed package names (``compress/`` is ``rocket_deploy.compress``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"rocket_deploy": "rocket_deploy", "compress": "rocket_deploy.compress",
                "export": "rocket_deploy.export", "runtime": "rocket_deploy.runtime"}
STAGES = ("rocket_deploy.compress", "rocket_deploy.export", "rocket_deploy.runtime")
FACADE = ("rocket_deploy", "rocket_deploy.cli")


def module_files():
    for folder, pkg in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield path, ".".join([pkg, *parts]), path.name == "__init__.py"


def imported_modules(path: Path, module: str, is_package: bool) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module.split(".") if is_package else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import kernels`` / ``from rocket_deploy import onnx_contract``: a name that is a module is the
            # import; any other name (a function, a class, ``__version__``) imports the module ``target`` itself
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if sub.startswith("rocket_deploy.") and _is_module(sub) else target))
    return [(ln, m) for ln, m in out if m == "rocket_deploy" or m.startswith("rocket_deploy.")]


def owner(module: str) -> str:
    """The layer a module belongs to: a stage, 'workflows', 'commands', 'facade' or 'ground'."""
    for s in STAGES:
        if module == s or module.startswith(s + "."):
            return s
    if module.startswith("rocket_deploy.workflows"):
        return "workflows"
    if module.startswith("rocket_deploy.commands"):
        return "commands"
    if module in FACADE:
        return "facade"
    return "ground"


def _is_module(name: str) -> bool:
    """Whether ``rocket_deploy.x.y`` names a module/package of ours (not a function imported from one)."""
    parts = name.split(".")[1:]
    for folder, pkg in PACKAGE_DIRS.items():
        p = pkg.split(".")[1:]
        if parts[: len(p)] == p:
            rest = parts[len(p):]
            base = ROOT / folder / Path(*rest) if rest else ROOT / folder
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or base.is_dir():
                return True
    return False


def violations() -> list[str]:
    bad = []
    for path, module, is_pkg in module_files():
        src = owner(module)
        for line, target in imported_modules(path, module, is_pkg):
            if target != "rocket_deploy" and not _is_module(target):
                continue
            dst = owner(target) if target != "rocket_deploy" else "facade"
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if dst == "commands" and src not in ("commands", "facade"):
                bad.append(f"{where}: only the CLI imports rocket_deploy.commands")
            elif src == "ground" and dst not in ("ground",):
                bad.append(f"{where}: the shared ground imports no stage, workflow or CLI")
            elif src in STAGES and dst not in ("ground", src):
                bad.append(f"{where}: a stage imports only the ground and itself")
            elif src == "workflows" and dst in ("commands",):
                bad.append(f"{where}: workflows do not import the CLI")
    return bad


def test_layering():
    bad = violations()
    assert not bad, "import rules broken (see docs/architecture.md):\n" + "\n".join(bad)


def test_layering_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The checker itself: a planted stage-to-stage import in a copy of one module is reported."""
    import shutil
    for folder in PACKAGE_DIRS:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "csrc"))
    planted = tmp_path / "export" / "onnx_export.py"
    planted.write_text(planted.read_text() + "\nfrom rocket_deploy.compress.quantize import quantize_int4\n")
    ground = tmp_path / "rocket_deploy" / "sparse_format.py"
    ground.write_text(ground.read_text() + "\nfrom .runtime import kernels\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    bad = violations()
    assert any("export/onnx_export.py" in b and "rocket_deploy.compress.quantize" in b for b in bad), bad
    assert any("rocket_deploy/sparse_format.py" in b and "rocket_deploy.runtime" in b for b in bad), bad


@pytest.mark.parametrize("module,expected", [("rocket_deploy.compress.profile", "rocket_deploy.compress"),
                                             ("rocket_deploy.onnx_contract", "ground"),
                                             ("rocket_deploy.workflows.sweep", "workflows"),
                                             ("rocket_deploy", "facade")])
def test_owner(module, expected):
    assert owner(module) == expected

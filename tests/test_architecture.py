"""The layout's rules (docs/design.md, "Layout and arrows"), checked on the code as it is.

- the import-linter contracts of pyproject.toml hold (run through import-linter's own API);
- app.py, outside the package, imports only painwatch.app and painwatch.inference of the project;
- no module is over 600 lines; at most 5 imports of painwatch modules sit inside functions outside cli/;
- docstrings and comments cite the design notes and the literature, never files outside the repository;
- public functions with more than three parameters take them keyword-only after the data.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "painwatch"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", result.stdout)
    assert kept is not None and int(kept.group(1)) >= 4 and kept.group(2) == "0", result.stdout[-2000:]


def _project_imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names if alias.name.startswith("painwatch")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("painwatch"):
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_the_page_script_imports_only_the_page_support_and_the_inference_layer() -> None:
    imports = _project_imports(_tree(ROOT / "app.py"))
    assert imports, "app.py should import painwatch.app and painwatch.inference"
    allowed = ("painwatch.app", "painwatch.inference")
    assert [name for name in imports if not name.startswith(allowed)] == []


def test_no_module_is_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def _function_level_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if inner is not node and isinstance(inner, ast.Import | ast.ImportFrom):
                    where = f"{path.relative_to(ROOT)}:{inner.lineno}"
                    found += [f"{where} {name}" for name in _project_imports(inner)]
    return found


def test_imports_of_the_project_are_at_module_level_outside_the_command_line() -> None:
    hidden = [entry for path in MODULES if "cli" not in path.relative_to(PACKAGE).parts
              for entry in _function_level_imports(path)]
    assert len(hidden) <= 5, hidden


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_citations_stay_inside_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for pattern in (r"DESIGN(\.md)?\b(?! notes)", r"\bissue \d+", r"\bthe thesis\b", r"\bthesis Ch"):
        assert not re.search(pattern, text), f"{path.name} cites {pattern!r}: cite docs/design.md or a paper"


def _public_functions(tree: ast.Module) -> list[tuple[str, ast.arguments]]:
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            found.append((node.name, node.args))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            found += [(f"{node.name}.{item.name}", item.args) for item in node.body
                      if isinstance(item, ast.FunctionDef) and not item.name.startswith("_")]
    return found


#: Functions whose first parameters are all data (there is no setting to pass by keyword).
ALL_DATA = {"clark_max_moments", "affine_moments", "conv2d_moments", "attack_certificates"}


def test_public_functions_with_many_parameters_take_settings_by_keyword() -> None:
    offenders = []
    for path in MODULES:
        for name, args in _public_functions(_tree(path)):
            positional = [a.arg for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")]
            if len(positional) > 3 and name.split(".")[-1] not in ALL_DATA:
                offenders.append(f"{path.relative_to(ROOT)}: {name}({', '.join(positional)})")
    assert offenders == []

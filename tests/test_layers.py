"""docs/ARCHITECTURE.md is the truth about the code's structure, and this test holds the code to it.

Every import in src/kvfs (module level or inside a function) must be allowed by the layer table,
no two packages may import each other through any path, and the module list must name exactly
the modules there are.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "kvfs"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


@dataclass(frozen=True)
class Import:
    source: str  # the importing file, relative to src/
    line: int
    package: str  # the importing package
    target: str  # the imported package
    lazy: bool  # inside a function


def _section(title: str) -> str:
    return DOC.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def layer_table() -> dict[str, dict[str, bool]]:
    """package → {package it may import: only lazily}."""
    table: dict[str, dict[str, bool]] = {}
    for row in _section("Layers").splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if not row.startswith("| `") or len(cells) != 3:
            continue
        allowed = {}
        for entry in cells[2].split(","):
            found = re.fullmatch(r"`([\w]+)`( \(lazy\))?", entry.strip())
            if found:
                allowed[found.group(1)] = bool(found.group(2))
        table[cells[0].strip("`")] = allowed
    return table


def package_of(module: str) -> str:
    """`kvfs.csi.node` → `csi`, `kvfs.cli` → `cli`; `kvfs` and `kvfs.__version__` → `kvfs`."""
    parts = module.split(".")
    if len(parts) > 1 and ((SRC / parts[1]).is_dir() or (SRC / f"{parts[1]}.py").exists()):
        return parts[1]
    return "kvfs"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[Import]:
    """Every import of a kvfs module in `path`, relative ones resolved."""
    module = module_name(path)
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package_parts[: len(package_parts) - child.level + 1] + ([base] if base else []))
                # `from kvfs import emulator` imports the package `emulator`
                targets = [f"{base}.{alias.name}" for alias in child.names] if base == "kvfs" else [base]
            for target in targets:
                if target == "kvfs" or target.startswith("kvfs."):
                    where = str(path.relative_to(SRC.parent))
                    found.append(Import(where, child.lineno, package_of(module), package_of(target), lazy))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def all_imports() -> list[Import]:
    return [found for path in sorted(SRC.rglob("*.py")) for found in imports(path)]


def violations(found: list[Import], table: dict[str, dict[str, bool]]) -> list[str]:
    wrong = []
    for imp in found:
        if imp.target == imp.package:
            continue
        allowed = table.get(imp.package, {})
        if imp.target not in allowed:
            wrong.append(f"{imp.source}:{imp.line}: {imp.package} imports {imp.target}, not in its row of the layer table")
        elif allowed[imp.target] and not imp.lazy:
            wrong.append(f"{imp.source}:{imp.line}: {imp.package} may import {imp.target} only inside a function")
    return wrong


def cycles(found: list[Import]) -> list[list[str]]:
    """Package import cycles (each found once, from its first package in sorted order)."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        if imp.target != imp.package:
            graph.setdefault(imp.package, set()).add(imp.target)
    seen: list[list[str]] = []

    def walk(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                seen.append(path)
            elif nxt not in path and nxt > path[0]:
                walk([*path, nxt])

    for start in sorted(graph):
        walk([start])
    return seen


def test_every_import_follows_the_layer_table() -> None:
    table = layer_table()
    packages = {package_of(module_name(path)) for path in SRC.rglob("*.py")}
    assert set(table) == packages, "the layer table must have one row per package"
    found = all_imports()
    assert len(found) > 100 and any(imp.lazy for imp in found)  # the scan sees module and function imports
    assert violations(found, table) == []
    assert cycles(found) == []


def test_the_rules_the_issue_names_hold() -> None:
    table = layer_table()
    assert not {"auth", "vault", "net", "daemon"} & set(table["fs"])
    assert "fs" not in table["csi"]
    assert {p for p, allowed in table.items() if "emulator" in allowed} == {"cli"} and table["cli"]["emulator"]
    assert set(table["emulator"]) <= {"kvfs", "errors", "logsafe"}


def test_the_checks_catch_a_planted_violation_and_a_cycle() -> None:
    table = layer_table()
    upward = Import("kvfs/fs/core.py", 1, "fs", "daemon", False)
    eager = Import("kvfs/cli.py", 1, "cli", "emulator", False)
    assert len(violations([upward, eager], table)) == 2
    assert cycles([Import("a", 1, "auth", "vault", True), Import("b", 1, "vault", "auth", False)]) == [["auth", "vault"]]


def listed_modules() -> set[str]:
    """The files named in the module list, relative to src/kvfs (folders end in /)."""
    block = _section("Modules").split("```", 2)[1]
    listed: set[str] = set()
    folders: dict[int, str] = {}
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        names = [name.strip() for name in re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split(",")]
        if not line.strip() or not all(re.fullmatch(r"[\w.]+\.py|\w+/", name) for name in names):
            continue  # a description's continuation line
        if line.strip() == "src/kvfs/":
            continue
        parent = folders.get(indent - 2, "")
        for name in names:
            listed.add(parent + name)
            if name.endswith("/"):
                folders[indent] = parent + name
    return listed


def test_the_module_list_names_every_module_and_nothing_else() -> None:
    def has_code(path: Path) -> bool:
        body = ast.parse(path.read_text()).body
        return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)

    actual = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "__init__.py" or has_code(p)}
    actual |= {str(p.relative_to(SRC)) + "/" for p in SRC.rglob("*") if p.is_dir() and (p / "__init__.py").exists()}
    listed = listed_modules()
    assert "daemon/control.py" in listed and "csi/proto/csi_pb2_grpc.py" in listed  # the parser reads nesting
    assert sorted(actual - listed) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(listed - actual - {str(p.relative_to(SRC)) for p in SRC.rglob("__init__.py")}) == [], (
        "docs/ARCHITECTURE.md names modules that do not exist"
    )

"""captionkit's modules import each other without a cycle.

Both module-level imports and imports inside functions count: a deferred import only hides a cycle
until the function first runs. Imports under `if TYPE_CHECKING:` do not count, since they never run.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Container
from pathlib import Path


def _modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package folder `root`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, name: str, is_package: bool, modules: Container[str]) -> set[str]:
    """The dotted names `tree` imports, relative imports resolved, TYPE_CHECKING blocks skipped.

    A package's own `__init__` counts only where a name is taken from it, not for its submodules:
    Python runs it before any submodule, whoever imports them.
    """
    here = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from pkg import mod` needs the module pkg.mod, `from mod import name` the module mod.
            out.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """For each module of the package, the package's modules it imports."""
    modules = _modules(root, package)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imported = _imported(tree, name, path.name == "__init__.py", modules)
        graph[name] = {other for other in imported if other in modules and other != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: each strongly connected group of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _package_root() -> Path:
    spec = importlib.util.find_spec("captionkit")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def test_captionkit_has_no_import_cycle():
    graph = import_graph(_package_root(), "captionkit")
    assert "captionkit.cli" in graph and graph["captionkit.cli"], "the import graph came out empty"
    found = cycles(graph)
    assert not found, "import cycles among captionkit's modules: " + "; ".join(
        " <-> ".join(group) for group in found)


def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\nfrom pkg import sub\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from pkg import d\nimport pkg.a\n")
    (package / "d.py").write_text("from . import c\n")
    graph = import_graph(package, "pkg")
    assert graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]

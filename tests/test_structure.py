"""The packages' shape, read statically from their source (ast, nothing imported): no import cycle
among mansu's modules, mansu never imports the baselines, and no module grows past MAX_LINES.

Every ``import`` and ``from ... import`` counts, those inside functions too (a deferred import
still runs), except the ones under ``if TYPE_CHECKING:``, which never run. ``from mansu.x import
y`` is an import of the module mansu.x.y when y is a submodule, else of mansu.x.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from conftest import ROOT

PACKAGES = ("mansu", "baselines")
MAX_LINES = 450


def module_files() -> dict[str, Path]:
    """Every module of PACKAGES by dotted name (a package is its __init__); linked folders, such as
    mansu/conf, are not walked."""
    files = {}
    for package in PACKAGES:
        for folder, subfolders, names in os.walk(ROOT / package):
            subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
            for name in sorted(n for n in names if n.endswith(".py")):
                path = Path(folder) / name
                parts = list(path.relative_to(ROOT).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                files[".".join(parts)] = path
    return files


MODULES = module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> set[str]:
    """The dotted names ``name``'s module imports (of any package), relative imports resolved."""
    path = MODULES[name]
    return imports_in(path.read_text(), name, is_package=path.name == "__init__.py",
                      modules=set(MODULES), filename=str(path))


def imports_in(source_code: str, name: str, *, is_package: bool, modules: set[str],
               filename: str = "<module>") -> set[str]:
    """What module ``name`` (a package's __init__ if ``is_package``) with this source imports;
    ``from a import b`` is a.b when a.b is one of ``modules``."""
    tree = ast.parse(source_code, filename=filename)
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            found.add(submodule if submodule in modules else source)
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (itself left out)."""
    inside = lambda m: m == package or m.startswith(package + ".")  # noqa: E731
    return {name: {m for m in imports_of(name) if inside(m) and m in MODULES and m != name}
            for name in MODULES if inside(name)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that ends where it starts) through each strongly connected component of
    more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest cycle through the component's first module (breadth first, inside it)."""
    start = min(component)
    parents, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in the component {sorted(component)}")


def test_the_walk_sees_every_module_and_resolves_submodule_imports():
    assert {"mansu", "mansu.cli", "mansu.unlearn.mansu", "baselines"} <= set(MODULES)
    assert not any(n == "mansu.conf" or n.startswith("mansu.conf.") for n in MODULES)  # -> conf/
    graph = import_graph("mansu")
    assert "mansu.__main__" in graph and "mansu.cli" in graph["mansu.__main__"]
    assert sum(map(len, graph.values())) > len(graph)  # the modules do import each other


def test_imports_are_resolved_to_modules_at_any_depth():
    code = """
import os.path
from typing import TYPE_CHECKING
from . import sibling
from .sibling import helper
from .. import other
from ..pkg import sub, CONSTANT
if TYPE_CHECKING:
    from never.imported import Thing
else:
    import at_runtime

def lazy():
    from deep.er import thing
"""
    modules = {"top", "top.pkg", "top.pkg.sibling", "top.pkg.sub", "top.pkg.me", "top.other"}
    assert imports_in(code, "top.pkg.me", is_package=False, modules=modules) == {
        "os.path", "typing", "top.pkg.sibling", "top.other", "top.pkg.sub", "top.pkg",
        "at_runtime", "deep.er"}
    # In a package's __init__, "." is the package itself.
    assert imports_in("from . import sub", "top.pkg", is_package=True, modules=modules) == {
        "top.pkg.sub"}


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_mansu_has_no_import_cycle():
    found = cycles(import_graph("mansu"))
    assert not found, "import cycle(s) among mansu's modules:\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in found)


def test_mansu_never_imports_the_baselines():
    offenders = {name: sorted(m for m in imports_of(name)
                              if m == "baselines" or m.startswith("baselines."))
                 for name in MODULES if name == "mansu" or name.startswith("mansu.")}
    offenders = {name: found for name, found in offenders.items() if found}
    assert not offenders, f"mansu imports the baselines: {offenders}"


def test_no_module_is_longer_than_the_limit():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    too_long = {name: n for name, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"

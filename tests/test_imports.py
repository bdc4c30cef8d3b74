"""The import arrows point one way: no cycle among the project's modules, counting every import
statement (module-level and inside functions, relative ones too), except those under
`if TYPE_CHECKING:`. A function-level import hides a cycle at import time; it does not remove the
dependency, so it counts here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hetsim", "backends")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in the tree, skipping the bodies of `if TYPE_CHECKING:` (not their else)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _containing(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that `name` is or lies inside (`hetsim.config.Spec` -> hetsim.config)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports. `from pkg import mod` is an edge to pkg.mod when that is a
    module, else to pkg. Importing `a.b.c` first runs the __init__ of a and a.b: edges too, except for the
    importer's own parent packages (they have run before the importer; `from hetsim import x` inside
    hetsim still is an edge to hetsim, since it reads what hetsim's __init__ defines)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        parents = {".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 1)}
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".")
                    # a package's __init__ is the package itself: `from . import x` stays inside it
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                           for alias in node.names]
            for target in targets:
                module = _containing(target, modules)
                if module is None:
                    continue  # not the project's
                edges[name].add(module)
                parts = module.split(".")
                edges[name].update(p for p in (".".join(parts[:n]) for n in range(1, len(parts)))
                                   if p in modules and p not in parents)
            edges[name].discard(name)
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return sorted(components, key=lambda c: (-len(c), c))


def a_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through the component's first module (a shortest one, by breadth-first search)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return component


# -- the tool on small graphs: a test that can fail ---------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return project_modules(tmp_path)


def test_a_function_level_import_closes_a_cycle(tmp_path):
    modules = _tree(tmp_path, {
        "hetsim/__init__.py": "",
        "hetsim/a.py": "from hetsim.b import f\n",
        "hetsim/b.py": "def f():\n    from hetsim import a\n",
        "backends/__init__.py": "",
    })
    edges = import_edges(modules)
    assert edges["hetsim.a"] == {"hetsim.b"}
    assert edges["hetsim.b"] == {"hetsim.a"}
    assert strongly_connected(edges)[0] == ["hetsim.a", "hetsim.b"]
    assert a_cycle(["hetsim.a", "hetsim.b"], edges) == ["hetsim.a", "hetsim.b", "hetsim.a"]


def test_type_checking_imports_do_not_count_but_relative_imports_and_package_inits_do(tmp_path):
    modules = _tree(tmp_path, {
        "hetsim/__init__.py": "from hetsim.c import g\n",
        "hetsim/a.py": "import typing\nif typing.TYPE_CHECKING:\n    from hetsim.b import f\nelse:\n    import json\n",
        "hetsim/b.py": "from . import a\nfrom hetsim import g\n",
        "hetsim/pkg/__init__.py": "from hetsim import c\n",
        "hetsim/pkg/mod.py": "from .. import b\nfrom . import other\n",
        "hetsim/pkg/other.py": "",
        "hetsim/c.py": "import hetsim.pkg.mod\n",
        "backends/__init__.py": "",
        "backends/x.py": "from hetsim.pkg.other import y\n",
    })
    edges = import_edges(modules)
    assert edges["hetsim.a"] == set()
    assert edges["hetsim.b"] == {"hetsim.a", "hetsim"}  # a name from hetsim's __init__
    assert edges["hetsim.pkg.mod"] == {"hetsim.b", "hetsim.pkg.other"}
    # importing hetsim.pkg.mod runs hetsim.pkg's __init__, which imports c: a cycle c -> pkg -> c
    assert edges["hetsim.c"] == {"hetsim.pkg", "hetsim.pkg.mod"}
    assert edges["backends.x"] == {"hetsim", "hetsim.pkg", "hetsim.pkg.other"}
    components = strongly_connected(edges)
    assert ["hetsim", "hetsim.b", "hetsim.c", "hetsim.pkg", "hetsim.pkg.mod"] in components


# -- the project ---------------------------------------------------------------------------------

def test_no_import_cycle_among_the_projects_modules():
    edges = import_edges(project_modules())
    cycles = [c for c in strongly_connected(edges) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(
        f"  {len(c)} modules ({', '.join(c)}); e.g. {' -> '.join(a_cycle(c, edges))}" for c in cycles)


def test_backends_import_nothing_of_the_simulator():
    edges = import_edges(project_modules())
    offending = {m: sorted(t for t in targets if t == "hetsim.sim" or t.startswith("hetsim.sim."))
                 for m, targets in edges.items() if m.startswith("backends")}
    assert not {m: t for m, t in offending.items() if t}


def test_the_spec_schema_imports_nothing_of_hetsim_but_its_errors():
    assert import_edges(project_modules())["hetsim.config"] == {"hetsim.errors"}

"""No circle of imports inside mosaic_jax/: every module's imports (those inside functions too) are read
with ast, and the graph of the package's modules has no cycle.

What an import runs is what counts. `from a.b import c` runs a/__init__.py and a/b/__init__.py before
a.b.c (or before taking the name c from a.b), so an edge goes to every package on the way, except the
importer's own enclosing packages: those have already started (Python runs a package's __init__ before
any of its modules), and a module reaching back into them for one of their submodules is fine. Taking
a plain name from an enclosing package (`from mosaic_jax.model import FluxConfig` inside model/) is
an edge: it needs that package's __init__ to have got that far. So a re-export in an __init__ that
closes a circle (a.x imports b.y; b/__init__.py imports b.z, which imports a.x) is found too.
"""

from __future__ import annotations

import ast
import os
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]


def modules_of(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
  found = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def _enclosing(name: str, is_package: bool) -> set[str]:
  """The packages that have started running when module `name` runs (a package: itself too)."""
  parts = name.split(".")
  return {".".join(parts[:i]) for i in range(1, len(parts) + (1 if is_package else 0))}


def _imported(node: ast.AST, name: str, is_package: bool) -> list[tuple[str, list[str]]]:
  """(module named by the import statement, the names it takes from it) for an Import / ImportFrom."""
  if isinstance(node, ast.Import):
    return [(alias.name, []) for alias in node.names]
  if node.level:  # relative: from the importer's package upwards
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    target = ".".join(base + ([node.module] if node.module else []))
  else:
    target = node.module
  return [(target, [alias.name for alias in node.names])]


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """module -> the package's modules that its imports run (module docstring: which edges count)."""
  modules = modules_of(package_dir)
  graph = {}
  for name, path in modules.items():
    is_package = path.name == "__init__.py"
    started = _enclosing(name, is_package)
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      for target, names in _imported(node, name, is_package):
        parts = target.split(".")
        on_the_way = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        edges |= {m for m in on_the_way if m in modules and m not in started}
        for taken in names:
          if f"{target}.{taken}" in modules:
            edges.add(f"{target}.{taken}")  # a submodule
          elif target in modules:
            edges.add(target)  # a name from the module (or package) itself: it must have run that far
    edges.discard(name)
    graph[name] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One shortest cycle [a, b, ..., a] through the first module of every strongly connected group."""
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def connect(node):  # Tarjan's algorithm
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt not in index:
        connect(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      group = set()
      while True:
        member = stack.pop()
        on_stack.discard(member)
        group.add(member)
        if member == node:
          break
      if len(group) > 1:
        groups.append(group)

  for node in sorted(graph):
    if node not in index:
      connect(node)
  return [_shortest_cycle(graph, group, min(group)) for group in sorted(groups, key=min)]


def _shortest_cycle(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
  """A shortest path start -> ... -> start inside a strongly connected group (breadth first)."""
  paths = {start: [start]}
  frontier = [start]
  while frontier:
    reached = []
    for node in frontier:
      for nxt in sorted(graph[node] & group):
        if nxt == start:
          return paths[node] + [start]
        if nxt not in paths:
          paths[nxt] = paths[node] + [nxt]
          reached.append(nxt)
    frontier = reached
  raise AssertionError(f"{start} is on no cycle of {sorted(group)}")


def test_mosaic_jax_has_no_import_cycle():
  graph = import_graph(ROOT / "mosaic_jax")
  # the graph is read: a few edges every version of the package has
  assert "mosaic_jax.model.transformer" in graph["mosaic_jax.model"]
  assert "mosaic_jax.model.attention" in graph["mosaic_jax.model.transformer"]
  found = cycles(graph)
  assert not found, "import cycles in mosaic_jax/: " + "; ".join(" -> ".join(cycle) for cycle in found)


def _package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for relative, text in files.items():
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root / "pkg"


def test_cycles_through_function_imports_and_package_reexports_are_found(tmp_path):
  package = _package(tmp_path, {
      "pkg/__init__.py": "",
      # a circle closed by an import inside a function
      "pkg/a.py": "from pkg import b\n",
      "pkg/b.py": "def later():\n  from pkg.c import thing\n  return thing\n",
      "pkg/c.py": "import pkg.a\nthing = 1\n",
      # a circle hidden by a package's re-export: importing pkg.sub.low runs pkg/sub/__init__.py first
      "pkg/top.py": "from pkg.sub.low import value\n",
      "pkg/sub/__init__.py": "from pkg.sub.mid import name\n",
      "pkg/sub/mid.py": "from ..top import value as v\nname = 1\n",
      "pkg/sub/low.py": "value = 2\n",
      # no circle: a module reaching back into its own package for a sibling submodule, and a relative import
      "pkg/ok/__init__.py": "from pkg.ok.one import x\n",
      "pkg/ok/one.py": "from pkg.ok import two\nfrom . import two as again\nx = 1\n",
      "pkg/ok/two.py": "y = 2\n",
  })
  graph = import_graph(package)
  assert graph["pkg.top"] == {"pkg.sub", "pkg.sub.low"}
  assert graph["pkg.sub.mid"] == {"pkg.top"}
  assert graph["pkg.ok.one"] == {"pkg.ok.two"}
  found = cycles(graph)
  assert found == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.sub", "pkg.sub.mid", "pkg.top", "pkg.sub"]], found

  # Taking a plain name from the package that is still running its __init__ is a circle.
  (package / "ok" / "two.py").write_text("from pkg.ok import x\ny = 2\n")
  assert ["pkg.ok", "pkg.ok.one", "pkg.ok.two", "pkg.ok"] in cycles(import_graph(package))


def test_the_module_names_match_the_files():
  names = modules_of(ROOT / "mosaic_jax")
  assert names["mosaic_jax"] == ROOT / "mosaic_jax" / "__init__.py"
  assert names["mosaic_jax.train.trainer"] == ROOT / "mosaic_jax" / "train" / "trainer.py"
  assert len(names) == sum(f.endswith(".py") for _, _, files in os.walk(ROOT / "mosaic_jax") for f in files)

"""No import cycle among dit_jax's modules, counting imports inside functions."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_files() -> dict[str, str]:
  """dotted module name -> path, for every .py file under dit_jax/."""
  out = {}
  for directory, _, names in os.walk(os.path.join(ROOT, "dit_jax")):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[dotted.removesuffix(".__init__")] = path
  return out


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
  """module -> the dit_jax modules it imports anywhere in its file (top level or in functions).

  `from package import name` counts as importing the submodule package.name where there is
  one, else the package itself; the implicit import of a submodule's parent package is not
  an edge (every package's __init__ would otherwise be in a cycle with its submodules).
  """
  graph = {}
  for module, path in modules.items():
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    deps = set()
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parent = package
          for _ in range(node.level - 1):
            parent = parent.rpartition(".")[0]
          base = f"{parent}.{base}" if base else parent
        for alias in node.names:
          deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    graph[module] = {d for d in deps if d in modules and d != module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle [a, b, ..., a] of the graph, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        return path[path.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_checker_sees_cycles_and_function_level_imports(tmp_path):
  graph = import_graph(module_files())
  assert "dit_jax.models" in graph["dit_jax.sampling"]
  assert "dit_jax.vae" in graph["dit_jax.sampling"]  # imported inside Decoder.__init__
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
  cycle = find_cycle(import_graph(module_files()))
  assert cycle is None, "import cycle: " + " -> ".join(cycle)

"""No import cycles among moe_jax modules (imports inside functions included)."""

import ast
import os

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "moe_jax")


def _modules() -> dict[str, str]:
  """``{dotted module name: file path}`` of every module of the package."""
  base = os.path.dirname(PACKAGE_DIR)
  out = {}
  for directory, _, files in os.walk(PACKAGE_DIR):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
        out[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
  return out


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
  """The package modules ``module`` imports anywhere in its file."""
  def resolve(name):
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      hit = resolve(target)
      if hit and hit != module and hit.split(".")[0] == "moe_jax":
        out.add(hit)
  return out


def _cycles(graph: dict[str, set[str]]) -> list[frozenset]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(frozenset(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_walker_finds_a_cycle_through_a_function_level_import():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [frozenset({"a", "b", "c"})]
  modules = _modules()
  # moe_jax.train imports moe_jax.gin_utils at module level, and the walker
  # also sees imports made inside functions (gin_utils -> training).
  assert "moe_jax.gin_utils" in _imports("moe_jax.train", modules["moe_jax.train"], modules)
  assert "moe_jax.training.experiment" in _imports(
      "moe_jax.gin_utils", modules["moe_jax.gin_utils"], modules)


def test_no_import_cycles_among_moe_jax_modules():
  cycles = _cycles(_graph())
  assert not cycles, "import cycles: " + "; ".join(
      " <-> ".join(sorted(c)) for c in cycles)

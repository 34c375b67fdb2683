"""No import cycles: between the modules of the package (``unidd_fast/`` and ``kernels/``,
installed as ``unidd_fast.kernels``) and between the scripts of ``bench/``. Every import
counts — at module level, inside functions, and through ``importlib.import_module`` (literal
names, and the modules the backend registry loads by name)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the package as installed."""
    modules = {}
    for top, name in ((ROOT / "unidd_fast", "unidd_fast"), (ROOT / "kernels", "unidd_fast.kernels")):
        for path in top.rglob("*.py"):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([name] + parts)] = path
    return modules


def bench_modules() -> dict[str, Path]:
    return {path.stem: path for path in (ROOT / "bench").glob("*.py")}


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target>`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imported_names(module: str, path: Path, known) -> set[str]:
    """Every module of ``known`` that ``module`` imports. ``from pkg import sub`` imports the
    submodule ``sub`` (the package's own ``__init__`` runs first, as for any module of the
    package: that implicit edge is not counted)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            subs = {f"{base}.{alias.name}" for alias in node.names} & set(known)
            names.update(subs or {base})
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            target = node.args[0].value
            level = len(target) - len(target.lstrip("."))
            names.add(_absolute(module, is_package, level, target.lstrip(".")) if level else target)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for module, path in modules.items():
        graph[module] = {name for name in imported_names(module, path, modules) if name in modules and name != module}
    return graph


def registry_edges() -> set[str]:
    """The backend modules ``kernels/registry.py`` imports by name from its table."""
    from unidd_fast.kernels import registry

    return {f"unidd_fast.kernels{module}" for backend in registry.BACKENDS.values()
            for module, _ in backend.ops.values()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("which", ["package", "bench"])
def test_no_import_cycles(which):
    modules = package_modules() if which == "package" else bench_modules()
    graph = import_graph(modules)
    if which == "package":
        graph["unidd_fast.kernels.registry"] |= registry_edges()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_function_level_and_importlib_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("import importlib\nimportlib.import_module('.a', __package__)\n")
    modules = {"p": pkg / "__init__.py", "p.a": pkg / "a.py", "p.b": pkg / "b.py"}
    assert find_cycle(import_graph(modules)) == ["p.a", "p.b", "p.a"]


def test_the_reference_oracle_is_used_by_tests_only():
    modules = package_modules()
    users = [m for m, path in modules.items() if "unidd_fast.reference" in imported_names(m, path, modules)]
    assert users == []

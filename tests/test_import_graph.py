"""The lever table, the profile and parallel generation depend one way (issue 26): the lever modules come first,
qwendoctor.profile makes the Profile from their fields, qwendoctor.parallel starts ranks that apply them. A
circle among them would make which module works depend on which was imported first; these tests fail on one."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "qwendoctor"
LEVER_MODULES = sorted(f"qwendoctor.levers.{p.stem}" for p in (PACKAGE / "levers").glob("*.py")
                       if p.stem != "__init__")
ONE_WAY = ["qwendoctor.levers", *LEVER_MODULES, "qwendoctor.profile", "qwendoctor.parallel"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(node: ast.AST, importer: str) -> set[str]:
    """The qwendoctor modules an import statement loads (`from package import submodule` names the submodule)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}".rstrip(".")
    named = {f"{base}.{alias.name}" for alias in node.names} & set(MODULES)
    return named or ({base} & set(MODULES))


def _imports(module: str, at_import_only: bool) -> set[str]:
    """What `module` imports: at import time only (module level, TYPE_CHECKING blocks left out), or anywhere."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)) and (top or not at_import_only):
                found.update(_imported(child, module))
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, top and not inner)

    visit(tree, True)
    return found - {module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle found by a depth-first walk (each reported once, from where the walk closed it)."""
    cycles, state, stack = [], {}, []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return cycles


def test_no_import_circle_at_import_time():
    graph = {module: _imports(module, at_import_only=True) for module in MODULES}
    involved = [cycle for cycle in _cycles(graph) if set(cycle) & set(ONE_WAY)]
    assert involved == []


def test_the_levers_never_import_the_profile_or_the_launcher():
    """Not even inside a function, with one declared exception: a bench row builds its Profile when read
    (levers.base.BenchRow.profile), long after every module has loaded."""
    for module in ["qwendoctor.levers", *LEVER_MODULES]:
        imported = _imports(module, at_import_only=False) & {"qwendoctor.profile", "qwendoctor.parallel"}
        assert imported == ({"qwendoctor.profile"} if module == "qwendoctor.levers.base" else set()), module
    assert "qwendoctor.levers" in _imports("qwendoctor.profile", at_import_only=True)
    assert "qwendoctor.levers.parallel" in _imports("qwendoctor.parallel", at_import_only=True)


def test_the_graph_reader_sees_the_imports_it_must():
    assert "qwendoctor.levers.cfg_batching" in _imports("qwendoctor.levers.cache", at_import_only=True)
    assert "qwendoctor.levers.memory" in _imports("qwendoctor.levers.offload", at_import_only=True)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("module", ONE_WAY)
def test_each_module_imports_alone_in_a_fresh_interpreter(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_package_is_shipped():
    """pyproject names its packages one by one: a new one (as levers/ was) must be named there too."""
    import tomllib

    shipped = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {_module_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert packages <= shipped

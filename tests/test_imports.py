"""How the package's modules import each other: no cycles, the layers apart, a public API.

Imports are read from the source (every import statement, also those inside functions, none
of those under `if TYPE_CHECKING:`), so a circle that only closes when a command runs is found
as surely as one at import time.
"""

from __future__ import annotations

import ast
import graphlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "autonomic"


def _modules() -> dict[str, Path]:
    """Every module of the installed layout by dotted name (packages by their __init__)."""
    found: dict[str, Path] = {}
    files = [
        Path(folder, name)
        for folder, _, names in os.walk(PACKAGE, followlinks=True)  # the packages are links
        for name in names
        if name.endswith(".py")
    ]
    for path in sorted(files):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            found += [n for child in node.orelse for n in _imports(child)]
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        found += _imports(node)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The autonomic modules an import statement runs."""
    is_package = MODULES[module].name == "__init__.py"
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join([*anchor, *([base] if base else [])])
        names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return {name for name in names if name in MODULES}


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports. An import of one's own package (`from . import
    __version__`) is left out: Python initialises a package before any module in it."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = set().union(*(_targets(module, n) for n in _imports(tree)))
        graph[module] = {t for t in targets if not module.startswith(f"{t}.")} - {module}
    return graph


def test_the_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "autonomic.runtime.dispatch" in graph["autonomic.runtime.runtime"]
    assert "autonomic.diagnostics" in graph["autonomic.compiler.errors"]
    assert len(MODULES) > 40


def test_no_module_imports_itself_through_others() -> None:
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_layers_stay_apart() -> None:
    """The runtime never imports the compiler; the builder never imports the runtime (only the
    command line hosts the runtime's commands); the shared diagnostics import neither."""
    graph = import_graph()
    for module in graph:
        reached = _reach(graph, module)
        if module.startswith("autonomic.runtime") or module.startswith("autonomic.generated"):
            assert not {m for m in reached if m.startswith("autonomic.compiler")}, module
        if module.startswith("autonomic.compiler") and module != "autonomic.compiler.cli":
            assert not {m for m in reached if m.startswith("autonomic.runtime")}, module
    assert graph["autonomic.diagnostics"] == set()


def test_generated_modules_import_only_the_contract() -> None:
    graph = import_graph()
    for module in graph:
        if module.startswith("autonomic.generated."):
            assert graph[module] == {"autonomic.runtime.tables"}, module


@pytest.mark.parametrize("package", ["autonomic.compiler", "autonomic.runtime"])
def test_public_names_resolve_to_their_homes(package: str) -> None:
    """Every name in `__all__` loads, from the module named for it (nothing private)."""
    module = importlib.import_module(package)
    homes: dict[str, str] = module._HOMES
    assert set(homes) <= set(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        if name in homes:
            home = importlib.import_module(f"{package}.{homes[name]}")
            assert value is getattr(home, name), name
            assert not homes[name].startswith("_")
        assert not name.startswith("_") or name == "__version__"
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_the_runtime_exports_every_error_it_raises() -> None:
    import autonomic.runtime as runtime
    from autonomic.runtime import errors

    failures = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.RuntimeFailure)
    }
    assert failures <= set(runtime.__all__)


def test_the_public_build_survives_its_submodule() -> None:
    """`autonomic.compiler.build` is the function even after compiler/build.py is imported
    (Python would set the package attribute to the module), in a fresh interpreter."""
    probe = (
        "from autonomic.compiler.build import BuildResult\n"
        "import autonomic.compiler as compiler\n"
        "from autonomic.compiler import build, check\n"
        "assert callable(build) and callable(check) and compiler.build is build\n"
        "assert build.__module__ == 'autonomic.compiler'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

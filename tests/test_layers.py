"""The layers contract of ``docs/architecture.md``: every import points down the list of layers, and no module imports
itself back through others.

Imports are read from the source (``ast``), wherever they stand in a module (also inside a function, where a module
defers an import), except under ``if TYPE_CHECKING:``, which names a type and runs nothing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.commands import ROOT

# Top to bottom: a module may import its own layer and the layers below it, never one above. Within the core, the
# layers go from what runs a command down to plain helpers.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("dcccl.flower",),
    ("dcccl.commands",),
    ("lightning_modules",),
    ("datamodules",),
    ("dcccl.deploy", "dcccl.methods"),
    ("dcccl.pipeline",),
    ("dcccl.reporting",),
    ("dcccl.federated",),
    ("dcccl.artifacts",),
    ("dcccl.backbones",),
    ("dcccl.model",),
    ("dcccl", "dcccl.errors", "dcccl.ranks", "dcccl.config_path", "dcccl.registry"),
]
PACKAGES = ("cli.py", "dcccl", "lightning_modules", "datamodules")


def project_modules() -> dict[str, Path]:
    """Every module of the project, by dotted name."""
    found: dict[str, Path] = {}
    for top in PACKAGES:
        for path in ([ROOT / top] if top.endswith(".py") else sorted((ROOT / top).rglob("*.py"))):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node outside ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (child for statement in node.orelse for child in [statement, *_runtime_nodes(statement)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the deepest layer entry that contains ``module``."""
    best, depth = -1, -1
    for index, layer in enumerate(LAYERS):
        for entry in layer:
            if (module == entry or module.startswith(entry + ".")) and entry.count(".") > depth:
                best, depth = index, entry.count(".")
    assert best >= 0, f"{module} is in no layer: add it to LAYERS and to docs/architecture.md"
    return best


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_import_points_down_the_layers() -> None:
    graph = import_graph()
    upward = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                    if layer_of(target) < layer_of(module))
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_module_imports_itself_back() -> None:
    graph = import_graph()
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_contract_sees_the_imports_it_forbids(tmp_path: Path) -> None:
    """The reader finds imports in functions and relative imports, and skips type-only ones."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cli import main\n"
                      "def f():\n    from dcccl.pipeline.plan import dcccl_plan\nfrom .errors import ConfigError\n")
    modules = project_modules()
    assert imports_of("dcccl.probe", source, modules) == {"dcccl.pipeline.plan", "dcccl.errors"}
    assert layer_of("dcccl.pipeline.plan") < layer_of("dcccl.errors")
    assert layer_of("cli") == 0

"""The package's layers: no import circle and nothing imports upward, type-only and function-level imports included.

The dependency order (also in ``lightning_optloss/__init__.py``'s docstring), lowest first; a module may import
modules of its own layer or of lower ones::

    common <- gradients <- distributed <- tf <- mlflow <- core (summaries, pipeline, callback_arguments,
    checkpoint_state, fit_steps, callback, tf.checkpoint) <- the package and demos <- the ``python -m`` entry modules
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_optloss"
ROOT = "lightning_optloss"

# Layer of each module: the first prefix that matches, lowest layer first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("common", ("lightning_optloss.common",)),
    ("gradients", ("lightning_optloss.gradients",)),
    ("distributed", ("lightning_optloss.distributed",)),
    ("tf", ("lightning_optloss.tf",)),
    ("mlflow", ("lightning_optloss.mlflow",)),
    (
        "core",
        (
            "lightning_optloss.summaries",
            "lightning_optloss.pipeline",
            "lightning_optloss.callback_arguments",
            "lightning_optloss.checkpoint_state",
            "lightning_optloss.fit_steps",
            "lightning_optloss.callback",
            # TFCheckpoint hands the TF global step and clipping state to the OptimizeLoss callbacks.
            "lightning_optloss.tf.checkpoint",
        ),
    ),
    ("package and demos", ("lightning_optloss.demos", "lightning_optloss")),
    (
        "entry modules",
        (
            "lightning_optloss.demo",
            "lightning_optloss.example",
            "lightning_optloss.compare",
            "lightning_optloss.mlflow_replay",
            "lightning_optloss.tf_checkpoint",
        ),
    ),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of ``module``: the entry whose prefix names it most precisely."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layering.py's LAYERS: add it there.")
    return best


def imports_of(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (``TYPE_CHECKING`` blocks and
    function bodies included); ``from package import name`` counts as the submodule when ``name`` is one."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name == ROOT or name.startswith(ROOT + "."))
    found.discard(module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_nothing_imports_upward():
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})"
        for module, imported_modules in GRAPH.items()
        for imported in sorted(imported_modules)
        if layer_of(imported) > layer_of(module)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_there_is_no_import_circle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_the_checker_finds_a_circle_and_an_upward_import():
    # The checks themselves, on a made-up graph: a circle through three modules, and a tail outside it.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert layer_of("lightning_optloss.gradients.agc") < layer_of("lightning_optloss.distributed.strategies")


def test_the_gradients_know_no_lightning_and_no_strategy():
    for module, path in MODULES.items():
        if layer_of(module) > layer_of("lightning_optloss.gradients.norms"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        outside = [name for name in imported if name.split(".")[0] == "lightning" or name.startswith("torch.distrib")]
        assert not outside, f"{module} imports {outside}"


@pytest.mark.parametrize("module", ["lightning_optloss.distributed.strategies", "lightning_optloss.pipeline"])
def test_the_strategies_and_the_pipeline_do_not_import_a_clip_implementation(module):
    # They ask the clip object (keywords, needs_whole_rows) instead of recognising its type.
    assert not GRAPH[module] & {
        "lightning_optloss.gradients.agc",
        "lightning_optloss.gradients.autoclip",
        "lightning_optloss.gradients.adaptive_clipping",
    }

"""impls/moe imports only downwards (its __init__ lists the order): the planner, the drop
step, experts, transport and telemetry never reach an upstream adapter, and no cycle forms."""

import ast
from pathlib import Path

MOE = Path(__file__).resolve().parents[2] / "ascend_patch" / "impls" / "moe"
PREFIX = "ascend_patch.impls.moe"
# Bottom first: each may import those before it (and its own subpackage).
LAYERS = ("options", "schemes", "spec_releases", "spec", "planner", "drop_step", "experts",
          "custom_ops", "telemetry", "transport", "state", "adapters")


def _module(path: Path) -> str:
    parts = path.relative_to(MOE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PREFIX, *parts))


MODULES = {_module(p): p for p in MOE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Modules of impls/moe that `path` imports, at any depth (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                     else node.module for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith(PREFIX + ".") and n in MODULES)
    return found


def _layer(module: str) -> int:
    return LAYERS.index(module[len(PREFIX) + 1:].split(".")[0])


def test_every_module_has_a_layer():
    assert sorted({m[len(PREFIX) + 1:].split(".")[0] for m in MODULES if m != PREFIX}) \
        == sorted(LAYERS)


def test_imports_go_down_the_layers():
    upward = {m: sorted(i for i in _imports(p) if _layer(i) > _layer(m))
              for m, p in MODULES.items() if m != PREFIX}
    assert {m: i for m, i in upward.items() if i} == {}


def test_no_import_cycle():
    graph = {m: _imports(p) for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for imported in graph[module]:
            visit(imported, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())

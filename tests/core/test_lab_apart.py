"""Lab tooling (ascend_patch/lab) stays off the product path: no product module imports it,
except `ascend-patch ab --layer`, which imports the layer study when it runs."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ascend_patch"
# The one way in, also named in pyproject's import contracts: inside the functions that
# check and run --layer, never at module level (the parser stays free of torch).
LAYER_COMMAND = ("cli/ab.py", "ascend_patch.lab.layer")


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _lab(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.startswith("ascend_patch.lab"))


def test_no_product_module_imports_the_lab():
    product = [p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts]
    assert len(product) > 50
    offenders = {str(p.relative_to(PACKAGE)): _lab(_imports(p)) for p in product}
    offenders[LAYER_COMMAND[0]] = [n for n in offenders[LAYER_COMMAND[0]]
                                   if not n.startswith(LAYER_COMMAND[1])]
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_layer_command_imports_the_lab_only_when_it_runs():
    path = PACKAGE / LAYER_COMMAND[0]
    assert _lab(_imports(path)), "the check below would pass vacuously"
    assert _lab(_imports(path, module_level_only=True)) == []


def test_the_lab_is_seen_by_the_check():
    imports = _imports(PACKAGE / "lab" / "engine_eval.py")
    assert "ascend_patch.lab.rules" in imports or "ascend_patch.lab" in imports

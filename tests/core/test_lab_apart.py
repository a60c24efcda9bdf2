"""Lab tooling (ascend_patch/lab) stays off the product path: no product module imports it.
The A/B commands, lab-side tooling themselves, may use its routing simulation."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ascend_patch"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_ab_tooling(path: Path) -> bool:
    """The A/B commands (cli/ab*.py, or an ab/ package): benchmark tooling that simulates
    routing with the lab's routing_sim; they run no engine with a lab planner."""
    parts = path.relative_to(PACKAGE).parts
    return "ab" in parts[:-1] or (parts[0] == "cli" and parts[-1].startswith("ab"))


def test_no_product_module_imports_the_lab():
    product = [p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts
               and not _is_ab_tooling(p)]
    assert len(product) > 50
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p)
                                                     if n.startswith("ascend_patch.lab"))
                 for p in product}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_lab_is_seen_by_the_check():
    imports = _imports(PACKAGE / "lab" / "engine_eval.py")
    assert "ascend_patch.lab.rules" in imports or "ascend_patch.lab" in imports


def test_ab_tooling_uses_only_the_lab_simulation():
    """Not the lab's planner rules or engine hooks: those act only in lab processes."""
    tooling = [p for p in PACKAGE.rglob("*.py") if _is_ab_tooling(p)]
    assert tooling
    allowed = ("ascend_patch.lab.routing_sim", "ascend_patch.lab.ab_layer")
    used = {n for p in tooling for n in _imports(p)
            if n.startswith("ascend_patch.lab.") and not n.startswith(allowed)}
    assert used == set()

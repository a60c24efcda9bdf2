"""Lab tooling (ascend_patch/lab) stays off the product path: no product module imports it."""

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


def test_no_product_module_imports_the_lab():
    product = [p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts]
    assert len(product) > 50
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p)
                                                     if n.startswith("ascend_patch.lab"))
                 for p in product}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_lab_is_seen_by_the_check():
    imports = _imports(PACKAGE / "lab" / "engine_eval.py")
    assert "ascend_patch.lab.rules" in imports or "ascend_patch.lab" in imports

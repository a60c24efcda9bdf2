"""The README's promises that code can check: the two commands exist, every key is documented."""

from pathlib import Path

import pytest

from ascend_patch.core import catalog
from ascend_patch.core.spec import ConfigSpec, PatchOverride, PatchSpec, ProfileMatch, ProfileSpec

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def test_the_two_commands_and_ci_agree():
    assert "bash scripts/demo.sh" in README and "bash scripts/test.sh" in README
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    for script in ("demo.sh", "test.sh", "setup.sh"):
        assert (REPO / "scripts" / script).is_file()


MODELS = [ConfigSpec, PatchSpec, ProfileSpec, ProfileMatch, PatchOverride] + [
    catalog.lookup(name).options for name in catalog.builtin_names()
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_key_is_in_the_reference(model):
    for name in model.model_fields:
        assert f"| `{name}` |" in README, f"{model.__name__}.{name} missing from README (run scripts/spec_reference.py)"


def test_every_catalog_entry_is_described():
    for name in catalog.builtin_names():
        assert f"| `{name}` |" in README


def test_no_file_cites_documents_users_do_not_have():
    """Users get the package, the docs and the scripts; the working notes they were written from
    are not shipped, so nothing may send a reader to them."""
    cited = []
    for folder in ("ascend_patch", "docs", "scripts", "tests", "configs"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".yaml", ".sh", ".txt", ".json"):
                cited += [f"{path.relative_to(REPO)}:{n}" for n, line in
                          enumerate(path.read_text(errors="replace").splitlines(), 1)
                          if "REFERENCE" + ".md" in line or "../" + "shared" in line]
    cited += [f"README.md:{n}" for n, line in enumerate(README.splitlines(), 1)
              if "REFERENCE" + ".md" in line]
    assert cited == []


def test_the_support_table_is_the_registry():
    from ascend_patch.core.stacks import SUPPORT_BEGIN, SUPPORT_END, support_table

    begin, end = README.index(SUPPORT_BEGIN), README.index(SUPPORT_END) + len(SUPPORT_END)
    assert README[begin:end] == support_table(), (
        "README's support table differs from the stack registry: paste "
        "`python -m ascend_patch.core.stacks support-table` over it")

"""The README and the docs site: the promises code can check. The reference pages are generated
from the code (scripts/gen_docs.py) and must not drift from it; the README stays short, keeps
the two commands CI runs, and links only to pages that exist."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from ascend_patch.core import catalog, settings
from ascend_patch.core.spec import ConfigSpec, PatchOverride, PatchSpec, ProfileMatch, ProfileSpec

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"
REFERENCE = DOCS / "reference"


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_docs = _gen_docs()


def test_the_two_commands_and_ci_agree():
    assert "bash scripts/demo.sh" in README and "bash scripts/test.sh" in README
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    for script in ("demo.sh", "test.sh", "setup.sh", "setup_docs.sh"):
        assert (REPO / "scripts" / script).is_file()


def test_the_readme_is_at_most_200_lines():
    assert len(README.splitlines()) <= 200


def test_the_reference_pages_are_what_the_code_generates(tmp_path):
    gen_docs.write(tmp_path)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == sorted(p.name for p in REFERENCE.glob("*.md")), (
        "docs/reference/ holds other pages than scripts/gen_docs.py writes")
    stale = [name for name in generated
             if (tmp_path / name).read_text() != (REFERENCE / name).read_text()]
    assert stale == [], f"docs/reference/{stale} differ from the code: run python scripts/gen_docs.py"


@pytest.mark.parametrize("page", gen_docs.WITH_SUPPORT_TABLE, ids=lambda p: p.name)
def test_the_support_tables_are_the_registry(page):
    text = page.read_text()
    assert gen_docs.readme_with_support_table(text) == text, (
        f"{page.relative_to(REPO)}'s support table differs from the stack registry: "
        "run python scripts/gen_docs.py")


MODELS = [ConfigSpec, PatchSpec, ProfileSpec, ProfileMatch, PatchOverride] + [
    catalog.lookup(name).options for name in catalog.builtin_names()
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_key_is_in_the_config_reference(model):
    page = (REFERENCE / "config.md").read_text()
    for name in model.model_fields:
        assert f"| `{name}` |" in page, f"{model.__name__}.{name} missing: run scripts/gen_docs.py"


def test_every_catalog_entry_and_variable_is_described():
    catalog_page = (REFERENCE / "catalog.md").read_text()
    for name in catalog.builtin_names():
        assert f"| `{name}` |" in catalog_page
    environment = (REFERENCE / "environment.md").read_text()
    for name in settings.KNOWN:
        assert f"| `{name}` |" in environment


def test_a_setting_without_a_description_stops_the_generator(monkeypatch):
    field = settings.Settings.model_fields["log_level"]
    monkeypatch.setattr(field, "description", None)
    with pytest.raises(SystemExit, match="ASCEND_PATCH_LOG_LEVEL"):
        gen_docs.environment_page()


def test_every_cli_command_and_flag_is_in_the_cli_reference():
    from ascend_patch.cli.main import build_parser

    page = (REFERENCE / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and
               isinstance(a.choices, dict))
    for name, command in sub.choices.items():
        assert f"\n## {name}\n" in page
        for action in command._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page, (name, flag)


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        for value in (entry.values() if isinstance(entry, dict) else [entry]):
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(nav) == on_disk


def test_the_readme_links_to_files_that_exist():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links into the docs"
    assert [link for link in local if not (REPO / link).exists()] == []


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


def _metric_names() -> set[str]:
    page = (REFERENCE / "metrics.md").read_text()
    return set(re.findall(r"\| `(ascend_patch_\w+)` \|", page))


def test_the_dashboard_and_alerts_use_only_real_series():
    known = _metric_names()
    assert "ascend_patch_moe_rows_dropped_total" in known
    dashboard = json.loads((DOCS / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = yaml.safe_load((DOCS / "monitoring" / "prometheus-alerts.yaml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"ascend_patch_\w+", expr)}
    assert used and used <= known, used - known
    alert = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    drop_share = alert["AscendPatchDropShareAboveBudget"]["expr"]
    assert "ascend_patch_moe_rows_dropped_total" in drop_share
    assert "ascend_patch_moe_rows_routed_total" in drop_share

"""The `ascend-patch` commands the README and the docs tell users to run, run here as written.

Every page's bash blocks are read in order: a `cat > FILE <<'EOF'` heredoc writes its file,
and each `validate`, `plan`, `schema`, `doctor` and `tiny-model` command runs through the CLI
in a scratch folder where `configs/` is the repository's, and must exit 0. Commands that need
what this machine lacks are left out by their form alone: shell variables (`$src`: a fetched
source tree), `ab` (engines) and serving commands (not `ascend-patch`)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ascend_patch.cli.main import main

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs" / "tutorial").glob("*.md")),
         *sorted((REPO / "docs" / "how-to").glob("*.md"))]
RUN = ("validate", "plan", "schema", "doctor", "tiny-model")
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
HEREDOC = re.compile(r"cat > (\S+) <<'EOF'\n(.*?)\nEOF\n", re.S)


def steps(page: Path) -> list[tuple[str, object]]:
    """("write", (name, text)) and ("run", argv), in the page's order."""
    out: list[tuple[str, object]] = []
    for block in BLOCK.findall(page.read_text()):
        pos = 0
        for match in HEREDOC.finditer(block):
            out += _commands(block[pos:match.start()])
            out.append(("write", (match.group(1), match.group(2) + "\n")))
            pos = match.end()
        out += _commands(block[pos:])
    return out


def _commands(text: str) -> list[tuple[str, object]]:
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line.split(">", 1)[0], comments=True)
        if len(words) > 1 and words[0] == "ascend-patch" and words[1] in RUN and "$" not in line:
            out.append(("run", words[1:]))
    return out


def test_the_pages_document_these_commands():
    ran = {tuple(argv[:1]) for page in PAGES for kind, argv in steps(page) if kind == "run"}
    assert ran >= {("validate",), ("plan",), ("schema",), ("doctor",), ("tiny-model",)}
    quickstart = steps(REPO / "README.md")
    assert [kind for kind, _ in quickstart][:4] == ["write", "run", "run", "run"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_commands_run(page, tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    for kind, what in steps(page):
        if kind == "write":
            name, text = what
            (tmp_path / name).write_text(text)
            continue
        code = main(list(what))
        captured = capsys.readouterr()
        assert code == 0, (page.name, what, captured.err)
        if what[0] == "validate":
            assert f"{what[1]}: OK for " in captured.out

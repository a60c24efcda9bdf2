"""The package keeps its shape: `lint-imports` holds every [tool.importlinter] contract of
pyproject.toml (layers, the lab off the product path, no import cycles)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports() -> str:
    """The `lint-imports` of this interpreter's environment (the test extra installs it)."""
    beside = Path(sys.executable).parent / "lint-imports"
    found = str(beside) if beside.is_file() else shutil.which("lint-imports")
    assert found, ("lint-imports not found: import-linter is in the test extra "
                   "(scripts/setup.sh installs it)")
    return found


def test_import_contracts_are_kept():
    # The contracts are read from pyproject.toml in the working directory; the package is
    # found on PYTHONPATH (grimp reads the source, it imports nothing of it).
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([lint_imports(), "--no-cache"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout, done.stdout[-3000:]

#!/usr/bin/env bash
# Create .venvs/docs: the docs site's build tools (mkdocs, mkdocs-material), every version
# pinned in scripts/docs-requirements.txt. The site is built from docs/ alone (its reference
# pages are generated and committed: scripts/gen_docs.py), so this environment holds neither
# this package nor torch. Rebuilt only when the requirements or this script change.
#   bash scripts/setup_docs.sh && .venvs/docs/bin/mkdocs build --strict
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
venv=.venvs/docs
stamp=$venv/.ascend-patch-setup
want=$(sha256sum scripts/docs-requirements.txt scripts/setup_docs.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "setup: docs environment (mkdocs) in $venv" >&2
[[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
# Same filter as setup.sh: some machines' pip configs name package folders that do not exist.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -r scripts/docs-requirements.txt 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
echo "$want" > "$stamp"

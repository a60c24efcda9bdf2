#!/usr/bin/env bash
# Create .venvs/light: this package with only its light dependencies (pyproject's
# `dependencies`: no torch, no vLLM). tests/test_light_venv.py runs `validate --source` and
# `plan` in it, which is how a machine without torch (a CI runner, a laptop checking an
# Ascend config) uses them. Rebuilt only when pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
venv=.venvs/light
stamp=$venv/.ascend-patch-setup
want=$(sha256sum pyproject.toml scripts/setup_light.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "setup: light environment (no torch, no vLLM) in $venv" >&2
[[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
pip_install() {
  # Same filter as setup.sh: some machines' pip configs name package folders that do not exist.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
}
# The dependencies as pyproject declares them, then the package itself without any extra.
mapfile -t deps < <("$venv/bin/python" -c \
  'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
pip_install "${deps[@]}"
pip_install --no-deps -e .
"$venv/bin/python" - <<'PY'
import importlib.util, sys
heavy = [m for m in ("torch", "vllm") if importlib.util.find_spec(m) is not None]
sys.exit(f"setup_light.sh: {heavy} installed in the light environment" if heavy else 0)
PY
echo "$want" > "$stamp"

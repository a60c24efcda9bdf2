#!/usr/bin/env bash
# Set everything up, then serve a tiny MoE model under a shipped config and answer real requests.
#   scripts/demo.sh [--line 0.23] [demo.py options]    default: the primary stack's environment
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
env=$("$PYTHON" -m ascend_patch.core.stacks primary)
if [[ ${1:-} == --line ]]; then
  [[ $# -ge 2 ]] || { echo "demo.sh: --line needs a vLLM line ($("$PYTHON" -m ascend_patch.core.stacks environments | sed 's/^vllm-//' | xargs))" >&2; exit 2; }
  env=vllm-$2
  shift 2
fi
bash scripts/setup.sh "$env"
exec ".venvs/$env/bin/python" scripts/demo.py "$@"

#!/usr/bin/env bash
# Set everything up, then serve a tiny MoE model under a shipped config and answer real requests.
#   scripts/demo.sh [--line 0.23] [demo.py options]    default: the vLLM 0.32 line
set -euo pipefail
cd "$(dirname "$0")/.."
line=0.32
if [[ ${1:-} == --line ]]; then
  [[ $# -ge 2 ]] || { echo "demo.sh: --line needs a vLLM line (0.32 or 0.23)" >&2; exit 2; }
  line=$2
  shift 2
fi
bash scripts/setup.sh "$line"
exec ".venvs/vllm-$line/bin/python" scripts/demo.py "$@"

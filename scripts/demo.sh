#!/usr/bin/env bash
# Set everything up, then serve a tiny MoE model under a shipped config and answer real requests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"

#!/usr/bin/env bash
# Fetch a vllm-ascend release's source once (scripts/fetch_source.sh does the work; kept for
# the callers and habits that name vllm-ascend).
#
#   scripts/fetch_vllm_ascend.sh                the first declared release: prints its directory
#   scripts/fetch_vllm_ascend.sh 0.23.0.post1   that release
set -euo pipefail
exec bash "$(dirname "$0")/fetch_source.sh" vllm-ascend "$@"

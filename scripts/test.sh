#!/usr/bin/env bash
# Set everything up, then run the whole test suite (what CI runs). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
# pytest exits 5 when it collected no test (e.g. a -k that matches nothing): not a failure of ours.
if [[ $code -eq 5 ]]; then
  echo "pytest collected no tests"
  exit 0
fi
exit $code

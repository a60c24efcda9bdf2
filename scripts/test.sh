#!/usr/bin/env bash
# Set everything up, then run the test suite tier by tier on every environment the stack
# registry (ascend_patch/core/stacks.py) declares. This is what CI runs.
#
#   scripts/test.sh                     static check, then every environment's tiers
#   scripts/test.sh --env vllm-0.23     one environment (its tiers)
#   scripts/test.sh --tier contract     one tier, in every environment that runs it
#   scripts/test.sh --tier docs         the docs site's strict build only
#   scripts/test.sh --env vllm-0.23 --tier e2e   a tier where CI does not run it
#   scripts/test.sh -m slow             the slow tier (multi-node, studies; not in CI)
#   scripts/test.sh -k capacity         other arguments go to pytest
#   scripts/test.sh --serial            one step at a time (default: two lanes, below)
#
# Tiers (tests/conftest.py): unit (no vLLM import) runs once, in the primary environment;
# contract in every CPU stack's environment; ascend (tests/ascend's contract tests only) in an
# environment built for a vllm-ascend release alone (vLLM 0.18, 0.13); e2e (engines, servers)
# in the primary one; smoke (one server) in each other CPU environment. Each tier prints its slowest tests, and a closing table the
# time of each step; test-results/ keeps each tier's junit file, log and that table.
#
# Two lanes share the machine (CI has 2 cores), each running its steps one after another: the
# engine tiers (e2e, smoke), whose time is mostly processes starting and waiting on each
# other, never two at once, then the short ascend tiers (they even the lanes out); beside
# them static, docs, unit and contract. Each step's output is printed whole when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stacks() { "$PYTHON" -m ascend_patch.core.stacks "$@"; }

only_env="" only_tier="" slow=0 serial=0 args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --env|--line)
      [[ $# -ge 2 ]] || { echo "test.sh: $1 needs an environment name" >&2; exit 2; }
      only_env=$2; [[ $only_env == vllm-* ]] || only_env=vllm-$only_env; shift 2 ;;
    --tier)
      [[ $# -ge 2 ]] || { echo "test.sh: --tier needs a tier name" >&2; exit 2; }
      only_tier=$2; shift 2 ;;
    --serial) serial=1; shift ;;
    -m)
      [[ ${2:-} == slow ]] || { echo "test.sh: -m takes only 'slow' (tiers select the rest)" >&2; exit 2; }
      slow=1; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

mapfile -t envs < <(stacks environments)
if [[ -n $only_env ]]; then
  [[ " ${envs[*]} " == *" $only_env "* ]] || {
    echo "test.sh: unknown environment '$only_env' (declared: ${envs[*]})" >&2; exit 2; }
  envs=("$only_env")
fi

# Each tier's junit file stays in test-results/ (CI systems read them; so can you).
results=test-results
rm -rf "$results"
mkdir -p "$results"
timings=$results/steps.txt
step() {  # step NAME SECONDS STATUS [LANE]
  printf '%-28s %6ss  %-6s %s\n' "$1" "$2" "${4:-}" "$3" >>"$timings"
}

suite_began=$SECONDS
began=$SECONDS
bash scripts/setup.sh "${envs[@]}"
step "setup" $((SECONDS - began)) ok

# Every declared upstream source (each vllm-ascend release, vLLM's own Python files), read
# (never imported) by the static check and the tests (tests/ascend/harness.py finds them in the
# cache), whichever tier runs.
while read -r _key _package dist version _rest; do
  bash scripts/fetch_source.sh "$dist" "$version" >/dev/null
done < <(stacks sources)
TEST_VLLM_ASCEND_SRC=$(bash scripts/fetch_vllm_ascend.sh)
export TEST_VLLM_ASCEND_SRC

# A step's log, printed whole under its name once it ends (lanes never interleave lines), and
# its line in the table; a failure marks the suite failed.
finish_step() {  # finish_step LABEL SECONDS STATUS LANE LOG
  {
    flock 9
    echo "=== $1 [$4 lane, $2 s] ==="
    cat "$5"
    step "$1" "$2" "$3" "$4"
    [[ $3 == ok || $3 == "no tests selected" ]] || echo "$1" >>"$results/failed"
  } 9>"$results/.print.lock"
}

# Static check first: every shipped config against the real upstream sources of every stack
# that declares some (vllm-ascend's sdist, vLLM's wheels' python files: scripts/fetch_source.sh),
# in the environment without torch or vLLM.
run_static() {  # run_static LANE
  local began=$SECONDS python=.venvs/light/bin/python static_ok=ok log=$results/static.log
  local key package dist version configs config line platform dir
  declare -A stack_sources=() stack_configs=()
  local stack_order=()
  while read -r key package dist version _sha _archive configs; do
    [[ -n ${stack_configs[$key]+set} ]] || stack_order+=("$key")
    dir=$(bash scripts/fetch_source.sh "$dist" "$version")
    stack_sources[$key]+=" --source $package=$dir"
    stack_configs[$key]=$configs
  done < <(stacks sources)
  for key in "${stack_order[@]}"; do
    line=${key%/*} platform=${key#*/}
    configs=${stack_configs[$key]}
    for config in ${configs//,/ }; do
      [[ $config != - ]] || continue  # a stack that ships no config of its own
      echo "static: $config on vLLM $line/$platform"
      # shellcheck disable=SC2086  # the --source pairs hold no spaces
      "$python" -m ascend_patch validate "$config" --platform "$platform" \
          --vllm-line "$line" ${stack_sources[$key]} || static_ok=FAILED
    done
  done >"$log" 2>&1
  finish_step static $((SECONDS - began)) "$static_ok" "$1" "$log"
}

# The docs site (mkdocs.yml) in strict mode: a broken link, a missing page or a page left out of
# the nav fails. Its reference pages are generated (scripts/gen_docs.py); the unit tier's
# tests/test_docs.py fails when they drift from the code.
run_docs() {  # run_docs LANE
  local began=$SECONDS site docs_ok=ok log=$results/docs.log
  site=$(mktemp -d)
  .venvs/docs/bin/mkdocs build --strict --site-dir "$site" >"$log" 2>&1 || docs_ok=FAILED
  rm -rf "$site"
  finish_step docs $((SECONDS - began)) "$docs_ok" "$1" "$log"
}

run_tier() {  # run_tier ENV TIER LANE
  local env=$1 tier=$2 code began=$SECONDS label result log
  label="$tier ($env)"
  log=$results/$env-$tier.log
  local select=(--tier "$tier")
  [[ $tier != slow ]] || select=(-m slow)
  set +e
  ".venvs/$env/bin/python" -m pytest "${select[@]}" --durations=10 \
    --junitxml="$results/$env-$tier.xml" "${args[@]}" >"$log" 2>&1
  code=$?
  set -e
  # pytest exits 5 when it selected no test (a -k matching nothing in this tier): not a failure.
  case $code in
    0) result=ok ;;
    5) result="no tests selected" ;;
    *) result="FAILED (pytest exit $code)" ;;
  esac
  finish_step "$label" $((SECONDS - began)) "$result" "$3" "$log"
}

# The steps, each in its lane: "engines" (e2e, smoke, slow, then ascend) or "checks" (the rest).
checks=() engines=() late=()
if [[ $slow -eq 1 ]]; then
  engines+=("${envs[0]} slow")
else
  [[ -n $only_tier && $only_tier != static ]] || checks+=(static)
  [[ -n $only_tier && $only_tier != docs ]] || checks+=(docs)
  for env in "${envs[@]}"; do
    if [[ -n $only_env && -n $only_tier && $only_tier != static && $only_tier != docs ]]; then
      # Both named: run that tier there even where CI does not (the full e2e tier on another
      # line, say).
      tiers=("$only_tier")
    else
      mapfile -t tiers < <(stacks tiers "$env")
    fi
    for tier in "${tiers[@]}"; do
      [[ -z $only_tier || $only_tier == "$tier" ]] || continue
      case $tier in
        e2e|smoke) engines+=("$env $tier") ;;
        ascend) late+=("$env $tier") ;;
        *) checks+=("$env $tier") ;;
      esac
    done
  done
fi

engines+=("${late[@]}")

run_lane() {  # run_lane LANE STEP...
  local lane=$1 item
  shift
  for item in "$@"; do
    case $item in
      static) run_static "$lane" ;;
      docs) run_docs "$lane" ;;
      *) run_tier ${item% *} ${item#* } "$lane" ;;
    esac
  done
}

if [[ $serial -eq 1 ]]; then
  run_lane checks "${checks[@]}"
  run_lane engines "${engines[@]}"
else
  run_lane engines "${engines[@]}" &
  engines_pid=$!
  run_lane checks "${checks[@]}"
  wait "$engines_pid" || echo "engines lane (exit $?)" >>"$results/failed"
fi
step "all steps (wall)" $((SECONDS - suite_began)) done

echo
echo "=== time per step ==="
cat "$timings"
# One closing line over every tier's run (pytest prints one per run).
"$PYTHON" - "$results" <<'PY'
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
print(f"all tiers: {passed} passed, {failed} failed, {totals['skipped']} skipped")
PY
if [[ -s $results/failed ]]; then
  echo "failed: $(paste -sd, "$results/failed")"
  exit 1
fi

"""`validate --source` and `plan` for another stack run where neither torch nor vLLM is
installed: in .venvs/light (scripts/setup_light.sh), which holds this package and the light
dependencies of pyproject only. Each command runs in a fresh interpreter of that environment
that records every attempt to import torch or vllm, and -X importtime lists every module it
did import: a lazy import that a try/except would swallow still fails the test."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.ascend import harness
from tests.upstream_sources import require_vllm_source

REPO = Path(__file__).resolve().parents[1]
LIGHT = REPO / ".venvs" / "light" / "bin" / "python"
HEAVY = ("torch", "vllm")
PROD = REPO / "configs" / "prod.yaml"
STACK = ["--platform", "ascend", "--vllm-line", "0.23"]

# Runs the CLI as the `ascend-patch` script does, with a finder in front of every other that
# notes each lookup of a heavy package (and finds nothing, so the normal import goes on).
RUN_CLI = f"""
import importlib.abc, json, os, sys
HEAVY = {HEAVY!r}
asked = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HEAVY:
            asked.append(name)
        return None
sys.meta_path.insert(0, Watch())
from ascend_patch.cli.main import main
try:
    code = main(sys.argv[1:])
finally:
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in HEAVY)
    with open(os.environ["LIGHT_REPORT"], "w") as report:
        json.dump({{"asked": asked, "loaded": loaded}}, report)
sys.exit(code)
"""


@pytest.fixture(scope="session")
def light_python() -> Path:
    """.venvs/light, made (or found up to date) by the script that setup.sh runs too."""
    made = subprocess.run(["bash", str(REPO / "scripts" / "setup_light.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, f"scripts/setup_light.sh failed:\n{made.stderr[-3000:]}"
    heavy = subprocess.run(
        [str(LIGHT), "-c", "import importlib.util as u, sys; "
         f"print(*[m for m in {HEAVY!r} if u.find_spec(m)])"],
        capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})
    assert heavy.returncode == 0 and heavy.stdout.split() == [], heavy
    return LIGHT


def run_light(python: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    report = tmp_path / "imports.json"
    # Only what the command needs: no PYTHONPATH of the caller's environment (which may
    # reach a torch), this checkout first on the path.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)),
           "PYTHONPATH": str(REPO), "LIGHT_REPORT": str(report)}
    done = subprocess.run([str(python), "-X", "importtime", "-c", RUN_CLI, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads(report.read_text())
    assert recorded == {"asked": [], "loaded": []}, recorded
    # importtime lines: "import time: self [us] | cumulative | module"
    imported = [line.rpartition("|")[2].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")]
    assert "ascend_patch.cli.main" in imported  # the listing is there to be read
    assert [m for m in imported if m.partition(".")[0] in HEAVY] == []
    return done


def test_validate_with_source_needs_neither_torch_nor_vllm(light_python, tmp_path):
    source = harness.require_source()
    vllm = require_vllm_source("0.23.0")  # the adapter reads vLLM objects under vllm-ascend
    done = run_light(light_python, tmp_path, "validate", str(PROD), *STACK,
                     "--source", f"vllm_ascend={source}", "--source", f"vllm={vllm}")
    assert "OK for vLLM 0.23.x (line 0.23), platform ascend" in done.stdout


@pytest.mark.parametrize("line", ["0.33", "0.34"])
def test_validate_a_cuda_only_line_against_its_wheel_needs_neither_torch_nor_vllm(
        light_python, tmp_path, line):
    vllm = require_vllm_source(f"{line}.0")
    done = run_light(light_python, tmp_path, "validate", str(PROD), "--platform", "cuda",
                     "--vllm-line", line, "--source", f"vllm={vllm}")
    assert f"OK for vLLM {line}.x (line {line}), platform vllm (3 patches" in done.stdout


def test_plan_for_another_stack_needs_neither_torch_nor_vllm(light_python, tmp_path):
    done = run_light(light_python, tmp_path, "plan", str(PROD), *STACK, "--json")
    plan = json.loads(done.stdout)
    assert plan["platform"] == "ascend" and plan["vllm_line"] == "0.23"
    assert {p["name"] for p in plan["patches"]} == {"rms-norm", "swiglu", "moe"}


def test_the_check_sees_a_heavy_import(light_python, tmp_path):
    """The recording works: an import of torch that fails and is swallowed is still seen."""
    report = tmp_path / "imports.json"
    probe = RUN_CLI.replace("from ascend_patch.cli.main import main",
                            "from ascend_patch.cli.main import main\n"
                            "try:\n    import torch\nexcept ImportError:\n    pass")
    done = subprocess.run([str(light_python), "-c", probe, "schema"], cwd=REPO, text=True,
                          capture_output=True, timeout=120,
                          env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO),
                               "LIGHT_REPORT": str(report)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(report.read_text())["asked"] == ["torch"]

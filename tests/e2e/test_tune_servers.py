"""`ascend-patch tune --launch`: the tuner's arms as real vLLM CPU servers of the trained tiny
MoE (tests/data/tiny-moe-stdlib, real weights), one at a time.

Small on purpose (one candidate, 3 held-out prompts, 6 rounds of 2 requests: the fewest with
a 95% interval); which ratio wins is the machine's to say, so the test checks what tune
wrote against what it measured, not the choice. The choice and the intervals are checked
against a separate `ab` run by scripts/tune_vs_ab.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ascend_patch.cli.main import main

# Two server start-ups and their rounds: minutes on the CI machine, so the slow tier.
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "tests" / "data" / "tiny-moe-stdlib"
BASE = """
version: 1
patches:
  - name: moe
    impl: moe.capacity
    options: {simulate_ep_size: 4, min_tokens: 0}
"""


def test_tune_on_live_servers_writes_a_profile_that_plan_chooses(tmp_path, write_config,
                                                                  capsys):
    config = write_config(BASE, name="base.yaml")
    text = (MODEL / "heldout.txt").read_text()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([text[i * 600:(i + 1) * 600] for i in range(3)]))
    tuned = tmp_path / "tuned.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "ascend_patch", "tune", str(config), "--model", str(MODEL),
         "--max-loss", "1.0", "--ratios", "0.2", "--overflow", "drop", "--launch",
         "--one-at-a-time", "--requests", "2", "--concurrency", "2", "--repeats", "6",
         "--max-tokens", "2", "--prompts", str(prompts), "--timeout", "240",
         "--write", str(tuned), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=560)  # inside pytest's 600 s: output is shown
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (name, profile), = yaml.safe_load(tuned.read_text())["profiles"].items()
    evidence = profile["evidence"]
    assert evidence["mode"] == "live servers, one per arm (one at a time (--one-at-a-time))"
    (arm,) = evidence["arms"]
    assert arm["label"] == "r=0.2 drop"
    loss, speed = arm["nll_increase"], arm["speedup"]
    assert loss["prompts"] == 3 and loss["lo"] <= loss["mean"] <= loss["hi"]
    assert speed["n"] == 6 and speed["lo"] <= speed["median"] <= speed["hi"]
    assert len(arm["times_s"]) == len(evidence["reference_s"]) == 6
    # What was written is what the figures decide.
    chosen = loss["hi"] <= 1.0 and speed["lo"] > 1.0
    assert evidence["chosen"] == ("r=0.2 drop" if chosen else "r=0")
    assert profile["patches"]["moe"]["options"] == (
        {"drop_token_ratio": 0.2, "overflow": "drop"} if chosen else {"drop_token_ratio": 0.0})
    assert main(["validate", str(tuned)]) == 0
    capsys.readouterr()
    assert main(["plan", "--json", "--no-check", "--model", str(MODEL), str(tuned)]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == name
    # The reference's held-out NLL is the trained model's, well below a uniform guess.
    reference = evidence["reference_nll"]
    assert reference["tokens"] > 100
    assert math.exp(reference["nats_per_token"]) < 4096

"""`ascend-patch ab --launch`: a live A/B between two real vLLM CPU servers on 127.0.0.1.

Stock vLLM (no ASCEND_PATCH_CONFIG) against the same model with moe.capacity dropping 10% of
the routed rows. Small on purpose (tiny model, 4 short requests a round, 6 rounds: the fewest
with a 95% interval): the suite runs on two vLLM lines on a 2-core machine.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Two servers for six rounds: minutes on the CI machine, so the slow tier (`scripts/test.sh
# -m slow`); the A/B tool's own logic is unit-tested in tests/cli against fake servers.
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CONFIG = """
version: 1
patches:
  - name: moe
    impl: moe.capacity
    options: {drop_token_ratio: 0.1, min_tokens: 0}
"""


def live(pgid: int) -> bool:
    """Whether a process of the group is still alive (zombies reaped by init do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_live_ab_stock_against_patched_servers(tiny_model, tmp_path, write_config):
    config = write_config(CONFIG, name="drop10.yaml")
    out = tmp_path / "ab"
    run = subprocess.run(
        [sys.executable, "-m", "ascend_patch", "ab", "--launch", "stock", str(config),
         "--model", str(tiny_model), "--requests", "4", "--concurrency", "2", "--repeats", "6",
         "--prompt-len", "64", "--max-tokens", "8", "--timeout", "240", "--out", str(out)],
        capture_output=True, text=True, timeout=560)  # inside pytest's 600 s: output is shown
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((out / "ab.json").read_text())
    stock, patched = summary["servers"]
    assert [stock["label"], patched["label"]] == ["stock", "drop10"]
    for server in (stock, patched):
        assert [len(r["requests"]) for r in server["rounds"]] == [4] * 6
        assert len(server["warmup_rounds"]) == 1
        # ignore_eos: every request streamed exactly the tokens it asked for.
        requested = [[r["max_tokens"] for r in w] for w in summary["workloads"][1:]]
        assert [[q["output_tokens"] for q in r["requests"]] for r in server["rounds"]] == requested
        for key in ("ttft_s", "tpot_s", "requests_per_s"):
            est = server[key]
            assert est["n"] >= 6 and est["lo"] <= est["median"] <= est["hi"], (key, est)
        assert server["info"]["kind"] == "launched"
        assert server["info"]["vllm"]  # from the server's own /version
        # The launched server's whole process group is gone.
        deadline = time.monotonic() + 10
        while live(server["info"]["pgid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not live(server["info"]["pgid"])
    # What each server ran, from its own reports: nothing for stock, the patch for the other.
    assert "report" not in stock["info"]
    assert stock["info"]["what"] == "vLLM with no patch (ASCEND_PATCH_CONFIG unset)"
    moe = patched["info"]["report"]["patches"]["moe"]
    assert "applied" in moe["status"].values(), moe["status"]
    assert moe["options"]["drop_token_ratio"] == 0.1
    assert patched["info"]["report"]["moe_stats"]["rows_dropped"] > 0
    assert stock["token_agreement"] == 1.0
    # Held-out NLL from echoed prompt logprobs, one per generated prompt (8 of 64 words).
    assert [p["tokens"] for p in stock["nll"]["per_prompt"]] == [63] * 8
    assert stock["nll_increase"] == 0.0 and math.isfinite(patched["nll_increase"])
    assert 0.0 <= patched["token_agreement"] <= 1.0
    assert patched["ttft_verdict"] in ("better", "worse", "no measurable difference")
    text = " ".join(run.stdout.split())
    assert "B = drop10: " not in text  # labels of 10 characters or fewer stay as they are
    assert "moe (moe.capacity) applied drop_token_ratio=0.1" in text
    assert "stock: http://127.0.0.1:" in text
    print(run.stdout)

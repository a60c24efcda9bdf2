"""FUSED_MC2's silent truncation counted, on 2 gloo ranks (emulation/fused_mc2_worker.py says
exactly what runs: our hooks and vllm-ascend's FusedMC2CommImpl.fused_experts body, with an
emulated dispatch_ffn_combine; vllm-ascend's prepare and W8A8 apply do not run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ascend.harness import require_line, require_source, run_ranks

pytestmark = pytest.mark.contract

WORKER = Path(__file__).resolve().parent / "emulation" / "fused_mc2_worker.py"
LAYER = "model.layers.3.mlp.experts"
# Routing (fused_mc2_worker.routing, EPLB map contract_worker.LOG2PHY): rank 0 has 24 tokens,
# each one expert on rank 0 and one on rank 1; rank 1 has 16 tokens, 4 of them padding
# (mc2_mask False), each two experts on rank 1. Rows received: rank 0 24, rank 1 24 + 24.
RECEIVED = [24, 48]
# Per step, mega_moe_max_tokens and the rows past it per receiving rank.
STEPS = [(30, [0, 18]), (20, [4, 28]), (65536, [0, 0]), (48, [0, 0])]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    require_line(("0.23",))
    source = require_source()
    out = tmp_path_factory.mktemp("fused_mc2")
    return run_ranks(source, out, line="0.23", worker=WORKER), out


def test_kernel_truncates_what_the_hook_counts(ranks):
    results, _ = ranks
    for rank, result in enumerate(results):
        for step, (limit, over) in zip(result["steps"], STEPS):
            assert step["kernel"] == {"rank": rank, "received": RECEIVED[rank],
                                      "truncated": over[rank], "max_output_size": limit}
        layer = result["stats"]["fused_mc2"]["layers"][LAYER]
        assert layer == {
            "calls": 4, "calls_over_capacity": 2,
            "rows_over_capacity_by_rank": [4, 46],
            "rows_received_by_rank": [96, 192],
            "rows_received_peak_by_rank": [24, 48],
            "rows_over_capacity_last_by_rank": [0, 0],
        }
        assert sum(s["kernel"]["truncated"] for s in result["steps"]) == \
            layer["rows_over_capacity_by_rank"][rank]
        totals = {k: v for k, v in result["stats"]["fused_mc2"].items() if k != "layers"}
        assert totals == {"calls": 4, "calls_over_capacity": 2, "rows_over_capacity": 50,
                          "max_output_rows": 48}
        # One gather per step and rank: the drop step never ran (FUSED_MC2 bypasses it).
        assert result["gathers"] == 4


def test_one_warning_per_interval(ranks):
    results, _ = ranks
    for result in results:
        lines = [w for w in result["warnings"] if "FUSED_MC2 truncated" in w]
        # log_interval 2: the first two calls truncated (one line), the next two did not.
        assert len(lines) == 1
        assert lines[0].startswith("moe.capacity: FUSED_MC2 truncated 50 (token, expert) rows "
                                   "in the last 2 fused MC2 calls past mega_moe_max_tokens=20")
        assert f"{LAYER} ep0=4 ep1=46" in lines[0]


def test_metrics_series_per_receiving_rank(ranks):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    _, out = ranks

    def scrape(scenario):
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(out / "metrics" / scenario))
        values = {}
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("ascend_patch_moe_fused_mc2"):
                key, value = line.rsplit(" ", 1)
                name, labels = key.split("{", 1)
                rank = labels.split('ep_rank="', 1)[1].split('"', 1)[0]
                assert f'layer="{LAYER}"' in labels and 'patch="capacity"' in labels
                values[(name, rank)] = float(value)
        return values

    assert scrape("over") == {
        ("ascend_patch_moe_fused_mc2_calls_total", "0"): 4.0,
        ("ascend_patch_moe_fused_mc2_calls_total", "1"): 4.0,
        ("ascend_patch_moe_fused_mc2_rows_received_total", "0"): 96.0,
        ("ascend_patch_moe_fused_mc2_rows_received_total", "1"): 192.0,
        ("ascend_patch_moe_fused_mc2_rows_over_capacity_total", "0"): 4.0,
        ("ascend_patch_moe_fused_mc2_rows_over_capacity_total", "1"): 46.0,
        ("ascend_patch_moe_fused_mc2_max_output_rows", "0"): 48.0,
        ("ascend_patch_moe_fused_mc2_max_output_rows", "1"): 48.0,
    }
    assert scrape("off") == {}


def test_rank_without_tokens_takes_part(ranks):
    """Rank 1 has no token: both ranks gather, and rank 0's 24 tokens send 24 rows to each
    rank: 4 past a limit of 20 on both."""
    results, _ = ranks
    for rank, result in enumerate(results):
        assert result["empty_rank"]["kernel"]["truncated"] == 4
        layer = result["empty_stats"]["fused_mc2"]["layers"][LAYER]
        assert layer["rows_over_capacity_by_rank"] == [4, 4]
        assert layer["rows_received_by_rank"] == [24, 24]


def test_counting_leaves_the_call_unchanged_and_can_be_switched_off(ranks):
    import torch

    results, _ = ranks
    for result in results:
        unpatched = result["unpatched"]["out"]
        assert torch.equal(result["steps"][1]["out"], unpatched)  # counted, limit 20
        assert torch.equal(result["off"]["out"], unpatched)
        assert result["off_gathers"] == 0
        assert "fused_mc2" not in result["off_stats"]

"""Tiny runs of the benchmarks: structure and honesty of the numbers, not speed."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ascend_patch.impls.moe.planner.analytic import analytic_limit
from ascend_patch.impls.moe.planner.capacity import drop_budget
from ascend_patch.lab.routing_sim import (
    deepseek_routing,
    rank_loads,
    seed_fixed_capacity_keep,
)
from ascend_patch.lab.layer import LayerSetup, check_cells, layer_ab, targets

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = {"tokens": 512, "experts": 64, "hidden": 64, "intermediate": 32, "ep_size": 16,
        "reps": 1, "ratios": (0.0, 0.02, 0.1), "skews": ("balanced", "r1")}


@pytest.fixture(scope="module", params=[True, False], ids=["keep_top1", "no_keep_top1"])
def layer_result(request):
    # The torch backend times the experts: the honesty of the figures does not depend on which
    # kernel computes them, and the unit tier imports no vLLM.
    setup = LayerSetup(**TINY, keep_top1=request.param, native_kernel=False)
    return setup, layer_ab(setup)


def test_layer_ab_numbers_are_honest(layer_result):
    setup, result = layer_result
    assert check_cells(result, setup.keep_top1) == []
    cells = result["cells"]
    assert {c["policy"] for c in cells} == {"probs", "position", "seed"}
    assert {c["ratio"] for c in cells} == {0.0, 0.02, 0.1}
    for c in cells:
        assert c["budget"] == drop_budget(c["ratio"], c["rows"])
        if c["ratio"] == 0:
            assert c["rows_dropped"] == 0 and c["rel_error"] == 0
            assert c["load_ratio"] == 1 and c["time_ratio"] == 1
            continue
        assert c["rows_dropped"] <= c["budget"]
        if c["policy"] == "seed":
            assert c["rows_dropped"] == next(  # sized to the planner's own drop count
                d["rows_dropped"] for d in cells
                if (d["skew"], d["ratio"], d["policy"]) == (c["skew"], c["ratio"], "probs"))
        elif not setup.keep_top1:
            # one integer cap for every rank: short of the budget by less than the number of
            # ranks at the cap (drops(C - 1) would exceed it)
            at_cap = c["extra"]["drops_at_capacity"]
            assert c["rows_dropped"] == at_cap
            assert c["budget"] - c["rows_dropped"] < setup.ep_size
        assert c["load_ratio"] <= c["ideal"] + 1e-12  # nobody beats the water level
        assert c["ideal_protected"] <= c["ideal"] + 1e-12  # protection can only cost
        assert c["time_ratio"] > 0 and c["time_before_s"] > 0
        assert 0 < c["rel_error"] < 1
    # probs drops the lightest rows: never a larger error than position on this seed
    by_key = {(c["skew"], c["ratio"], c["policy"]): c["rel_error"] for c in cells}
    for (skew, ratio, policy), err in by_key.items():
        if policy == "probs" and ratio > 0:
            assert err <= by_key[(skew, ratio, "position")]
    # the probs and position planners cap the same bins at the same level
    for c in cells:
        if c["policy"] == "position":
            twin = next(d for d in cells if (d["skew"], d["ratio"], d["policy"]) ==
                        (c["skew"], c["ratio"], "probs"))
            assert twin["load_ratio"] == c["load_ratio"]
    assert set(targets(result)) == {"achieved_fraction_ge_0.9_for_r_ge_0.02_skewed",
                                    "probs_error_le_half_position"}


@pytest.mark.parametrize("target", [1.5, 2.5])
def test_skew_is_calibrated_and_deterministic(target):
    a = deepseek_routing(1024, target, ep_size=16, seed=3)
    b = deepseek_routing(1024, target, ep_size=16, seed=3)
    assert abs(a.max_over_mean - target) <= 0.05
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_weights, b.topk_weights)
    load = rank_loads(a.topk_ids, 256, 16).double()
    assert math.isclose(float(load.max() / load.mean()), a.max_over_mean)
    torch.testing.assert_close(a.topk_weights.sum(1), torch.ones(1024))
    # 8 distinct experts from at most 4 of the 8 groups
    assert all(len(set(row)) == 8 for row in a.topk_ids.tolist())
    assert int((a.topk_ids // 32).sort(dim=1).values.diff(dim=1).ne(0).sum(dim=1).max()) <= 3


def test_seed_fixed_capacity_drops_exactly_and_by_position():
    r = deepseek_routing(512, "r1", ep_size=16, seed=1)
    for drops in (0, 1, 57, 400):
        keep, _ = seed_fixed_capacity_keep(r.topk_ids, num_experts=256, ep_size=16,
                                                  num_drops=drops)
        assert int((~keep).sum()) == drops
    # within a (source, destination) pair a later slot never survives an earlier one's drop
    keep, _ = seed_fixed_capacity_keep(r.topk_ids, num_experts=256, ep_size=16, num_drops=400)
    dest = r.topk_ids // 16
    src = torch.arange(512) * 16 // 512
    for s in range(16):
        for d in range(16):
            rows = [(slot, t) for t in range(512) for slot in range(8)
                    if src[t] == s and dest[t, slot] == d]
            kept = [bool(keep[t, slot]) for slot, t in sorted(rows)]
            assert kept == sorted(kept, reverse=True)


def test_analytic_limit_small_example():
    load = torch.tensor([10, 4, 3, 3])  # 20 rows
    limit = analytic_limit(load, 0.2)  # budget 4: cap at 6
    assert (limit.budget, limit.level, limit.ideal_speedup) == (4, 6, 10 / 6)
    protected = torch.tensor([8, 0, 0, 0])
    limited = analytic_limit(load, 0.2, protected)
    # rank 0 can only go down to its 8 protected rows; the rest of the budget caps the others
    assert (limited.level_protected, limited.ideal_speedup_protected) == (3, 10 / 8)


@pytest.mark.contract
def test_vs_native_takes_the_cpu_ops_from_where_the_installed_line_keeps_them():
    """vllm._custom_ops on the CPU lines here (0.23, 0.32); 0.34's vllm._cpu_ops is checked
    on its real source (tests/core/test_line_sources.py)."""
    import importlib.util

    bench = load_script("bench_vs_native")
    ops = bench.cpu_ops_module()
    assert importlib.util.find_spec("vllm._cpu_ops") is None
    assert ops.__name__ == "vllm._custom_ops"
    assert callable(ops.cpu_prepack_moe_weight)


@pytest.mark.contract  # vLLM's own CPU fused MoE is the baseline
def test_vs_native_core_tiny():
    bench = load_script("bench_vs_native")
    bench.cpu_ops_module()  # loads the extension that registers the kernel, where it has it
    if not hasattr(torch.ops._C, "cpu_fused_moe"):
        pytest.skip("this vLLM build has no cpu_fused_moe (vLLM 0.23's AVX2 build)")
    result = bench.bench(tokens=256, hidden=64, intermediate=32, reps=1, threads=(1, 2),
                         torch_backend=True)
    assert set(result["per_threads"]) == {"1", "2"}
    assert result["isa"]["native_isa_argument"] in ("vec", "amx")
    for run in result["per_threads"].values():
        assert f"kernel isa={result['isa']['native_isa_argument']}" in run["isa"]
        for entry in run["whole_layer"].values():
            assert entry["ours_s"] > 0 and entry["native_s"] > 0
            assert entry["max_abs_diff"] == 0  # r = 0: ours is the kernel's own call
            assert entry["torch_backend_over_native"] > 0
        arms = run["bottleneck_rank"]["arms"]
        assert arms["native"]["rows"] == arms["ours r=0"]["rows"] > arms["ours r=0.05"]["rows"] \
            > arms["ours r=0.1"]["rows"]
        # Native sums a token's bf16 rows after the kernel; ours sums them in float32 inside.
        assert run["bottleneck_rank"]["max_abs_diff_r0"] < 0.1
    assert set(result["targets"]) == {
        f"{name}_{n}_threads" for n in (1, 2)
        for name in ("ours_over_native_le_1_at_r0",
                     "r0.05_faster_than_native_on_bottleneck_rank")}


def test_dispatch_core_tiny():
    bench = load_script("bench_dispatch")
    result = bench.run_dispatch(tokens=256, skew=1.5, ratios=(0.1,), reps=1, hidden=64,
                                intermediate=32, timeout=240)
    arms = result["arms"]
    assert set(arms) == {"a2a", "ag-rs", "a2a-drop r=0.1"}
    assert arms["a2a"]["rel_error"] == 0
    assert arms["ag-rs"]["rel_error"] < 1e-2  # the same sums, reduced in another order
    drop = arms["a2a-drop r=0.1"]
    assert 0 < drop["rows_dropped_global"] <= drop["budget"]
    assert sum(drop["rows_computed_per_rank"]) == \
        sum(arms["a2a"]["rows_computed_per_rank"]) - drop["rows_dropped_global"]
    assert max(drop["load_after"]) < max(result["setup"]["rank_loads"])
    assert all(b > 0 for b in arms["a2a"]["bytes_sent_per_rank"])
    # The a2a arms run the product's dispatch/combine; their bytes are its counters.
    assert "all_to_all_dispatch" in result["all_to_all"]
    # Token-once: a bf16 hidden row per (token, other rank) pair + a 12-byte record (f32
    # weight, i32 expert id, i32 hidden-row index) per kept row out, a hidden row per pair back.
    hidden_bytes, meta_bytes = 64 * 2, 12
    for name in ("a2a", "a2a-drop r=0.1"):
        counters = arms[name]["counters_per_rank"]
        assert arms[name]["bytes_sent_per_rank"] == [c["bytes_sent_remote"] for c in counters]
        assert all(c["dispatch_bytes_remote"] == c["hidden_rows_sent_remote"] * hidden_bytes
                   + c["rows_sent_remote"] * meta_bytes for c in counters)
        assert all(c["combine_bytes_remote"] == c["hidden_rows_returned_remote"] * hidden_bytes
                   for c in counters)
        # The pairs counted from the routing alone give the same bytes.
        assert [m["bytes"] for m in arms[name]["token_once_model_per_rank"]] == \
            arms[name]["bytes_sent_per_rank"]
        assert all(c["hidden_rows_sent_remote"] < c["rows_sent_remote"] for c in counters)
        assert [c["rows_received"] for c in counters] == arms[name]["rows_computed_per_rank"]
    assert sum(drop["bytes_sent_per_rank"]) < sum(arms["a2a"]["bytes_sent_per_rank"])
    assert sum(c["rows_not_sent_dropped"] for c in drop["counters_per_rank"]) == \
        drop["rows_dropped_global"]


def test_plugin_unset_imports_nothing_else():
    bench = load_script("bench_overhead")
    assert bench.unset_modules() == ["ascend_patch", "ascend_patch.plugin"]

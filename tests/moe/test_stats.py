"""CapacityStats: when the report is written, and what it feeds to /metrics."""

from __future__ import annotations

import pytest
import torch

from ascend_patch.impls.moe.planner.capacity import DropPlan
from ascend_patch.impls.moe.telemetry import stats as stats_module
from ascend_patch.impls.moe.telemetry.stats import CapacityStats


@pytest.fixture
def lazy_fold(monkeypatch):
    """The CPU plans counted as an accelerator's are: read back at a fold only."""
    monkeypatch.setattr(stats_module, "FOLD_AT_ONCE_ON", frozenset())


def plan(routed: int, dropped: int, local_routed: int, local_dropped: int) -> DropPlan:
    before = torch.tensor([routed - 10, 10])
    after = torch.tensor([routed - 10 - dropped, 10])
    return DropPlan(keep=torch.ones(1, 1, dtype=torch.bool), weights=torch.ones(1, 1),
                    capacity=int(after.max()), routed_rows=routed, dropped_rows=dropped,
                    budget=dropped, bin_load_before=before, bin_load_after=after,
                    local_routed_rows=local_routed, local_dropped_rows=local_dropped)


def test_without_the_all_to_all_the_report_is_written_at_the_log_interval():
    flushes = []
    stats = CapacityStats({}, log_interval=2, flush=lambda: flushes.append(1))
    for _ in range(4):
        stats.record("L", plan(100, 5, 100, 5))
    assert len(flushes) == 2


def test_with_the_all_to_all_the_report_is_written_after_the_combine_only():
    """So that a report never has a call's drops without its traffic (a process stopped
    between the plan and the combine leaves the previous, consistent report)."""
    flushes = []
    data: dict = {}
    stats = CapacityStats(data, log_interval=2, flush=lambda: flushes.append(
        (data["calls"], data["all_to_all"]["calls"])))
    counters = stats.dispatch_counters()
    for _ in range(4):
        stats.record("L", plan(100, 5, 60, 3))
        counters.calls += 1
        stats.dispatch_recorded("L", 0)
    assert flushes == [(2, 2), (4, 4)]


class Series:
    def __init__(self):
        self.calls, self.bytes, self.dp_rank, self.planned = [], [], 1, True
        self.process = "worker-dp1-tp0-ep1"

    def record(self, **values):
        self.calls.append(values)

    def add_bytes(self, n):
        self.bytes.append(n)


def test_exported_layers_feed_their_series_with_this_ranks_rows(lazy_fold):
    data: dict = {}
    stats = CapacityStats(data, log_interval=0)
    series = Series()
    stats.export_layer("L", series)
    stats.record("L", plan(100, 5, 60, 3))
    stats.record("other", plan(100, 5, 60, 3))  # not exported: no series, no error
    stats.dispatch_counters()
    stats.dispatch_recorded("L", 4096)
    assert series.calls == []  # nothing read back from the plans' counters yet
    stats.fold()
    assert series.calls == [dict(routed=60, dropped=3, capacity=85, max_before=90, max_after=85,
                                 mean_before=50.0, mean_after=47.5, rerouted=0)]
    assert series.bytes == [4096]
    assert data["metrics"] == {
        "L": {"dp_rank": 1, "process": "worker-dp1-tp0-ep1", "writes_rows": True}}
    assert data["rows_dropped"] == 10  # the report keeps the global counts


def test_a_layer_named_with_its_quantization_scheme_carries_it_in_its_row():
    data: dict = {}
    stats = CapacityStats(data, log_interval=0)
    stats.layer_quant("a", "W8A8_DYNAMIC")  # before its first call
    stats.record("a", plan(8, 2, 8, 2))
    stats.record("b", plan(8, 0, 8, 0))
    stats.layer_quant("b", "unquantized")  # after it
    assert data["layers"]["a"]["quant"] == "W8A8_DYNAMIC"
    assert data["layers"]["b"]["quant"] == "unquantized"
    stats.record("c", plan(8, 0, 8, 0))
    assert "quant" not in data["layers"]["c"]  # vLLM-platform layers name none


def test_warm_up_calls_are_counted_apart_and_never_reach_the_serving_counters():
    """vLLM's start-up warm-up (dummy data) goes to "warmup" only: the serving totals, the
    layers' rows, the all-to-all traffic and the /metrics series hold the serving calls."""
    data: dict = {}
    stats = CapacityStats(data, log_interval=0)
    series = Series()
    stats.export_layer("L", series)
    counters = stats.dispatch_counters()
    with stats.warming_up():
        with stats.warming_up():  # the memory profile inside the compile warm-up
            stats.record("L", plan(400, 40, 200, 20))
            counters.calls += 1
            counters.rows_sent += 7
            stats.dispatch_recorded("L", 4096)
        stats.record("L", plan(100, 0, 50, 0))
    assert data["warmup"] == {"calls": 2, "rows_routed": 500, "rows_dropped": 40,
                              "all_to_all": {**{k: 0 for k in counters.as_dict()},
                                             "calls": 1, "rows_sent": 7}}
    assert (data["calls"], data["rows_routed"], data["rows_dropped"]) == (0, 0, 0)
    assert data["layers"] == {}
    assert (counters.calls, counters.rows_sent) == (0, 0)
    assert data["all_to_all"]["calls"] == 0
    assert series.calls == [] and series.bytes == []
    # Then one serving call: counted as it would have been without the warm-up.
    stats.record("L", plan(100, 5, 60, 3))
    counters.calls += 1
    stats.dispatch_recorded("L", 512)
    stats.fold()
    assert (data["calls"], data["rows_routed"], data["rows_dropped"]) == (1, 100, 5)
    assert data["layers"]["L"]["rows_dropped"] == 5
    assert data["all_to_all"]["calls"] == 1
    assert [c["dropped"] for c in series.calls] == [3] and series.bytes == [512]
    assert data["warmup"]["calls"] == 2


def test_plans_are_read_back_at_the_fold_only(lazy_fold):
    """The counters of a plan stay on its device until a fold (the log interval, a report,
    the end of the warm-up, or FOLD_EVERY calls): recording reads nothing back."""
    from ascend_patch.impls.moe.telemetry import stats as stats_module

    data: dict = {}
    stats = CapacityStats(data, log_interval=0)
    for _ in range(3):
        stats.record("L", plan(100, 5, 60, 3))
    assert (data["calls"], data["rows_dropped"], data["layers"]["L"]["calls"]) == (3, 0, 3)
    stats.fold()
    assert (data["rows_routed"], data["rows_dropped"]) == (300, 15)
    assert data["layers"]["L"]["calls_with_drops"] == 3
    assert data["layers"]["L"]["max_bin_load_before_peak"] == 90
    for _ in range(stats_module.FOLD_EVERY - 1):
        stats.record("L", plan(100, 5, 60, 3))
    assert data["rows_dropped"] == 15
    stats.record("L", plan(100, 5, 60, 3))  # the FOLD_EVERY-th pending call folds
    assert data["rows_dropped"] == 15 + 5 * stats_module.FOLD_EVERY


def test_a_report_read_folds_the_pending_plans(lazy_fold):
    from ascend_patch.core.context import PatchContext
    from ascend_patch.impls.moe.options import CapacityOptions

    ctx = PatchContext("moe", "moe.capacity", CapacityOptions())
    stats = CapacityStats(ctx.stats, log_interval=0)
    ctx.on_read(stats.fold)
    stats.record("L", plan(100, 5, 60, 3))
    assert ctx.stats["rows_dropped"] == 0
    assert ctx.read_stats()["rows_dropped"] == 5


def test_on_the_cpu_every_call_is_folded_at_once():
    """Reading back stalls nothing on the CPU: the report and /metrics are exact per call."""
    data: dict = {}
    stats = CapacityStats(data, log_interval=0)
    series = Series()
    stats.export_layer("L", series)
    stats.record("L", plan(100, 5, 60, 3))
    assert (data["rows_routed"], data["rows_dropped"]) == (100, 5)
    assert len(series.calls) == 1 and series.calls[0]["dropped"] == 3

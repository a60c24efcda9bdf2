"""Lab hooks that a served engine's processes run (lab/worker_hooks.py): op timers on disk,
and the drop ratio switched at run time through a file."""

from __future__ import annotations

import os

import torch

from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import plan_drops
from ascend_patch.lab.routing_sim import deepseek_routing_at_scale
from ascend_patch.lab.worker_hooks import DumpingTimers, PlanCounts, SwitchedRatio, read_dumps


def test_each_call_is_counted_and_written(tmp_path):
    timers = DumpingTimers(tmp_path)
    calls = []
    experts = timers._timed("experts", lambda *a: calls.append(a) or 7)
    assert read_dumps(tmp_path) == {}
    assert experts(1, 2) == 7 and calls == [(1, 2)]
    dumps = read_dumps(tmp_path)
    assert list(dumps) == [os.getpid()]
    assert dumps[os.getpid()]["seconds"]["experts"] > 0
    assert dumps[os.getpid()]["seconds"]["plan"] == 0
    assert set(dumps[os.getpid()]["cpu_seconds"]) == {"plan", "experts"}
    assert timers.calls == {"plan": 0, "experts": 1}


def test_a_failing_call_is_still_timed(tmp_path):
    timers = DumpingTimers(tmp_path)

    def boom():
        raise RuntimeError("x")

    plan = timers._timed("plan", boom)
    try:
        plan()
    except RuntimeError:
        pass
    assert timers.calls["plan"] == 1
    assert read_dumps(tmp_path)[os.getpid()]["seconds"]["plan"] > 0


def test_unreadable_files_are_skipped(tmp_path):
    (tmp_path / "12.json").write_text("{not json")
    (tmp_path / "13.json").write_text('{"seconds": {"experts": 1.5, "plan": 0.0}}')
    assert read_dumps(tmp_path) == {
        13: {"seconds": {"experts": 1.5, "plan": 0.0}, "cpu_seconds": {}, "plans": {}}}


def test_cpu_seconds_count_work_not_waiting(tmp_path):
    import time

    timers = DumpingTimers(tmp_path)
    timers._timed("experts", lambda: time.sleep(0.2))()
    spin = timers._timed("plan", lambda: sum(i * i for i in range(300_000)))
    spin()
    dump = read_dumps(tmp_path)[os.getpid()]
    assert dump["seconds"]["experts"] >= 0.2 and dump["cpu_seconds"]["experts"] < 0.05
    assert dump["cpu_seconds"]["plan"] > 0


def _plan_kwargs(ratio: float) -> dict:
    return {"num_experts": 16, "ep_size": 2, "all_gather_counts": None, "rank": 0,
            "expert_owner": None,
            "options": CapacityOptions(drop_token_ratio=ratio, min_tokens=0)}


def test_switched_ratio_plans_as_the_product_at_the_files_ratio(tmp_path):
    weights, ids = deepseek_routing_at_scale(512, 1.0, num_experts=16, top_k=2, num_groups=1,
                                             topk_groups=1, ep_size=2, seed=3)
    control = tmp_path / "ratio"
    switch = SwitchedRatio(control, PlanCounts())
    unswitched = switch(weights, ids, **_plan_kwargs(0.0))  # no file: the config's ratio
    assert unswitched.dropped_rows == 0
    control.write_text("0.1\n")
    switched = switch(weights, ids, **_plan_kwargs(0.0))
    product = plan_drops(weights, ids, **_plan_kwargs(0.1))
    assert switched.dropped_rows == product.dropped_rows > 0
    assert torch.equal(switched.keep, product.keep)
    counts = switch.counts.by_ratio
    assert set(counts) == {"config", "0.1"}
    assert counts["0.1"]["calls"] == 1 and counts["0.1"]["routed"] == 512 * 2
    assert counts["0.1"]["dropped"] == product.dropped_rows
    assert counts["0.1"]["max_before"] == int(product.bin_load_before.max())
    assert counts["0.1"]["max_after"] == int(product.bin_load_after.max())
    assert counts["config"]["max_after"] == counts["config"]["max_before"]

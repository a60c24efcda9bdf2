"""What the FUSED_MC2 counter counts (telemetry/overflow.py), without vLLM."""

from __future__ import annotations

import logging

import torch

from ascend_patch.impls.moe.telemetry.overflow import (
    OverflowRecorder,
    local_rows_per_expert,
    received_rows,
)


def test_rows_per_expert_skip_inactive_tokens_and_ids_outside_the_experts():
    ids = torch.tensor([[0, 3], [3, 3], [1, 2], [4, -1]], dtype=torch.int32)
    active = torch.tensor([True, True, False, True])
    # Token 2 is padding; 4 and -1 are no expert of 4.
    assert local_rows_per_expert(ids, active, 4).tolist() == [1, 0, 0, 3]
    assert local_rows_per_expert(ids, None, 4).tolist() == [1, 1, 1, 3]
    assert local_rows_per_expert(ids[:0], active[:0], 4).tolist() == [0, 0, 0, 0]
    # A mask longer than the tokens: the kernel reads its first N entries.
    longer = torch.tensor([True, True, False, True, False, False])
    assert local_rows_per_expert(ids, longer, 4).tolist() == [1, 0, 0, 3]


def test_received_rows_sum_sources_per_owning_rank():
    # Two sources, 6 experts on 3 ranks (2 each).
    gathered = torch.tensor([1, 2, 0, 5, 7, 0, 3, 0, 4, 4, 0, 1])
    assert received_rows(gathered, 6, 3).tolist() == [6, 13, 8]
    assert received_rows(gathered.reshape(2, 6), 6, 3).tolist() == [6, 13, 8]


class _Series:
    def __init__(self):
        self.calls = []

    def record(self, **kwargs):
        self.calls.append(kwargs)


def test_recorder_counts_per_rank_and_warns_once_per_interval(caplog):
    stats: dict = {}
    made = {}
    flushed = []

    def series(layer, rank):
        made[(layer, rank)] = _Series()
        return made[(layer, rank)]

    recorder = OverflowRecorder(stats, 2, lambda: flushed.append(1), series)
    with caplog.at_level(logging.WARNING, "ascend_patch.moe.capacity"):
        recorder.record("l0", rank=1, max_output_rows=10, received=[12, 9])
        recorder.record("l1", rank=1, max_output_rows=10, received=[10, 15])
        recorder.record("l0", rank=1, max_output_rows=10, received=[3, 4])
        recorder.record("l1", rank=1, max_output_rows=10, received=[3, 4])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "truncated 7 (token, expert) rows in the last 2" in lines[0]
    assert "l0 ep0=2; l1 ep1=5" in lines[0]
    assert stats["fused_mc2"]["layers"]["l0"] == {
        "calls": 2, "calls_over_capacity": 1, "rows_over_capacity_by_rank": [2, 0],
        "rows_received_by_rank": [15, 13], "rows_received_peak_by_rank": [12, 9],
        "rows_over_capacity_last_by_rank": [0, 0]}
    assert {k: v for k, v in stats["fused_mc2"].items() if k != "layers"} == {
        "calls": 4, "calls_over_capacity": 2, "rows_over_capacity": 7, "max_output_rows": 10}
    # Each process exports its own receiving rank only.
    assert made[("l1", 1)].calls[0] == {"received": 15, "over": 5, "max_output_rows": 10}
    assert flushed == [1, 1]


def test_without_a_log_interval_only_the_first_truncation_warns(caplog):
    recorder = OverflowRecorder({}, 0)
    with caplog.at_level(logging.WARNING, "ascend_patch.moe.capacity"):
        recorder.record("l0", rank=0, max_output_rows=4, received=[3, 4])
        recorder.record("l0", rank=0, max_output_rows=4, received=[6, 4])
        recorder.record("l0", rank=0, max_output_rows=4, received=[9, 9])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "truncated 2 (token, expert) rows in this fused MC2 call" in lines[0]


def test_switch_and_limit_as_each_release_passes_them():
    """0.23.0.post1: ascend_config's enable_fused_mc2 and mega_moe_max_tokens, mask passed;
    0.18.0 (its site set declares envs.env_variables): the environment switch, a fixed
    65536, no x_active_mask."""
    from types import SimpleNamespace

    from ascend_patch.impls.moe.adapters.ascend_fused_mc2 import _kernel_settings

    class Upstream(SimpleNamespace):
        """The declared keys, as core/upstream.Upstream answers `key in upstream`."""

        def __contains__(self, key: str) -> bool:
            return key in vars(self)

    config = SimpleNamespace(enable_fused_mc2=1, mega_moe_max_tokens=6144)
    assert _kernel_settings(Upstream(get_ascend_config=lambda: config)) == (1, 6144, True)
    env = {"VLLM_ASCEND_ENABLE_FUSED_MC2": lambda: 2}
    assert _kernel_settings(Upstream(env_variables=env)) == (2, 65536, False)

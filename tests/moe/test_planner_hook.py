"""The planner hook of CapacityState: another planner is in force only until it is reverted,
and the lab uses that hook instead of rebinding module names."""

import pytest
import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe import drop_step
from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import plan_drops
from ascend_patch.impls.moe.state import CapacityState


@pytest.fixture
def state():
    ctx = PatchContext("moe", "moe.capacity", CapacityOptions(drop_token_ratio=0.25,
                                                               min_tokens=0))
    yield ctx.state(CapacityState)
    ctx.close()
    # Whatever a failing test left swapped must not leak into the next one.
    leaked = list(CapacityState._swaps)
    CapacityState._swaps.clear()
    assert leaked == []


def _routing():
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(32, 2, generator=gen).softmax(dim=1)
    ids = torch.randint(0, 4, (32, 2), generator=gen)
    ids[:, 0] = 3  # one hot expert: something to drop
    return weights, ids


def _recording(calls: list):
    def planner(*args, **kwargs):
        calls.append(kwargs["num_experts"])
        return plan_drops(*args, **kwargs)

    return planner


def test_a_swap_reaches_steps_built_before_it_and_is_reverted(state):
    step = state.drop_step("L", num_experts=4, ep_size=2, gather=None, rank=0, owners=None)
    weights, ids = _routing()
    calls = []
    expected = step(weights, ids)
    assert CapacityState.planner() is plan_drops

    with CapacityState.use_planner(_recording(calls)) as swap:
        assert CapacityState.planner() is swap.planner
        during = step(weights, ids)
    assert calls == [4]
    assert swap.reverted and CapacityState.planner() is plan_drops

    after = step(weights, ids)
    assert calls == [4]  # the product planner again
    for got in (during, after):
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])
    assert state.stats._stats["layers"]["L"]["calls"] == 3  # counters whatever planned


def test_swaps_revert_latest_first_and_once(state):
    first = CapacityState.use_planner(_recording([]))
    second = CapacityState.use_planner(_recording([]))
    with pytest.raises(RuntimeError, match="later planner swap"):
        first.revert()
    assert CapacityState.planner() is second.planner
    second.revert()
    second.revert()  # idempotent
    assert CapacityState.planner() is first.planner
    first.revert()
    assert CapacityState.planner() is plan_drops


def test_a_swap_is_reverted_when_its_block_raises(state):
    with pytest.raises(ValueError), CapacityState.use_planner(_recording([])):
        raise ValueError("arm failed")
    assert CapacityState.planner() is plan_drops


def test_the_lab_planner_is_installed_and_uninstalled(state):
    from ascend_patch.lab import rules

    step = state.drop_step("L", num_experts=4, ep_size=2, gather=None, rank=0, owners=None)
    with rules.installed("key:relative") as lab:
        lab.reset()
        assert CapacityState.planner() is rules.lab_planner
        step(*_routing())
        assert len(lab.calls) == 1
    assert CapacityState.planner() is plan_drops and rules.LAB.swap is None
    assert drop_step.plan_drops is plan_drops  # nothing rebound in the product's modules
    step(*_routing())
    assert len(rules.LAB.calls) == 1
    rules.uninstall()  # a second uninstall does nothing
    assert CapacityState.planner() is plan_drops

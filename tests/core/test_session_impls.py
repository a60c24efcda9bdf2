"""The implementations' process-wide state is reverted by the session too: the lab's planner
swap, pending exits after a failed cross-rank check, the all-to-all classes built on vLLM's."""

import pytest
import torch

from ascend_patch.core.session import SESSION
from ascend_patch.impls.distributed import consistency
from ascend_patch.impls.moe.planner.capacity import plan_drops
from ascend_patch.impls.moe.state import CapacityState


def test_planner_swaps_are_reverted_latest_first_and_the_lab_can_swap_again():
    from ascend_patch.lab import rules

    first = CapacityState.use_planner(lambda *a, **k: plan_drops(*a, **k))
    rules.install(None)
    assert CapacityState.planner() is rules.lab_planner
    assert SESSION.pending() == ["moe.planner_swaps"]
    SESSION.revert()
    assert CapacityState._swaps == [] and CapacityState.planner() is plan_drops
    assert first.reverted and rules.LAB.swap.reverted
    rules.install(None)  # a new swap, not the reverted one
    assert CapacityState.planner() is rules.lab_planner
    rules.uninstall()
    assert CapacityState.planner() is plan_drops


def test_pending_exits_are_cancelled():
    cancelled = consistency.exit_later("test", delay_s=60)
    assert SESSION.pending() == ["distributed.pending_exits"]
    SESSION.revert()
    assert cancelled.is_set() and consistency._pending_exits == []


def test_the_all_to_all_classes_are_built_again_after_revert():
    pytest.importorskip("vllm.model_executor.layers.fused_moe.modular_kernel")
    from ascend_patch.core.context import PatchContext
    from ascend_patch.impls.moe.options import CapacityOptions
    from ascend_patch.impls.moe.transport import all_to_all_dispatch as a2a

    upstream = PatchContext("moe-capacity", "moe.capacity", CapacityOptions()).upstream
    pf, kernel = a2a.make_prepare_finalize_class(upstream), a2a.make_kernel_class(upstream)
    assert a2a.make_prepare_finalize_class(upstream) is pf
    assert a2a.make_kernel_class(upstream) is kernel
    assert SESSION.pending() == ["moe.all_to_all.classes"]
    SESSION.revert()
    assert a2a._CLASSES == {}
    assert a2a.make_prepare_finalize_class(upstream) is not pf


def test_the_custom_ops_forget_the_state_they_were_bound_to():
    from ascend_patch.core.context import PatchContext
    from ascend_patch.impls.moe import custom_ops
    from ascend_patch.impls.moe.options import CapacityOptions

    ctx = PatchContext("moe", "moe.capacity", CapacityOptions())
    state = ctx.state(CapacityState)
    assert custom_ops._BINDING.state is state
    assert SESSION.pending() == ["moe.custom_ops.binding"]
    SESSION.revert()  # the context was never closed (no patcher made it)
    assert custom_ops._BINDING.state is None
    with pytest.raises(RuntimeError, match="no applied patch plans MoE layer 'L'"):
        custom_ops.plan(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.int64), "L")

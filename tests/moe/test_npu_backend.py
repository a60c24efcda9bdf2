"""The npu backend, run through the CPU emulation of torch_npu, equals the torch backend."""

from __future__ import annotations

import pytest
import torch

from ascend_patch.impls.moe.experts import npu_backend, torch_backend
from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import plan_drops

from . import npu_emulation
from .test_backends import EXPERTS, TOKENS, TOP_K, make_layer

OPS = npu_emulation.make_ops()


def both(*args, **kwargs):
    expected = torch_backend.moe_forward(*args, **kwargs)
    got = npu_backend.moe_forward(*args, ops=OPS, **kwargs)
    return got, expected


@pytest.mark.parametrize("seed", range(3))
def test_all_rows(seed):
    got, expected = both(*make_layer(seed=seed))
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_with_planned_drops():
    x, w13, w2, weights, ids = make_layer(seed=4)
    ids[: TOKENS // 2] = torch.tensor([0, 1, 2])  # overload rank 0 (experts 0 and 1)
    plan = plan_drops(
        weights,
        ids,
        num_experts=EXPERTS,
        ep_size=4,
        options=CapacityOptions(drop_token_ratio=0.3, min_tokens=0),
    )
    assert plan.dropped_rows > 0
    got, expected = both(x, w13, w2, plan.weights, ids, keep=plan.keep)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dropped_rows_never_reach_the_output():
    # NaN weights on dropped rows: a backend that computed them or scaled them would be NaN.
    x, w13, w2, weights, ids = make_layer(seed=5)
    keep = torch.rand(TOKENS, TOP_K, generator=torch.Generator().manual_seed(1)) < 0.5
    poisoned = torch.where(keep, weights, torch.tensor(float("nan")))
    got, expected = both(x, w13, w2, poisoned, ids, keep=keep)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_expert_map_with_drops():
    x, w13, w2, weights, ids = make_layer(seed=6)
    local = torch.tensor([2, 3, 4])
    expert_map = torch.full((EXPERTS,), -1, dtype=torch.long)
    expert_map[local] = torch.arange(3)
    keep = torch.rand(TOKENS, TOP_K, generator=torch.Generator().manual_seed(2)) < 0.7
    got, expected = both(x, w13[local], w2[local], weights, ids, keep=keep, expert_map=expert_map)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_router_weight_on_input():
    x, w13, w2, weights, ids = make_layer(seed=7)
    got, expected = both(x, w13, w2, weights[:, :1], ids[:, :1], apply_router_weight_on_input=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bf16():
    got, expected = both(*make_layer(torch.bfloat16, seed=8))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2)


def test_zero_tokens_and_nothing_local():
    got, _ = both(*make_layer(tokens=0))
    assert got.shape[0] == 0
    x, w13, w2, weights, ids = make_layer(seed=9)
    nowhere = torch.full((EXPERTS,), -1, dtype=torch.long)
    got, expected = both(x, w13[:1], w2[:1], weights, ids, expert_map=nowhere)
    assert (got == 0).all() and (expected == 0).all()


def test_emulation_follows_the_documented_examples():
    # npu_moe_init_routing doc example: 3 tokens, top-2.
    x = torch.tensor([[0.1] * 4, [0.2] * 4, [0.3] * 4])
    row_idx = torch.tensor([[0, 3], [1, 4], [2, 5]], dtype=torch.int32)
    expert_idx = torch.tensor([[1, 2], [0, 1], [0, 2]], dtype=torch.int32)
    expanded_x, expanded_row_idx, expanded_expert_idx = OPS.npu_moe_init_routing(
        x, row_idx, expert_idx, 3
    )
    assert expanded_expert_idx.tolist() == [0, 0, 1, 1, 2, 2]
    # Stable sort of the token-major flattening: sources (1,0) (2,0) (0,0) (1,1) (0,1) (2,1).
    assert expanded_x[:, 0].tolist() == pytest.approx([0.2, 0.3, 0.1, 0.2, 0.1, 0.3])
    assert expanded_row_idx.tolist() == [2, 0, 1, 4, 3, 5]
    # npu_moe_compute_expert_tokens doc example.
    sorted_experts = torch.tensor([0, 0, 0, 1, 1, 2], dtype=torch.int32)
    ends = OPS.npu_moe_compute_expert_tokens(sorted_experts, 3)
    assert ends.tolist() == [3, 5, 6]
    gate_up = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(
        OPS.npu_swiglu(gate_up), torch.nn.functional.silu(gate_up[:, :2]) * gate_up[:, 2:]
    )

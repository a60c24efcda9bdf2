"""The drop planner on edge inputs: masked slots (id -1), float64 weights, owner maps."""

from __future__ import annotations

import pytest
import torch

from ascend_patch.impls.moe.planner.capacity import linear_owners, plan_drops
from ascend_patch.impls.moe.transport.all_to_all_dispatch import expert_owners

from .test_capacity import options, random_routing, reference_linear_owners, reference_plan

# ----------------------------------------------------------------------- masked slots (-1)


def test_masked_slots_are_not_routed():
    ids = torch.tensor([[0, -1], [-1, -1], [1, 0], [0, -1], [0, 1], [0, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1], [0.6, 0.4]])
    opts = options(drop_token_ratio=0.25, granularity="expert", keep_top1=False)
    plan = plan_drops(weights, ids, num_experts=2, ep_size=1, options=opts)
    # 8 valid rows: budget floor(0.25 * 8) = 2; loads (5, 3) -> C = 3 drops the two lightest
    # expert-0 rows, (2, 1) at 0.3 and (0, 0) at 0.6 < (5, 0) at 0.6 by position: (5, 0) goes.
    assert (plan.routed_rows, plan.budget, plan.capacity, plan.dropped_rows) == (8, 2, 3, 2)
    assert plan.bin_load_before.tolist() == [5, 3]
    assert plan.bin_load_after.tolist() == [3, 3]
    assert plan.keep.tolist() == [
        [True, False],
        [False, False],
        [True, False],
        [True, False],
        [True, True],
        [False, True],
    ]
    assert plan.weights[ids < 0].eq(0).all()
    capacity, keep = reference_plan(weights, ids, num_experts=2, ep_size=1, options=opts)
    assert plan.capacity == capacity and torch.equal(plan.keep, keep)


def test_masked_slots_without_drops_keep_the_rest_untouched():
    ids = torch.tensor([[0, -1], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    plan = plan_drops(weights, ids, num_experts=2, ep_size=2, options=options())
    assert plan.keep.tolist() == [[True, False], [True, True]]
    assert torch.equal(plan.weights, torch.tensor([[0.6, 0.0], [0.7, 0.3]]))
    assert plan.routed_rows == 3 and plan.bin_load_before.tolist() == [2, 1]
    assert plan.capacity == 2 and plan.dropped_rows == 0


def test_keep_top1_protects_the_best_valid_slot():
    # The heaviest slot of each token is masked: the protection falls on its best valid
    # slot (expert 0), so expert 0 cannot shrink, and neither can the last token's only row.
    # A token with every slot masked protects nothing.
    ids = torch.tensor([[-1, 0]] * 4 + [[1, -1], [-1, -1]])
    weights = torch.tensor([[0.9, 0.1]] * 4 + [[0.2, 0.8], [0.5, 0.5]])
    opts = options(drop_token_ratio=0.4, granularity="expert")
    plan = plan_drops(weights, ids, num_experts=2, ep_size=1, options=opts)
    assert (plan.routed_rows, plan.budget, plan.dropped_rows) == (5, 2, 0)
    assert torch.equal(plan.keep, ids >= 0)


def test_keep_top1_with_minus_inf_weights_protects_the_first_valid_slot():
    # Every valid weight is -inf: the first maximal weight would be the masked slot 0.
    ids = torch.tensor([[-1, 0, 1]] * 3)
    weights = torch.tensor([[1.0, float("-inf"), float("-inf")]] * 3)
    opts = options(drop_token_ratio=0.5, granularity="expert")
    plan = plan_drops(weights, ids, num_experts=2, ep_size=1, options=opts)
    # Budget 3; expert 0's rows are protected, so C = 0 drops all of expert 1.
    assert (plan.capacity, plan.dropped_rows) == (0, 3)
    assert plan.keep.tolist() == [[False, True, False]] * 3


def test_renormalize_ignores_masked_weights():
    # Token 0 loses nothing: its weights stay exactly as they were, the masked 0.5 is not
    # spread over them. Token 1 loses its expert-0 row and keeps its own total, 0.4.
    ids = torch.tensor([[0, -1, 1], [1, 0, -1], [0, 2, -1]])
    weights = torch.tensor([[0.3, 0.5, 0.2], [0.3, 0.1, 0.6], [0.6, 0.4, 0.0]])
    plan = plan_drops(
        weights,
        ids,
        num_experts=3,
        ep_size=1,
        options=options(
            drop_token_ratio=0.2, granularity="expert", keep_top1=False, renormalize=True
        ),
    )
    # 6 valid rows, budget 1; loads (3, 2, 1) -> C = 2: expert 0 drops its 0.1 row.
    assert plan.keep.tolist() == [[True, False, True], [True, False, False], [True, True, False]]
    assert plan.weights[0].tolist() == weights[0].masked_fill(ids[0] < 0, 0).tolist()
    assert plan.weights[1].tolist() == pytest.approx([0.4, 0.0, 0.0])
    assert plan.weights[2].tolist() == weights[2].tolist()


def test_masked_slots_count_for_no_token():
    # min_tokens compares routed rows // top_k: 20 tokens with 10 masked slots count as 15.
    weights, ids = random_routing(20, 2, 4, seed=3, skew=0.7)
    ids[:10, 1] = -1
    opts = options(drop_token_ratio=0.3, min_tokens=16)
    assert plan_drops(weights, ids, num_experts=4, ep_size=2, options=opts).dropped_rows == 0
    plan = plan_drops(weights, ids, num_experts=4, ep_size=2, options=opts, num_tokens_global=20)
    assert plan.dropped_rows > 0


def test_every_slot_masked():
    ids = torch.full((5, 2), -1)
    plan = plan_drops(
        torch.rand(5, 2), ids, num_experts=4, ep_size=2, options=options(drop_token_ratio=0.5)
    )
    assert plan.routed_rows == 0 and plan.budget == 0 and not plan.keep.any()
    assert plan.bin_load_before.tolist() == [0, 0] and (plan.weights == 0).all()


@pytest.mark.parametrize("bad", [8, 9, -2])
def test_out_of_range_ids_are_refused(bad):
    ids = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises(ValueError, match=f"expert id {bad} .*num_experts=8"):
        plan_drops(torch.rand(2, 2), ids, num_experts=8, ep_size=2, options=options())


# -------------------------------------------------------------------------- float64 weights


def test_float64_weights_rank_below_float32_precision():
    # Expert 0 holds three droppable rows whose weights differ by 1e-12: float64 tells them
    # apart (the lightest, token 1, goes); in float32 they tie and the last token goes.
    ids = torch.tensor([[0], [0], [0], [1]])
    weights = torch.tensor([[0.5 + 1e-12], [0.5], [0.5 + 2e-12], [1.0]], dtype=torch.float64)
    opts = options(drop_token_ratio=0.25, granularity="expert", keep_top1=False)
    exact = plan_drops(weights, ids, num_experts=2, ep_size=1, options=opts)
    assert exact.keep.squeeze(1).tolist() == [True, False, True, True]
    assert exact.weights.dtype == torch.float64
    tied = plan_drops(weights.float(), ids, num_experts=2, ep_size=1, options=opts)
    assert weights.float().unique().tolist() == [0.5, 1.0]
    assert tied.keep.squeeze(1).tolist() == [True, True, False, True]


def test_float64_negative_and_signed_zero_weights():
    ids = torch.tensor([[0], [0], [0], [0], [1]])
    weights = torch.tensor([[-0.0], [-1e-300], [0.0], [-1e-12], [1.0]], dtype=torch.float64)
    opts = options(drop_token_ratio=0.4, granularity="expert", keep_top1=False)
    plan = plan_drops(weights, ids, num_experts=2, ep_size=1, options=opts)
    # Budget 2, loads (4, 1) -> C = 2: -1e-12 and -1e-300 go; -0.0 and 0.0 tie and stay.
    assert plan.keep.squeeze(1).tolist() == [True, False, True, False, True]


# ------------------------------------------------------------------------------ placements


def test_linear_owners_follow_vllm():
    assert linear_owners(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert linear_owners(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert linear_owners(3, 4).tolist() == [0, 1, 2]  # fewer experts than ranks
    assert linear_owners(0, 2).tolist() == []
    for num_experts in range(0, 25):
        for num_ranks in range(1, 9):
            expected = reference_linear_owners(num_experts, num_ranks)
            assert linear_owners(num_experts, num_ranks).tolist() == expected
    with pytest.raises(ValueError):
        linear_owners(4, 0)


def test_expert_owners_accepts_any_expert_count():
    assert expert_owners(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert expert_owners(10, 4, "round_robin").tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert expert_owners(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="placement"):
        expert_owners(8, 2, "striped")


@pytest.mark.contract  # cross-checked against vLLM's own determine_expert_map
def test_placements_match_vllms_expert_maps():
    expert_map_manager = pytest.importorskip(
        "vllm.model_executor.layers.fused_moe.expert_map_manager"
    )
    for placement in ("linear", "round_robin"):
        for num_experts, num_ranks in ((10, 4), (7, 3), (16, 4), (5, 2), (3, 2)):
            owners = expert_owners(num_experts, num_ranks, placement)
            for rank in range(num_ranks):
                local, expert_map, _ = expert_map_manager.determine_expert_map(
                    num_ranks, rank, num_experts, placement
                )
                mine = expert_map >= 0
                assert torch.equal(mine, owners == rank), (placement, num_experts, rank)
                assert int(mine.sum()) == local


def test_owner_map_bins_rows_by_owner():
    # Round robin over 2 ranks: experts 0, 2 on rank 0; 1, 3 on rank 1.
    weights, ids = random_routing(40, 2, 4, seed=9, skew=0.6)
    owner = torch.tensor([0, 1, 0, 1])
    opts = options(drop_token_ratio=0.3)
    plan = plan_drops(weights, ids, num_experts=4, ep_size=2, options=opts, expert_owner=owner)
    assert torch.equal(plan.bin_load_before, torch.bincount(owner[ids].reshape(-1), minlength=2))
    # Renumbered to the linear layout (0, 2, 1, 3 -> 0, 1, 2, 3) the plan is the same.
    contiguous = torch.tensor([0, 2, 1, 3])[ids]
    linear = plan_drops(weights, contiguous, num_experts=4, ep_size=2, options=opts)
    assert torch.equal(plan.keep, linear.keep) and plan.capacity == linear.capacity
    capacity, keep = reference_plan(
        weights, ids, num_experts=4, ep_size=2, options=opts, expert_owner=owner
    )
    assert plan.capacity == capacity and torch.equal(plan.keep, keep)


def test_uneven_owner_map_with_an_empty_rank():
    # Rank 1 owns no expert: its bin stays empty and never sets the capacity.
    weights, ids = random_routing(30, 2, 5, seed=4, skew=0.5)
    owner = torch.tensor([0, 0, 0, 2, 2])
    opts = options(drop_token_ratio=0.25, simulate_ep_size=3)
    plan = plan_drops(weights, ids, num_experts=5, ep_size=1, options=opts, expert_owner=owner)
    assert plan.bin_load_before.numel() == 3 and int(plan.bin_load_before[1]) == 0
    capacity, keep = reference_plan(
        weights, ids, num_experts=5, ep_size=1, options=opts, expert_owner=owner
    )
    assert plan.capacity == capacity and torch.equal(plan.keep, keep)


def test_expert_granularity_ignores_the_owner_map():
    weights, ids = random_routing(30, 2, 6, seed=5, skew=0.5)
    opts = options(drop_token_ratio=0.25, granularity="expert")
    plain = plan_drops(weights, ids, num_experts=6, ep_size=4, options=opts)
    owned = plan_drops(
        weights, ids, num_experts=6, ep_size=4, options=opts, expert_owner=torch.arange(6) % 4
    )
    assert torch.equal(plain.keep, owned.keep)
    assert torch.equal(plain.bin_load_before, owned.bin_load_before)


@pytest.mark.parametrize(
    ("owner", "match"),
    [
        (torch.tensor([0, 1, 1]), "shape"),
        (torch.tensor([0, 1, 2, 1]), "rank 2"),
        (torch.tensor([0, -1, 1, 1]), "rank -1"),
    ],
)
def test_bad_owner_maps_are_refused(owner, match):
    weights, ids = random_routing(4, 2, 4, seed=0)
    with pytest.raises(ValueError, match=match):
        plan_drops(weights, ids, num_experts=4, ep_size=2, options=options(), expert_owner=owner)

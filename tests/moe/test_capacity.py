"""The drop planner against a brute-force reference and the spec's rules."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from pydantic import ValidationError

from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import drop_budget, plan_drops, water_level

# ---------------------------------------------------------------- brute-force references


def reference_water_level(load: list[int], protected: list[int], budget: int) -> int:
    """Try every C from 0 up to the max load."""
    for capacity in range(max(load, default=0) + 1):
        drops = sum(n - min(n, max(capacity, p)) for n, p in zip(load, protected))
        if drops <= budget:
            return capacity
    raise AssertionError("unreachable: nothing drops at the max load")


def reference_linear_owners(num_experts: int, num_ranks: int) -> list[int]:
    """vLLM 0.32's determine_expert_map, linear branch, transcribed rank by rank
    (fused_moe/expert_map_manager.py:66-79)."""
    base, remainder = divmod(num_experts, num_ranks)
    owners = [-1] * num_experts
    for rank in range(num_ranks):
        local = base + 1 if rank < remainder else base
        start = rank * base + min(rank, remainder)
        owners[start : start + local] = [rank] * local
    return owners


def reference_plan(weights, ids, *, num_experts, ep_size, options, expert_owner=None):
    """(capacity or None when nothing may drop, keep) with Python loops over rows.

    Rows with id -1 are not routed: in no bin, never protected, never kept.
    """
    tokens, top_k = ids.shape
    ranks = options.simulate_ep_size or ep_size
    if expert_owner is None:
        owner = reference_linear_owners(num_experts, ranks)
    else:
        owner = [int(o) for o in expert_owner]
    num_bins = num_experts if options.granularity == "expert" else ranks
    rows = [(t, j) for t in range(tokens) for j in range(top_k) if int(ids[t, j]) >= 0]
    bin_of = {
        (t, j): int(ids[t, j]) if options.granularity == "expert" else owner[int(ids[t, j])]
        for t, j in rows
    }
    protected = set()
    if options.keep_top1:
        for t in range(tokens):
            valid = [j for j in range(top_k) if int(ids[t, j]) >= 0]
            if valid:
                best = max(valid, key=lambda j: (float(weights[t, j]), -j))
                protected.add((t, best))
    budget = math.floor(Fraction(str(options.drop_token_ratio)) * len(rows))
    keep = ids >= 0
    if budget == 0 or len(rows) // max(top_k, 1) < options.min_tokens:
        return None, keep
    load = [sum(1 for r in rows if bin_of[r] == b) for b in range(num_bins)]
    prot = [sum(1 for r in protected if bin_of[r] == b) for b in range(num_bins)]
    capacity = reference_water_level(load, prot, budget)
    for b in range(num_bins):
        droppable = [r for r in rows if bin_of[r] == b and r not in protected]
        to_drop = load[b] - min(load[b], max(capacity, prot[b]))
        if options.drop_policy == "probs":
            droppable.sort(key=lambda r: (float(weights[r]), -r[1], -r[0]))
        else:
            droppable.sort(key=lambda r: (-r[1], -r[0]))
        for t, j in droppable[:to_drop]:
            keep[t, j] = False
    return capacity, keep


def random_routing(tokens, top_k, num_experts, *, seed, skew=0.0):
    """Softmax weights and distinct experts per token; skew sends part of rows to expert 0-1."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(tokens, top_k, generator=gen).softmax(dim=1)
    ids = torch.argsort(torch.rand(tokens, num_experts, generator=gen), dim=1)[:, :top_k]
    if skew:
        hot = torch.rand(tokens, top_k, generator=gen) < skew
        ids = torch.where(hot, ids % 2, ids)
    return weights, ids


def options(**kwargs) -> CapacityOptions:
    kwargs.setdefault("min_tokens", 0)
    return CapacityOptions(**kwargs)


def simulate_sources(parts, **kwargs):
    """plan_drops on each (weights, ids) part as if each were a DP rank, gathering in-process.
    A part (weights, ids, router_scores) plans with its scores (overflow: reroute).

    A first pass records every rank's local counts; the second answers the all-gather with
    all of them, exactly what the collective returns on every rank.
    """
    recorded = []

    def record(counts):
        recorded.append(counts.clone())
        return counts.unsqueeze(0)

    scores = [{"router_scores": part[2]} if len(part) > 2 else {} for part in parts]
    for (weights, ids, *_), extra in zip(parts, scores):
        plan_drops(weights, ids, all_gather_counts=record, **extra, **kwargs)
    gathered = torch.stack(recorded)
    return [
        plan_drops(weights, ids, all_gather_counts=lambda _: gathered, rank=rank, **extra,
                   **kwargs)
        for rank, ((weights, ids, *_), extra) in enumerate(zip(parts, scores))
    ]


def drops_at(load, protected, capacity):
    return int((load - load.minimum(protected.clamp(min=capacity))).sum())


# ---------------------------------------------------------------------------- water level


@pytest.mark.parametrize("seed", range(30))
def test_water_level_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    bins = int(torch.randint(1, 9, (1,), generator=gen))
    load = torch.randint(0, 40, (bins,), generator=gen)
    protected = (load.float() * torch.rand(bins, generator=gen)).long()
    if seed % 3 == 0:
        protected.zero_()
    budget = int(torch.randint(0, int(load.sum()) + 2, (1,), generator=gen))
    expected = reference_water_level(load.tolist(), protected.tolist(), budget)
    assert water_level(load, protected, budget) == expected


def test_water_level_edge_cases():
    empty = torch.zeros(0, dtype=torch.int64)
    assert water_level(empty, empty, 5) == 0
    load = torch.tensor([10, 4, 0])
    none = torch.zeros(3, dtype=torch.int64)
    assert water_level(load, none, 0) == 10  # no budget: the max load
    assert water_level(load, none, 14) == 0  # budget covers everything
    assert water_level(load, none, 6) == 4  # 10 -> 4 drops 6
    assert water_level(load, none, 7) == 4  # C = 3 would drop 7 + 1 = 8 > 7
    assert water_level(load, none, 8) == 3
    # Protection: a bin of protected rows cannot shrink, the level is set by the others.
    assert water_level(torch.tensor([10, 6]), torch.tensor([9, 0]), 3) == 4  # 1 + 2 rows


def test_drop_budget_reads_the_decimal():
    assert drop_budget(0.29, 100) == 29  # float arithmetic would give 28
    assert drop_budget(0.5, 7) == 3
    assert drop_budget(0.0, 10**6) == 0


# ------------------------------------------------------------------- plan against reference


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("granularity", ["rank", "expert"])
@pytest.mark.parametrize("keep_top1", [True, False])
def test_plan_matches_reference(policy, granularity, keep_top1):
    weights, ids = random_routing(40, 3, 8, seed=7, skew=0.4)
    opts = options(
        drop_token_ratio=0.2, drop_policy=policy, granularity=granularity, keep_top1=keep_top1
    )
    plan = plan_drops(weights, ids, num_experts=8, ep_size=4, options=opts)
    capacity, keep = reference_plan(weights, ids, num_experts=8, ep_size=4, options=opts)
    assert plan.capacity == capacity
    assert torch.equal(plan.keep, keep)
    assert plan.dropped_rows == int((~keep).sum()) <= plan.budget == 24
    assert plan.routed_rows == 120
    assert int(plan.bin_load_after.sum()) == 120 - plan.dropped_rows


def test_negative_weights_keep_their_order():
    # Pre-softmax scores or bias-corrected weights can be negative: the bit trick must hold.
    gen = torch.Generator().manual_seed(11)
    weights = torch.randn(30, 3, generator=gen)
    weights[0] = torch.tensor([-0.0, 0.0, -1e-30])
    _, ids = random_routing(30, 3, 8, seed=11, skew=0.5)
    opts = options(drop_token_ratio=0.4, granularity="expert")
    plan = plan_drops(weights, ids, num_experts=8, ep_size=2, options=opts)
    capacity, keep = reference_plan(weights, ids, num_experts=8, ep_size=2, options=opts)
    assert plan.capacity == capacity and torch.equal(plan.keep, keep)


def test_signed_zero_weights_tie():
    # Expert 0 holds two droppable rows weighing -0.0 and +0.0: a tie, so the later token's
    # row goes (the slot-0 rows on expert 1 are protected).
    ids = torch.tensor([[1, 0], [1, 0]])
    weights = torch.tensor([[1.0, -0.0], [1.0, 0.0]])
    plan = plan_drops(
        weights,
        ids,
        num_experts=2,
        ep_size=1,
        options=options(drop_token_ratio=0.25, granularity="expert"),
    )
    assert plan.keep.tolist() == [[True, True], [True, False]]


def test_concatenated_all_gather_layout_is_accepted():
    weights, ids = random_routing(40, 2, 8, seed=12, skew=0.5)
    opts = options(drop_token_ratio=0.3)
    stacked = plan_drops(weights, ids, num_experts=8, ep_size=4, options=opts)
    flat = plan_drops(
        weights,
        ids,
        num_experts=8,
        ep_size=4,
        options=opts,
        all_gather_counts=lambda counts: counts.clone(),  # [S * 2, E] with S = 1
    )
    assert torch.equal(flat.keep, stacked.keep) and flat.capacity == stacked.capacity
    with pytest.raises(ValueError, match="rank 1"):
        plan_drops(
            weights,
            ids,
            num_experts=8,
            ep_size=4,
            options=opts,
            all_gather_counts=lambda counts: counts.unsqueeze(0),
            rank=1,
        )


def test_tied_weights_drop_later_rows_first():
    # Every weight equal: probs falls back to the position order (slot, then token, last first).
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    weights = torch.full((4, 2), 0.5)
    opts = options(drop_token_ratio=0.25, granularity="expert", keep_top1=False)
    plan = plan_drops(weights, ids, num_experts=2, ep_size=1, options=opts)
    # Budget 2, loads (4, 4): C = 3, one row of each expert goes: the last token's.
    assert plan.capacity == 3
    assert plan.keep.tolist() == [[True, True], [True, True], [True, True], [False, False]]


def test_probs_drops_lowest_weights_and_position_the_later_slots():
    ids = torch.tensor([[0, 1], [0, 1], [1, 0]])
    weights = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])
    by_probs = plan_drops(
        weights,
        ids,
        num_experts=2,
        ep_size=2,
        options=options(drop_token_ratio=0.34, granularity="expert", keep_top1=False),
    )
    # Budget floor(0.34 * 6) = 2; loads (3, 3) -> C = 2; lowest weight per expert goes.
    assert by_probs.keep.tolist() == [[True, False], [True, True], [True, False]]
    by_position = plan_drops(
        weights,
        ids,
        num_experts=2,
        ep_size=2,
        options=options(
            drop_token_ratio=0.34, granularity="expert", keep_top1=False, drop_policy="position"
        ),
    )
    # Expert 0 rows: (0,0) (1,0) (2,1): the slot-1 row goes. Expert 1: (0,1) (1,1) (2,0).
    assert by_position.keep.tolist() == [[True, True], [True, False], [True, False]]


def test_keep_top1_protects_and_may_leave_budget_unused():
    # Top-1 routing: every row is its token's best, nothing may go whatever the budget.
    ids = torch.tensor([[0], [0], [0], [1]])
    top1 = plan_drops(
        torch.ones(4, 1), ids, num_experts=2, ep_size=2, options=options(drop_token_ratio=0.5)
    )
    assert top1.budget == 2 and top1.dropped_rows == 0 and top1.keep.all()
    # Top-2 with all rows on rank 0: only the second choices can go.
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    weights = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    plan = plan_drops(weights, ids, num_experts=4, ep_size=2, options=options(drop_token_ratio=0.5))
    assert plan.budget == 3 and plan.dropped_rows == 3
    assert plan.keep.tolist() == [[True, False], [False, True], [True, False]]


def test_equal_bins_can_leave_budget_unused_without_protection():
    # Loads (5, 5), budget 3: C = 4 drops 2, C = 3 would drop 4.
    ids = torch.tensor([[0], [0], [0], [0], [0], [1], [1], [1], [1], [1]])
    plan = plan_drops(
        torch.ones(10, 1),
        ids,
        num_experts=2,
        ep_size=2,
        options=options(drop_token_ratio=0.3, keep_top1=False),
    )
    assert (plan.budget, plan.capacity, plan.dropped_rows) == (3, 4, 2)


def test_ratio_zero_is_the_dropless_path():
    weights, ids = random_routing(300, 4, 16, seed=1, skew=0.6)
    plan = plan_drops(
        weights, ids, num_experts=16, ep_size=4, options=CapacityOptions(drop_token_ratio=0.0)
    )
    assert plan.keep.all() and plan.dropped_rows == 0
    assert torch.equal(plan.weights, weights)  # unchanged (a masked slot's weight is 0)
    assert plan.capacity == int(plan.bin_load_before.max())
    assert torch.equal(plan.bin_load_before, plan.bin_load_after)


def test_min_tokens_counts_global_tokens():
    weights, ids = random_routing(100, 2, 8, seed=2, skew=0.5)
    opts = CapacityOptions(drop_token_ratio=0.3, min_tokens=101)
    assert plan_drops(weights, ids, num_experts=8, ep_size=2, options=opts).dropped_rows == 0
    # The global count decides: 100 local tokens of a 200-token batch do drop.
    plan = plan_drops(weights, ids, num_experts=8, ep_size=2, options=opts, num_tokens_global=200)
    assert plan.dropped_rows > 0
    # ...and so does the count gathered from the other ranks.
    parts = [random_routing(100, 2, 8, seed=s, skew=0.5) for s in (2, 3)]
    plans = simulate_sources(parts, num_experts=8, ep_size=2, options=opts)
    assert all(p.dropped_rows > 0 for p in plans)


def test_renormalize_restores_each_tokens_sum():
    # Rank 0 (experts 0, 1) gets 12 rows, rank 1 gets 4; budget 8 -> C = 4: rank 0 drops
    # its 6 weight-0.4 rows and the slot-0 rows of the last two tokens.
    ids = torch.tensor([[0, 1]] * 6 + [[2, 3]] * 2)
    weights = torch.tensor([[0.6, 0.4]] * 6 + [[0.7, 0.3]] * 2)
    plan = plan_drops(
        weights,
        ids,
        num_experts=4,
        ep_size=2,
        options=options(drop_token_ratio=0.5, keep_top1=False, renormalize=True),
    )
    assert plan.capacity == 4
    survivors = plan.keep.any(dim=1)
    assert survivors.tolist() == [True] * 4 + [False] * 2 + [True] * 2
    torch.testing.assert_close(plan.weights.sum(1)[survivors], weights.sum(1)[survivors])
    assert plan.weights[:4].tolist() == [[1.0, 0.0]] * 4
    assert (plan.weights[~survivors] == 0).all()


def test_weights_without_renormalize_are_zeroed_only():
    weights, ids = random_routing(64, 4, 8, seed=4, skew=0.7)
    plan = plan_drops(weights, ids, num_experts=8, ep_size=4, options=options(drop_token_ratio=0.3))
    assert torch.equal(plan.weights, torch.where(plan.keep, weights, 0.0))


def test_rank_and_expert_granularity_bins():
    weights, ids = random_routing(50, 2, 8, seed=5, skew=0.5)
    by_rank = plan_drops(
        weights, ids, num_experts=8, ep_size=4, options=options(drop_token_ratio=0.2)
    )
    by_expert = plan_drops(
        weights,
        ids,
        num_experts=8,
        ep_size=4,
        options=options(drop_token_ratio=0.2, granularity="expert"),
    )
    experts = torch.bincount(ids.reshape(-1), minlength=8)
    assert torch.equal(by_expert.bin_load_before, experts)
    assert torch.equal(by_rank.bin_load_before, experts.view(4, 2).sum(1))
    assert int(by_rank.bin_load_after.max()) <= by_rank.capacity or by_rank.capacity == 0


def test_simulate_ep_size_overrides_the_bins():
    weights, ids = random_routing(50, 2, 8, seed=6, skew=0.5)
    plan = plan_drops(
        weights,
        ids,
        num_experts=8,
        ep_size=1,
        options=options(drop_token_ratio=0.2, simulate_ep_size=4),
    )
    assert plan.bin_load_before.numel() == 4
    capacity, keep = reference_plan(
        weights, ids, num_experts=8, ep_size=4, options=options(drop_token_ratio=0.2)
    )
    assert plan.capacity == capacity and torch.equal(plan.keep, keep)


def test_uneven_experts_follow_vllms_linear_placement():
    # 6 experts on 4 ranks: vLLM gives the first 6 % 4 = 2 ranks one more expert,
    # owners [0, 0, 1, 1, 2, 3], instead of refusing the split.
    weights, ids = random_routing(40, 2, 6, seed=0, skew=0.5)
    opts = options(drop_token_ratio=0.3, keep_top1=False)
    plan = plan_drops(weights, ids, num_experts=6, ep_size=4, options=opts)
    owners = torch.tensor([0, 0, 1, 1, 2, 3])
    assert torch.equal(plan.bin_load_before, torch.bincount(owners[ids].reshape(-1), minlength=4))
    capacity, keep = reference_plan(weights, ids, num_experts=6, ep_size=4, options=opts)
    assert plan.capacity == capacity and torch.equal(plan.keep, keep)
    assert plan.dropped_rows > 0


def test_zero_tokens():
    weights, ids = torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long)
    plan = plan_drops(weights, ids, num_experts=8, ep_size=2, options=options(drop_token_ratio=0.5))
    assert plan.keep.shape == (0, 4) and plan.routed_rows == 0 and plan.dropped_rows == 0


def test_bf16_weights_keep_their_dtype():
    weights, ids = random_routing(64, 2, 8, seed=8, skew=0.7)
    plan = plan_drops(
        weights.bfloat16(),
        ids,
        num_experts=8,
        ep_size=2,
        options=options(drop_token_ratio=0.3, renormalize=True),
    )
    assert plan.weights.dtype == torch.bfloat16 and plan.dropped_rows > 0


# ------------------------------------------------------------- several sources (in-process)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_sources_share_one_capacity_and_the_exact_global_drops(policy):
    parts = [random_routing(t, 3, 8, seed=10 + s, skew=0.5) for s, t in enumerate((30, 0, 17))]
    opts = options(drop_token_ratio=0.25, drop_policy=policy)
    plans = simulate_sources(parts, num_experts=8, ep_size=4, options=opts)
    whole = plan_drops(
        torch.cat([w for w, _ in parts]),
        torch.cat([i for _, i in parts]),
        num_experts=8,
        ep_size=4,
        options=opts,
    )
    assert {p.capacity for p in plans} == {whole.capacity}
    assert {p.dropped_rows for p in plans} == {whole.dropped_rows}
    assert sum(int((~p.keep).sum()) for p in plans) == whole.dropped_rows <= whole.budget
    # Per bin, the rows the sources keep add up to the planned load after capping.
    kept = sum(
        torch.bincount(ids.reshape(-1)[p.keep.reshape(-1)] // 2, minlength=4)
        for (_, ids), p in zip(parts, plans)
    )
    assert torch.equal(kept, whole.bin_load_after)
    for (weights, _), plan in zip(parts, plans):
        assert plan.keep.shape[0] == 0 or plan.keep.gather(1, weights.argmax(1, keepdim=True)).all()


# ------------------------------------------------------------------------------- options


def test_options_validation():
    assert CapacityOptions().drop_token_ratio == 0.0
    for bad in (
        {"drop_token_ratio": float("nan")},
        {"drop_token_ratio": float("inf")},
        {"drop_token_ratio": 0.51},
        {"drop_token_ratio": -0.1},
        {"min_tokens": 1.5},
        {"min_tokens": -1},
        {"keep_top1": "yes"},
        {"simulate_ep_size": 0},
        {"granularity": "token"},
        {"backend": "cuda"},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            CapacityOptions(**bad)
    with pytest.raises(ValidationError):
        CapacityOptions().drop_token_ratio = 0.1  # frozen
    assert all(f.description for f in CapacityOptions.model_fields.values())

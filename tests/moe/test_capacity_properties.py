"""Property tests of the drop planner over random routings (hypothesis)."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import linear_owners, plan_drops

from .test_capacity import (
    drops_at,
    reference_linear_owners,
    reference_plan,
    simulate_sources,
)


@st.composite
def routings(draw):
    """(weights [T, k], ids [T, k], E, R, options, expert_owner) with distinct experts per
    token.

    Weights are sometimes drawn from a few values to force ties, sometimes float64 with
    differences below float32 precision, and part of the rows is sometimes sent to experts
    0-1 to create the imbalance that makes dropping bite. Some slots are masked (-1), whole
    tokens included. Placement is vLLM's linear one (E divisible by R or not) or an explicit
    owner map: a shuffled one with equal-size ranks, or any map (uneven, empty ranks).
    """
    placement = draw(st.sampled_from(["linear", "linear", "uneven", "shuffled", "any"]))
    num_experts, ep_size = draw(_experts_and_ranks(placement))
    tokens = draw(st.integers(0, 64))
    top_k = draw(st.integers(1, min(4, num_experts)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weights = _weights(draw, tokens, top_k, gen)
    ids = torch.argsort(torch.rand(tokens, num_experts, generator=gen), dim=1)[:, :top_k]
    skew = draw(st.sampled_from([0.0, 0.5, 0.9]))
    if skew:
        hot = (torch.rand(tokens, 1, generator=gen) < skew).expand(tokens, top_k)
        # Shift the whole token's experts towards 0 so its experts stay distinct.
        ids = torch.where(hot, (ids - ids.min(dim=1, keepdim=True).values) % num_experts, ids)
    masked_share = draw(st.sampled_from([0.0, 0.0, 0.2, 0.6]))
    ids = ids.masked_fill(torch.rand(tokens, top_k, generator=gen) < masked_share, -1)
    options = CapacityOptions(
        drop_token_ratio=draw(st.floats(0.0, 0.5)),
        granularity=draw(st.sampled_from(["rank", "expert"])),
        drop_policy=draw(st.sampled_from(["probs", "position"])),
        keep_top1=draw(st.booleans()),
        min_tokens=draw(st.sampled_from([0, 0, 16])),
    )
    owner = _owner_map(placement, num_experts, ep_size, gen)
    return weights, ids, num_experts, ep_size, options, owner


@st.composite
def _experts_and_ranks(draw, placement):
    if placement == "linear":
        num_experts = draw(st.sampled_from([4, 8, 16]))
        return num_experts, draw(st.sampled_from([r for r in (1, 2, 4, 8, 16) if r <= num_experts]))
    if placement == "shuffled":
        ep_size = draw(st.integers(1, 4))
        return ep_size * draw(st.integers(1, 4)), ep_size
    if placement == "uneven":  # E % R != 0, fewer experts than ranks included
        ep_size = draw(st.integers(2, 6))
        return ep_size * draw(st.integers(0, 3)) + draw(st.integers(1, ep_size - 1)), ep_size
    return draw(st.integers(1, 12)), draw(st.integers(1, 6))


def _weights(draw, tokens, top_k, gen):
    weights = torch.rand(tokens, top_k, generator=gen)
    if draw(st.booleans()):
        weights = (weights * 3).floor() / 3  # ties
    if draw(st.booleans()):
        # Differences of about 1e-12: distinct in float64, tied in float32.
        tiny = torch.randint(0, 3, (tokens, top_k), generator=gen).double()
        weights = weights.double() + tiny * 1e-12
    return weights


def _owner_map(placement, num_experts, ep_size, gen):
    if placement in ("linear", "uneven"):
        return None
    if placement == "shuffled":
        owner = torch.arange(ep_size).repeat_interleave(num_experts // ep_size)
        return owner[torch.randperm(num_experts, generator=gen)]
    return torch.randint(0, ep_size, (num_experts,), generator=gen)


def bins_of(ids, num_experts, ep_size, options, owner=None):
    """Bin of each row (ids -1 give -1)."""
    if options.granularity == "expert":
        return ids
    if owner is None:
        owner = torch.tensor(reference_linear_owners(num_experts, ep_size))
    return torch.where(ids >= 0, owner[ids.clamp(min=0)], -1)


def protected_rows(weights, ids, options):
    """Each token's highest-weight valid row (first slot on ties) if keep_top1."""
    protected = torch.zeros(ids.shape, dtype=torch.bool)
    if not options.keep_top1:
        return protected
    for t in range(ids.shape[0]):
        valid = [j for j in range(ids.shape[1]) if ids[t, j] >= 0]
        if valid:
            protected[t, max(valid, key=lambda j: (float(weights[t, j]), -j))] = True
    return protected


def contiguous_ids(ids, owner, ep_size):
    """ids renumbered so that each rank's experts are contiguous (a rank's own experts keep
    their relative order): the linear layout of an equal-size placement. -1 stays."""
    per_rank = owner.numel() // ep_size
    new_id = torch.empty_like(owner)
    for rank in range(ep_size):
        mine = (owner == rank).nonzero().squeeze(1)
        new_id[mine] = rank * per_rank + torch.arange(mine.numel())
    return torch.where(ids >= 0, new_id[ids.clamp(min=0)], -1)


@settings(max_examples=120, deadline=None)
@given(routings())
def test_plan_matches_brute_force_and_rules(case):
    weights, ids, num_experts, ep_size, options, owner = case
    kwargs = dict(num_experts=num_experts, ep_size=ep_size, options=options)
    plan = plan_drops(weights, ids, expert_owner=owner, **kwargs)
    capacity, keep = reference_plan(weights, ids, expert_owner=owner, **kwargs)
    assert torch.equal(plan.keep, keep)
    masked = ids < 0
    dropped = int((~plan.keep & ~masked).sum())
    assert plan.dropped_rows == dropped <= plan.budget
    # Masked rows: never kept, weight 0, in no load and not in the budget's base.
    assert not plan.keep[masked].any() and (plan.weights[masked] == 0).all()
    assert plan.routed_rows == int((~masked).sum()) == int(plan.bin_load_before.sum())
    if capacity is None:  # r rounds to no budget, or too few tokens
        assert dropped == 0
        # The router's weights, bit for bit (masked slots zeroed). Not the same tensor:
        # whether anything may drop is a device value, which the planner never reads back.
        assert torch.equal(plan.weights, weights.masked_fill(masked, 0))
        return
    # C is the water level over the valid rows: within budget, and one less would not be.
    protected_mask = protected_rows(weights, ids, options)
    bins = bins_of(ids, num_experts, ep_size, options, owner)
    num_bins = plan.bin_load_before.numel()
    load = torch.bincount(bins[~masked], minlength=num_bins)
    protected = torch.bincount(bins[protected_mask], minlength=num_bins)
    assert torch.equal(plan.bin_load_before, load)
    assert plan.capacity == capacity
    assert drops_at(load, protected, capacity) <= plan.budget
    assert capacity == 0 or drops_at(load, protected, capacity - 1) > plan.budget
    assert plan.keep[protected_mask].all()
    assert torch.equal(plan.bin_load_after, torch.bincount(bins[plan.keep], minlength=num_bins))
    assert torch.equal(plan.weights, torch.where(plan.keep, weights, 0.0))
    if options.drop_policy == "probs":
        for b in range(num_bins):
            in_bin = (bins == b) & ~protected_mask
            dropped_w, kept_w = weights[in_bin & ~plan.keep], weights[in_bin & plan.keep]
            if dropped_w.numel() and kept_w.numel():
                assert dropped_w.max() <= kept_w.min()


@settings(max_examples=80, deadline=None)
@given(routings(), st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_sources_agree_with_the_concatenated_plan(case, num_sources, split_seed):
    weights, ids, num_experts, ep_size, options, owner = case
    kwargs = dict(num_experts=num_experts, ep_size=ep_size, options=options, expert_owner=owner)
    gen = torch.Generator().manual_seed(split_seed)
    cuts = sorted(torch.randint(0, ids.shape[0] + 1, (num_sources - 1,), generator=gen).tolist())
    bounds = [0, *cuts, ids.shape[0]]
    parts = [(weights[a:b], ids[a:b]) for a, b in itertools.pairwise(bounds)]
    plans = simulate_sources(parts, **kwargs)
    whole = plan_drops(weights, ids, **kwargs)
    assert {p.capacity for p in plans} == {whole.capacity}
    assert {p.dropped_rows for p in plans} == {whole.dropped_rows}
    keep = torch.cat([p.keep for p in plans])
    valid = ids >= 0
    assert int((~keep & valid).sum()) == whole.dropped_rows <= whole.budget
    assert not keep[~valid].any()
    bins = bins_of(ids, num_experts, ep_size, options, owner)
    assert torch.equal(
        torch.bincount(bins[keep], minlength=whole.bin_load_before.numel()),
        whole.bin_load_after,
    )
    assert keep[protected_rows(weights, ids, options)].all()


@settings(max_examples=60, deadline=None)
@given(routings())
def test_owner_map_equals_the_contiguous_layout(case):
    # Bins only see which rank owns an expert: an equal-size owner map plans exactly as the
    # linear placement of the renumbered ids; vLLM's linear map as no map at all.
    weights, ids, num_experts, ep_size, options, owner = case
    kwargs = dict(num_experts=num_experts, ep_size=ep_size, options=options)
    if owner is None:
        owner = linear_owners(num_experts, ep_size)
        expected = plan_drops(weights, ids, **kwargs)
    elif (torch.bincount(owner, minlength=ep_size) == num_experts // ep_size).all():
        expected = plan_drops(weights, contiguous_ids(ids, owner, ep_size), **kwargs)
    else:
        return
    plan = plan_drops(weights, ids, expert_owner=owner, **kwargs)
    assert torch.equal(plan.keep, expected.keep)
    assert torch.equal(plan.weights, expected.weights)
    assert (plan.capacity, plan.dropped_rows) == (expected.capacity, expected.dropped_rows)
    if options.granularity == "rank":
        assert torch.equal(plan.bin_load_before, expected.bin_load_before)
        assert torch.equal(plan.bin_load_after, expected.bin_load_after)

"""Property tests of the drop planner over random routings (hypothesis)."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_patch.impls.moe.capacity import plan_drops
from ascend_patch.impls.moe.options import CapacityOptions

from .test_capacity import drops_at, reference_plan, simulate_sources


@st.composite
def routings(draw):
    """(weights [T, k], ids [T, k], E, R, options) with distinct experts per token.

    Weights are sometimes drawn from a few values to force ties, and part of the rows is
    sometimes sent to experts 0-1 to create the imbalance that makes dropping bite.
    """
    num_experts = draw(st.sampled_from([4, 8, 16]))
    ep_size = draw(st.sampled_from([r for r in (1, 2, 4, 8, 16) if num_experts % r == 0]))
    tokens = draw(st.integers(0, 64))
    top_k = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    weights = torch.rand(tokens, top_k, generator=gen)
    if draw(st.booleans()):
        weights = (weights * 3).floor() / 3  # ties
    ids = torch.argsort(torch.rand(tokens, num_experts, generator=gen), dim=1)[:, :top_k]
    skew = draw(st.sampled_from([0.0, 0.5, 0.9]))
    if skew:
        hot = (torch.rand(tokens, 1, generator=gen) < skew).expand(tokens, top_k)
        # Shift the whole token's experts towards 0 so its experts stay distinct.
        ids = torch.where(hot, (ids - ids.min(dim=1, keepdim=True).values) % num_experts, ids)
    options = CapacityOptions(
        drop_token_ratio=draw(st.floats(0.0, 0.5)),
        granularity=draw(st.sampled_from(["rank", "expert"])),
        drop_policy=draw(st.sampled_from(["probs", "position"])),
        keep_top1=draw(st.booleans()),
        min_tokens=draw(st.sampled_from([0, 0, 16])),
    )
    return weights, ids, num_experts, ep_size, options


def bins_of(ids, num_experts, ep_size, options):
    if options.granularity == "expert":
        return ids
    return ids // (num_experts // ep_size)


@settings(max_examples=120, deadline=None)
@given(routings())
def test_plan_matches_brute_force_and_rules(case):
    weights, ids, num_experts, ep_size, options = case
    plan = plan_drops(weights, ids, num_experts=num_experts, ep_size=ep_size, options=options)
    capacity, keep = reference_plan(
        weights, ids, num_experts=num_experts, ep_size=ep_size, options=options
    )
    assert torch.equal(plan.keep, keep)
    dropped = int((~plan.keep).sum())
    assert plan.dropped_rows == dropped <= plan.budget
    assert plan.routed_rows == ids.numel()
    if capacity is None:  # r rounds to no budget, or too few tokens
        assert dropped == 0 and plan.weights is weights
        return
    # C is the water level: within budget, and one less would not be.
    protected_mask = torch.zeros_like(keep)
    if options.keep_top1 and ids.numel():
        protected_mask.scatter_(1, weights.argmax(1, keepdim=True), True)
    bins = bins_of(ids, num_experts, ep_size, options)
    num_bins = plan.bin_load_before.numel()
    load = torch.bincount(bins.reshape(-1), minlength=num_bins)
    protected = torch.bincount(bins[protected_mask], minlength=num_bins)
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
    weights, ids, num_experts, ep_size, options = case
    gen = torch.Generator().manual_seed(split_seed)
    cuts = sorted(torch.randint(0, ids.shape[0] + 1, (num_sources - 1,), generator=gen).tolist())
    bounds = [0, *cuts, ids.shape[0]]
    parts = [(weights[a:b], ids[a:b]) for a, b in itertools.pairwise(bounds)]
    plans = simulate_sources(parts, num_experts=num_experts, ep_size=ep_size, options=options)
    whole = plan_drops(weights, ids, num_experts=num_experts, ep_size=ep_size, options=options)
    assert {p.capacity for p in plans} == {whole.capacity}
    assert {p.dropped_rows for p in plans} == {whole.dropped_rows}
    assert sum(int((~p.keep).sum()) for p in plans) == whole.dropped_rows <= whole.budget
    keep = torch.cat([p.keep for p in plans])
    bins = bins_of(ids, num_experts, ep_size, options)
    assert torch.equal(
        torch.bincount(bins[keep], minlength=whole.bin_load_before.numel()),
        whole.bin_load_after,
    )
    if options.keep_top1 and ids.numel():
        assert keep.gather(1, weights.argmax(1, keepdim=True)).all()

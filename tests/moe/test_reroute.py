"""`overflow: reroute` (planner/reroute.py): exact small cases and property tests.

The properties are checked from the plan's outputs alone (final ids, keep mask, loads
recounted here), not from the planner's own counters."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ascend_patch.impls.moe.drop_step import DropStep
from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import _apportion, plan_drops
from ascend_patch.impls.moe.planner.reroute import room_shares

from .test_capacity import simulate_sources
from .test_capacity_properties import bins_of, routings


def reroute_options(**kwargs):
    return CapacityOptions(overflow="reroute", min_tokens=0, **kwargs)


def scores_for(ids, num_experts, gen):
    """Router scores [T, E] consistent with ids: the token's top-k hold its largest."""
    scores = torch.rand(ids.shape[0], num_experts, generator=gen)
    return scores.scatter(1, ids.clamp(min=0), 2.0 + torch.rand(ids.shape, generator=gen))


# ------------------------------------------------------------------------- exact cases


def test_overflow_fills_the_other_rank_by_score_and_keeps_the_token_scale():
    # E=4 on R=2 (experts 0,1 | 2,3), k=1: 8 tokens on expert 0, 2 on expert 2. Budget
    # floor(0.5 * 10) = 5, water level C = 3: rank 0 keeps its 3 heaviest rows (tokens 0-2),
    # rank 1 keeps both and has room 1. The five overflow tokens (3-7) compete for that one
    # slot on rank 1's experts 2 and 3 (expert 1 is on the full rank 0): token 5 has the
    # highest score there (0.30 on expert 3) and takes it.
    weights = torch.tensor([[0.9], [0.8], [0.7], [0.6], [0.5], [0.4], [0.35], [0.3], [0.9],
                            [0.8]])
    ids = torch.tensor([[0]] * 8 + [[2]] * 2)
    scores = torch.zeros(10, 4)
    scores[:, 0] = weights[:, 0]
    scores[3:8, 2] = torch.tensor([0.10, 0.20, 0.05, 0.25, 0.01])
    scores[3:8, 3] = torch.tensor([0.12, 0.05, 0.30, 0.02, 0.01])
    scores[3:8, 1] = 0.5  # on the full rank: never a target
    plan = plan_drops(weights, ids, num_experts=4, ep_size=2,
                      options=reroute_options(drop_token_ratio=0.5, keep_top1=False),
                      router_scores=scores)
    assert plan.capacity == 3
    assert plan.bin_load_after.tolist() == [3, 2]
    assert plan.keep[:, 0].tolist() == [True] * 3 + [False, False, True, False, False] + [True] * 2
    assert plan.topk_ids[:, 0].tolist() == [0, 0, 0, 0, 0, 3, 0, 0, 2, 2]
    assert int(plan.local_rerouted_rows) == 1 and plan.bin_rerouted.tolist() == [0, 1]
    # Token 5's router did not renormalise (weight 0.4 == score 0.4): the new weight is the
    # score of expert 3 itself.
    expected = weights.masked_fill(~plan.keep, 0)
    expected[5, 0] = scores[5, 3]
    assert torch.equal(plan.weights, expected)


def test_reroute_weight_is_the_new_score_on_the_renormalised_scale():
    # k=2, softmax scores renormalised over the top-2 (Mixtral style): token 0's rerouted
    # row weighs score[new] / (sum of its top-2 scores).
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4)
    ids = torch.tensor([[0, 1]] * 4)
    weights = torch.tensor([[0.625, 0.375]] * 4)
    plan = plan_drops(weights, ids, num_experts=4, ep_size=4,
                      options=reroute_options(drop_token_ratio=0.25, keep_top1=True),
                      router_scores=scores)
    # Loads [4, 4, 0, 0], budget 2, C = 2 (bin 0 is all protected top-1 rows: stays 4).
    # Expert 1 drops two rows (the latest tokens on equal weights); both go to expert 2,
    # the best score outside the token's top-2, which has room 2.
    assert plan.capacity == 2
    assert plan.topk_ids.tolist() == [[0, 1]] * 2 + [[0, 2]] * 2
    assert plan.keep.all()
    assert torch.allclose(plan.weights[2:], torch.tensor([[0.625, 0.15 / 0.8]] * 2))
    renormalised = plan_drops(weights, ids, num_experts=4, ep_size=4,
                              options=reroute_options(drop_token_ratio=0.25, renormalize=True),
                              router_scores=scores)
    assert torch.allclose(renormalised.weights[3].sum(), torch.tensor(1.0))


def test_ratio_zero_is_bit_identical_to_the_dropless_path():
    gen = torch.Generator().manual_seed(3)
    weights = torch.rand(40, 2, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    ids = torch.argsort(torch.rand(40, 8, generator=gen), dim=1)[:, :2]
    step = DropStep(num_experts=8, ep_size=4, options=reroute_options(drop_token_ratio=0.0))
    out_w, out_ids = step(weights, ids, scores_for(ids, 8, gen))
    assert torch.equal(out_w, weights) and out_w.dtype == weights.dtype
    assert torch.equal(out_ids, ids)


def test_the_step_returns_rerouted_ids_and_drops_the_rest():
    gen = torch.Generator().manual_seed(5)
    ids = torch.zeros(64, 1, dtype=torch.long)
    ids[48:] = 5  # rank 0 (experts 0-1) 48 rows, rank 2 (experts 4-5) 16
    scores = scores_for(ids, 8, gen)
    step = DropStep(num_experts=8, ep_size=4,
                    options=reroute_options(drop_token_ratio=0.4, keep_top1=False))
    out_w, out_ids = step(scores.gather(1, ids), ids, scores)
    plan = step.plan(scores.gather(1, ids), ids, scores)
    assert torch.equal(out_ids, plan.topk_ids.masked_fill(~plan.keep, -1))
    final = torch.bincount(out_ids[out_ids >= 0] // 2, minlength=4)
    assert final.max() == plan.capacity  # every rank filled to C, none above
    assert (out_w[out_ids < 0] == 0).all()


def test_missing_scores_are_refused():
    ids = torch.zeros(8, 1, dtype=torch.long)
    try:
        plan_drops(torch.ones(8, 1), ids, num_experts=2, ep_size=2,
                   options=reroute_options(drop_token_ratio=0.5, keep_top1=False))
    except ValueError as exc:
        assert "needs the router scores" in str(exc)
    else:
        raise AssertionError("no error without scores")


def test_room_is_split_by_overflow_rows_largest_remainder():
    # Two sources, three bins, C = 5. Overflow rows: source 0 has 3, source 1 has 1.
    rows = torch.tensor([[4, 2, 0], [1, 1, 0]])
    quotas = torch.tensor([[2, 1, 0], [1, 0, 0]])
    shares = room_shares(5, torch.tensor([3, 1, 0]), rows, quotas, _apportion)
    # Room [2, 4, 4], each capped at the 4 overflow rows; 3:1 split, remainders to source 0
    # (bin 0: 1.5 / 0.5 -> 2, 0 after the tie goes to the lower rank).
    assert shares.tolist() == [[2, 3, 3], [0, 1, 1]]


# ----------------------------------------------------------------------- properties


def _final_loads(plan, ids, num_experts, ep_size, options, owner):
    final_ids = plan.topk_ids if plan.topk_ids is not None else ids
    bins = bins_of(final_ids.masked_fill(~plan.keep, -1), num_experts, ep_size, options, owner)
    return torch.bincount(bins[bins >= 0], minlength=plan.bin_load_before.numel())


def _check_rerouted_rows(ids, plan, drop_plan, scores):
    """Rerouted rows were dropped by the drop plan, go to experts outside the token's
    top-k and distinct per token; kept rows stay as they were."""
    final = plan.topk_ids
    rerouted = plan.keep & ~drop_plan.keep
    assert torch.equal(plan.keep & drop_plan.keep, drop_plan.keep)
    assert torch.equal(final[drop_plan.keep], ids[drop_plan.keep].to(final.dtype))
    for token in range(ids.shape[0]):
        original = set(ids[token][ids[token] >= 0].tolist())
        new = final[token][rerouted[token]].tolist()
        assert not original & set(new) and len(set(new)) == len(new)
        assert all(scores[token, e] > float("-inf") for e in new)


@settings(max_examples=150, deadline=None)
@given(routings(), st.integers(0, 2**31 - 1))
def test_reroute_never_exceeds_the_cap_and_places_greedily(case, seed):
    weights, ids, num_experts, ep_size, options, owner = case
    options = options.model_copy(update={"overflow": "reroute"})
    scores = scores_for(ids, num_experts, torch.Generator().manual_seed(seed))
    kwargs = dict(num_experts=num_experts, ep_size=ep_size, expert_owner=owner)
    plan = plan_drops(weights, ids, options=options, router_scores=scores, **kwargs)
    drop_plan = plan_drops(weights, ids, options=options.model_copy(update={"overflow": "drop"}),
                           **kwargs)
    assert torch.equal(plan.bin_load_after, drop_plan.bin_load_after)
    if plan.topk_ids is None:  # nothing to drop: the dropless plan, as with drop
        assert torch.equal(plan.keep, drop_plan.keep)
        assert torch.equal(plan.weights, drop_plan.weights)
        return
    final = _final_loads(plan, ids, num_experts, ep_size, options, owner)
    after = drop_plan.bin_load_after
    # Never above the cap, except bins the drop plan already leaves above it (protected
    # rows), which receive nothing.
    assert (final <= torch.maximum(after, torch.full_like(after, plan.capacity))).all()
    assert torch.equal(final - after, plan.bin_rerouted)
    assert int(plan.local_rerouted_rows) == int((plan.keep & ~drop_plan.keep).sum())
    _check_rerouted_rows(ids, plan, drop_plan, scores)
    # Greedy: a row still dropped found no expert outside its token's set in a bin with room.
    bins = bins_of(torch.arange(num_experts), num_experts, ep_size, options, owner)
    full = final[bins] >= plan.capacity
    for token in torch.nonzero((~plan.keep & (ids >= 0)).any(dim=1)).flatten().tolist():
        own = set(plan.topk_ids[token][ids[token] >= 0].tolist())
        free = [e for e in range(num_experts) if e not in own and not full[e]]
        assert free == [], (token, free)


@settings(max_examples=80, deadline=None)
@given(routings(), st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_sources_never_exceed_the_cap_together(case, num_sources, seed):
    weights, ids, num_experts, ep_size, options, owner = case
    options = options.model_copy(update={"overflow": "reroute"})
    gen = torch.Generator().manual_seed(seed)
    scores = scores_for(ids, num_experts, gen)
    cuts = sorted(torch.randint(0, ids.shape[0] + 1, (num_sources - 1,), generator=gen).tolist())
    bounds = [0, *cuts, ids.shape[0]]
    parts = [(weights[a:b], ids[a:b], scores[a:b]) for a, b in zip(bounds, bounds[1:])]
    plans = simulate_sources(parts, num_experts=num_experts, ep_size=ep_size,
                                  options=options, expert_owner=owner)
    assert len({p.capacity for p in plans}) == 1
    if plans[0].topk_ids is None:
        return
    final = sum(_final_loads(p, i, num_experts, ep_size, options, owner)
                for p, (_, i, _) in zip(plans, parts))
    after = plans[0].bin_load_after
    assert (final <= torch.maximum(after, torch.full_like(after, plans[0].capacity))).all()
    assert torch.equal(final - after, sum(p.bin_rerouted for p in plans))


# ------------------------------------------------------------------ adapters (at load)


def _context(line, platform):
    from ascend_patch.core.context import PatchContext
    from ascend_patch.core.versions import Stack

    return PatchContext(patch_name="cap", impl_name="moe.capacity", where="cfg.yaml:3",
                        options=reroute_options(drop_token_ratio=0.1),
                        stack=Stack.for_line(line, platform))


def test_adapters_without_router_scores_refuse_reroute_at_load():
    import pytest

    from ascend_patch.core.errors import PatchError
    from ascend_patch.impls.moe.state import CapacityState

    for line in ("0.33", "0.34"):
        with pytest.raises(PatchError) as exc:
            CapacityState(_context(line, "vllm"))
        message = str(exc.value)
        assert message.startswith("cfg.yaml:3: patch 'cap' (moe.capacity): overflow: reroute")
        assert "vllm_modular" in message and f"vLLM {line}" in message
    # The router site (0.32), the CPU monolithic adapter (0.23), the prepare site (vllm-ascend).
    for line, platform in (("0.32", "vllm"), ("0.23", "vllm"), ("0.23", "ascend"),
                           ("0.18", "ascend"), ("0.13", "ascend")):
        CapacityState(_context(line, platform)).ctx.close()


def test_the_0_23_adapter_scores_are_the_routers_scoring_function():
    from ascend_patch.impls.moe.planner.reroute import scores_from_logits as router_scores

    logits = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.bfloat16)
    assert torch.equal(router_scores(logits, "softmax"), logits.float().softmax(dim=-1))
    assert torch.equal(router_scores(logits, "sigmoid"), logits.float().sigmoid())


def test_vllm_ascend_reroute_refuses_a_router_it_cannot_score_at_load():
    """vllm-ascend's select_experts also knows sqrtsoftplus (experts_selector.py:351-358 in
    0.23.0.post1), whose scores the reroute weight is not defined for: refused when the
    layer is taken over, naming it; softmax and sigmoid layers are taken over."""
    from types import SimpleNamespace

    import pytest

    from ascend_patch.core.errors import PatchError
    from ascend_patch.impls.moe.adapters.ascend_0_23 import AscendCapacityState

    state = AscendCapacityState(_context("0.23", "ascend"))
    with pytest.raises(PatchError) as exc:
        state.add_layer("model.layers.3.mlp.experts", SimpleNamespace(scoring_func="sqrtsoftplus"))
    assert str(exc.value) == (
        "cfg.yaml:3: patch 'cap' (moe.capacity): overflow: reroute: MoE layer "
        "'model.layers.3.mlp.experts' scores its experts with 'sqrtsoftplus'; a rerouted row "
        "is weighed by softmax or sigmoid scores only: use overflow: drop")
    assert "model.layers.3.mlp.experts" not in state.layers
    for func in ("softmax", "sigmoid"):
        state.add_layer(f"model.layers.{func}", SimpleNamespace(scoring_func=func))
    assert sorted(state.layers) == ["model.layers.sigmoid", "model.layers.softmax"]
    state.ctx.close()

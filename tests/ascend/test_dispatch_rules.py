"""The tensor rules of ascend_dispatch.py, against the torch behaviour they rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ascend_patch.impls.moe.adapters import ascend_dispatch


def test_unsent_id_is_outside_the_all_to_all_histogram():
    """token_dispatcher.py:593 histograms ids with histc(bins=E, min=0, max=E): E itself is
    counted in the last bin, E + 1 is not counted at all."""
    experts = 4
    ids = torch.tensor([[0, 3], [-1, 1]])
    marked = ascend_dispatch.mark_unsent(ids, experts)
    assert marked.tolist() == [[0, 3], [5, 1]] and marked.dtype == ids.dtype
    counts = torch.histc(marked.float(), bins=experts, min=0, max=experts)
    assert counts.tolist() == [1, 1, 0, 1]
    at_bound = torch.histc(torch.tensor([float(experts)]), bins=experts, min=0, max=experts)
    assert at_bound.tolist() == [0, 0, 0, 1]  # why the unsent id is E + 1, not E


def test_unsent_rows_sort_after_every_kept_row():
    """The permute sorts ids ascending and keeps the first num_out_tokens rows."""
    ids = ascend_dispatch.mark_unsent(torch.tensor([[2, -1], [-1, 0], [3, 1]]), 4)
    order = torch.argsort(ids.view(-1), stable=True)
    sent = ascend_dispatch.rows_sent([2, 2])
    assert set(order[:sent].tolist()) == {0, 3, 4, 5}
    assert set(order[sent:].tolist()) == {1, 2}


def test_rows_sent_takes_host_split_arrays():
    assert ascend_dispatch.rows_sent(np.array([3, 0, 2])) == 5
    assert ascend_dispatch.rows_sent(torch.tensor([1, 1])) == 2


def test_pad_rows_appends_zeros_only_when_short():
    tokens = torch.ones(2, 3)
    padded = ascend_dispatch.pad_rows(tokens, 5)
    assert padded.shape == (5, 3) and padded[:2].eq(1).all() and not padded[2:].any()
    assert ascend_dispatch.pad_rows(tokens, 2) is tokens


def test_contiguous_owners():
    assert ascend_dispatch.contiguous_owners(8, 1, 8) is None
    assert ascend_dispatch.contiguous_owners(8, 2, 4).tolist() == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="not 3 EP ranks x 2"):
        ascend_dispatch.contiguous_owners(8, 3, 2)


def test_physical_scores_go_to_the_replica_log2phy_picks_and_nowhere_else():
    """overflow: reroute with EPLB's redundant experts: 3 logical experts on 4 physical slots,
    logical 1 replicated on slots 1 and 3; this rank's log2phy sends it to slot 3, so slot 1
    is never a reroute target (-inf) and slot 3 carries logical 1's score."""
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    log2phy = torch.tensor([0, 3, 2], dtype=torch.int32)
    out = ascend_dispatch.physical_scores(scores, log2phy, 4)
    inf = float("-inf")
    assert torch.equal(out, torch.tensor([[0.5, inf, 0.2, 0.3], [0.1, inf, 0.8, 0.1]]))
    assert ascend_dispatch.physical_scores(scores, None, 3) is scores  # ids are physical
    with pytest.raises(ValueError, match="3 router scores per token for 4 experts"):
        ascend_dispatch.physical_scores(scores, None, 4)
    with pytest.raises(ValueError, match=r"log2phy of shape \(2,\) does not map the 3"):
        ascend_dispatch.physical_scores(scores, log2phy[:2], 4)


def test_a_rerouted_row_never_lands_on_an_unpicked_replica():
    """The planner with such scores: slots 0-1 on rank 0, 2-3 on rank 1; slot 3 is a replica
    of logical 0 that this rank's log2phy ([0, 1, 2]) does not pick. Every token routes
    logical 0 and 1 (slots 0 and 1): rank 0 is over its cap, rank 1 has room, and the
    overflow goes to slot 2 (logical 2, score 0.1), not to slot 3, which a map from physical
    to logical ids would score 0.6 (logical 0: the token's own expert a second time)."""
    from ascend_patch.impls.moe.options import CapacityOptions
    from ascend_patch.impls.moe.planner.capacity import plan_drops

    scores = torch.tensor([[0.6, 0.3, 0.1]] * 4)
    physical = ascend_dispatch.physical_scores(scores, torch.tensor([0, 1, 2]), 4)
    ids = torch.tensor([[0, 1]] * 4)
    weights = torch.tensor([[0.6, 0.3]] * 4)
    options = CapacityOptions(drop_token_ratio=0.25, min_tokens=0, overflow="reroute")
    plan = plan_drops(weights, ids, num_experts=4, ep_size=2, options=options,
                      router_scores=physical)
    moved = ids != plan.topk_ids
    assert int(plan.local_rerouted_rows) == int(moved.sum()) == 2
    # The two second rows drop (keep_top1; ties to the later token) and both go to slot 2.
    assert moved.tolist() == [[False, False], [False, False], [False, True], [False, True]]
    assert plan.topk_ids[moved].tolist() == [2, 2]

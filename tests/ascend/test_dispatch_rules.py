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

"""CUDA Triton route (unit tier, no vLLM): the ids and maps a taken-over Triton layer hands
vLLM's kernel, run through a torch emulation of vLLM's moe_align_block_size (triton_align.py,
written from csrc/moe/moe_align_sum_kernels.cu). vLLM's own CUDA op and Triton kernel never
ran here (no GPU): scripts/gpu_check.py runs the real Triton kernel where one is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ascend_patch.impls.moe.adapters.triton_route import (
    EXPERT_MAP,
    MINUS_ONE,
    UNCHANGED,
    TritonRoute,
    skip_map,
    triton_route,
)
from ascend_patch.lab.triton_align import computed_rows, moe_align_block_size


def _parallel(backend="allgather_reducescatter", use_a2a=False):
    return SimpleNamespace(use_all2all_kernels=use_a2a, all2all_backend=backend)


def test_without_all_to_all_dropped_rows_become_the_sentinel_expert():
    route = triton_route(_parallel(), 8, 0.2)
    assert route.kind == EXPERT_MAP and route.num_experts == 8
    ids = torch.tensor([[3, -1], [-1, 7], [0, 5]], dtype=torch.int32)
    got = route.ids(ids)
    assert got.dtype == torch.int32
    assert got.tolist() == [[3, 8], [8, 7], [0, 5]]
    assert route.kernel_num_experts(8) == 9
    assert route.expert_map(None, torch.device("cpu")).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1]


def test_under_ep_the_layer_map_is_extended_not_replaced():
    layer_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)  # rank 1 of 2
    got = skip_map(layer_map, 8, "cpu")
    assert got.dtype == torch.int32
    assert got.tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, -1]


@pytest.mark.parametrize("backend", ["allgather_reducescatter", "naive"])
def test_all_gather_backends_take_the_expert_map_route(backend):
    assert triton_route(_parallel(backend, use_a2a=True), 8, 0.1).kind == EXPERT_MAP


@pytest.mark.parametrize("backend", ["deepep_high_throughput", "deepep_v2"])
def test_deepep_gets_minus_one_and_the_layer_map_unchanged(backend):
    route = triton_route(_parallel(backend, use_a2a=True), 8, 0.1)
    assert route.kind == MINUS_ONE
    ids = torch.tensor([[3, -1]])
    assert route.ids(ids) is ids
    layer_map = torch.arange(8, dtype=torch.int32)
    assert route.expert_map(layer_map, torch.device("cpu")) is layer_map
    assert route.kernel_num_experts(8) == 8


@pytest.mark.parametrize("backend,why", [
    ("moonep", "maps negative ids to expert 0"),
    ("mori_high_throughput", "not known to leave id -1 rows out"),
    ("pplx", "not known to leave id -1 rows out"),
])
def test_backends_without_a_skipping_path_refuse_dropping(backend, why):
    reason = triton_route(_parallel(backend, use_a2a=True), 8, 0.1)
    assert isinstance(reason, str)
    assert reason.startswith(f"drop_token_ratio > 0 with all2all backend {backend}: ")
    assert why in reason
    unchanged = triton_route(_parallel(backend, use_a2a=True), 8, 0.0)
    assert isinstance(unchanged, TritonRoute) and unchanged.kind == UNCHANGED


def _routing(tokens=64, experts=8, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]
                       ).to(torch.int32)


@pytest.mark.parametrize("ignore_invalid", [True, False], ids=["0.32", "0.23"])
@pytest.mark.parametrize("ep_rank", [None, 0, 1], ids=["no_ep", "ep0", "ep1"])
def test_the_alignment_never_multiplies_a_dropped_row(ignore_invalid, ep_rank):
    """Through the emulated alignment, exactly the kept rows of this rank's experts are
    multiplied; dropped rows in no block (0.32) or only in -1 blocks that write zeros (0.23)."""
    experts, block = 8, 4
    ids = _routing(experts=experts)
    dropped = torch.zeros_like(ids, dtype=torch.bool)
    dropped[::3, 1] = True
    dropped[5, 0] = True
    layer_map = None
    local = torch.ones(experts, dtype=torch.bool)
    if ep_rank is not None:
        local = (torch.arange(experts) // 4) == ep_rank
        layer_map = torch.where(local, torch.arange(experts) % 4, -1).to(torch.int32)
    route = triton_route(_parallel(), experts, 0.3)
    handed = route.ids(ids.masked_fill(dropped, -1))
    emap = route.expert_map(layer_map, torch.device("cpu"))
    num = route.kernel_num_experts(experts)
    sorted_ids, expert_ids, post_pad = moe_align_block_size(handed, block, num, emap,
                                                            ignore_invalid_experts=ignore_invalid)
    got = computed_rows(sorted_ids, expert_ids, post_pad, block, ids.numel())
    want = torch.nonzero((~dropped & local[ids.long()]).reshape(-1)).reshape(-1)
    assert torch.equal(got, want)
    # and every multiplied block's expert is a local expert slot
    live = expert_ids[: int(post_pad[0]) // block]
    assert bool((live[live >= 0] < int(local.sum())).all())


def test_handing_minus_one_to_the_alignment_is_refused():
    """Why the expert-map route exists: id -1 is out of the CUDA op's range."""
    with pytest.raises(ValueError, match="out of moe_align_block_size's range"):
        moe_align_block_size(torch.tensor([[1, -1]]), 4, 8, torch.arange(8, dtype=torch.int32),
                             ignore_invalid_experts=True)


def test_alignment_matches_vllms_documented_example():
    """The example of vLLM's moe_align_block_size docstring (ids 1-based there: experts
    1..4 with num_experts 5 here so they stay in range)."""
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]])
    sorted_ids, expert_ids, post_pad = moe_align_block_size(ids, 4, 5)
    assert int(post_pad[0]) == 16
    assert sorted_ids[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert expert_ids[:4].tolist() == [1, 2, 3, 4]


def test_the_sentinel_never_pushes_the_align_op_past_its_expert_limit():
    """vLLM's align op takes fewer than 1024 experts padded to 32: with 992 experts the
    sentinel (993 -> 1024) would not fit, so dropping is refused there; 991 still fits."""
    assert triton_route(_parallel(), 991, 0.1).kind == EXPERT_MAP
    reason = triton_route(_parallel(), 992, 0.1)
    assert isinstance(reason, str)
    assert reason.startswith("drop_token_ratio > 0 with 992 experts: the sentinel expert would "
                             "take vLLM's align op to 1024 padded experts")
    assert triton_route(_parallel(), 992, 0.0).kind == UNCHANGED

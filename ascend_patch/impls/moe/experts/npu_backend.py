"""Fused MoE with torch_npu's MoE ops (the vllm-ascend pipeline), skipping dropped rows.

    npu_moe_init_routing      sort the (token, slot) rows by expert, gather their inputs
    npu_moe_compute_expert_tokens   cumulative rows per expert -> group_list
    npu_grouped_matmul        gate_up = x @ w13^T per expert group
    npu_swiglu                silu(gate) * up (first half is gate, as in vLLM's w13)
    npu_grouped_matmul        down = h @ w2^T per expert group
    npu_moe_finalize_routing  out[i] = sum_k scales[i, k] * down[dst(i, k)]

Dropped rows and rows of non-local experts get the sentinel expert id E_local. It sorts
after every real expert and group_list only covers experts 0..E_local-1, so the grouped
matmuls never compute those rows; they also get a zero scale in finalize.

The ops are taken from `ops` (default: torch_npu, imported on first use), so the CPU
emulation in tests/moe/npu_emulation.py can stand in for them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from ascend_patch.impls.moe.experts.torch_backend import active_rows


def _torch_npu() -> ModuleType:
    import torch_npu  # only present on Ascend machines (needs CANN)

    return torch_npu


def moe_forward(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    keep: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    *,
    ops: Any = None,
) -> torch.Tensor:
    """Same contract as torch_backend.moe_forward, computed with torch_npu ops."""
    if activation != "silu":
        raise ValueError(f"the npu backend supports activation 'silu' only, not {activation!r}")
    ops = _torch_npu() if ops is None else ops
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_local_experts = w13.shape[0]
    if num_tokens == 0:
        return x.new_zeros(0, hidden)

    local_ids, active = active_rows(topk_ids, keep, expert_map)
    sentinel = torch.full_like(local_ids, num_local_experts)
    routed_ids = torch.where(active, local_ids, sentinel).to(torch.int32)
    weights = topk_weights.masked_fill(~active, 0)
    # row_idx[i, j] = j * T + i: the slot-major source-row numbering that init_routing and
    # finalize_routing both use (what npu_moe_gating_top_k_softmax returns).
    num_rows = num_tokens * top_k
    row_idx = (
        torch.arange(num_rows, dtype=torch.int32, device=x.device)
        .view(top_k, num_tokens)
        .t()
        .contiguous()
    )
    expanded_x, expanded_row_idx, expanded_expert_idx = ops.npu_moe_init_routing(
        x, row_idx=row_idx, expert_idx=routed_ids, active_num=num_tokens
    )
    group_list = ops.npu_moe_compute_expert_tokens(expanded_expert_idx, num_local_experts).to(
        torch.int64
    )

    if apply_router_weight_on_input:
        # Weight each expanded row by its own routing weight: expanded_row_idx maps the
        # slot-major source row to its position in expanded_x.
        sorted_weights = torch.empty(num_rows, dtype=torch.float32, device=x.device)
        sorted_weights[expanded_row_idx.long()] = weights.t().reshape(-1).float()
        expanded_x = (expanded_x.float() * sorted_weights.unsqueeze(1)).to(x.dtype)
        scales = active.to(x.dtype)
    else:
        scales = weights.to(x.dtype)

    gate_up = _grouped_matmul(ops, expanded_x, w13, group_list)
    down = _grouped_matmul(ops, ops.npu_swiglu(gate_up, dim=-1), w2, group_list)
    # Rows past the last group are not computed: their content is unspecified and a zero
    # scale times garbage can still be NaN, so clear them (no host sync needed).
    computed = torch.arange(down.shape[0], device=x.device) < group_list[-1]
    down = torch.where(
        computed.unsqueeze(1), down, torch.zeros((), dtype=down.dtype, device=x.device)
    )
    return ops.npu_moe_finalize_routing(
        down,
        skip1=None,
        skip2=None,
        bias=None,
        scales=scales,
        expanded_src_to_dst_row=expanded_row_idx,
        # Only used to index `bias`, which is None; vllm-ascend passes the global ids too.
        export_for_source_row=topk_ids.to(torch.int32),
    )


def _grouped_matmul(ops: Any, rows: torch.Tensor, weight: torch.Tensor, group_list: torch.Tensor):
    """rows of group g times weight[g]^T; group_list holds cumulative row counts (type 0)."""
    return ops.npu_grouped_matmul(
        [rows], [weight.transpose(1, 2)], group_list=group_list, split_item=2, group_type=0,
        group_list_type=0,
    )[0]

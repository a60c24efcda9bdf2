"""CPU reference emulation of the torch_npu MoE ops used by the npu backend (test only).

Each function follows the documented semantics of the op of the same name (torch_npu API
reference, e.g. https://www.hiascend.com/document/detail/zh/Pytorch/60RC3/apiref/apilist/
ptaoplist_000780.html for npu_moe_init_routing) and checks the argument contracts the docs state (dtypes,
shapes, monotone group_list), so a backend that would be rejected on an NPU fails here
too. Where the docs leave an output unspecified (grouped_matmul rows past the last group)
the emulation writes NaN, so a caller that relies on those rows is caught.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


def npu_moe_init_routing(x, row_idx, expert_idx, active_num):
    """(expanded_x, expanded_row_idx, expanded_expert_idx).

    expanded_expert_idx, sorted_row_idx = stable key-value sort(expert_idx, row_idx);
    expanded_row_idx[sorted_row_idx[i]] = i; expanded_x[i] = x[sorted_row_idx[i] % N].
    """
    assert x.dim() == 2 and expert_idx.dim() == 2
    assert row_idx.dtype == torch.int32 and expert_idx.dtype == torch.int32
    assert row_idx.shape == expert_idx.shape and expert_idx.shape[0] == x.shape[0]
    num_rows, top_k = expert_idx.shape
    expanded_expert_idx, order = torch.sort(expert_idx.reshape(-1), stable=True)
    sorted_row_idx = row_idx.reshape(-1)[order].long()
    expanded_row_idx = torch.empty_like(sorted_row_idx)
    expanded_row_idx[sorted_row_idx] = torch.arange(sorted_row_idx.numel())
    active = min(active_num, num_rows) * top_k
    expanded_x = x[sorted_row_idx[:active] % num_rows]
    return expanded_x, expanded_row_idx.to(torch.int32), expanded_expert_idx


def npu_moe_compute_expert_tokens(sorted_expert_for_source_row, num_expert):
    """For each expert e < num_expert, the end (exclusive) of its rows: a binary search."""
    assert sorted_expert_for_source_row.dim() == 1
    assert sorted_expert_for_source_row.dtype == torch.int32
    experts = torch.arange(num_expert, dtype=torch.int32)
    return torch.searchsorted(sorted_expert_for_source_row, experts, right=True).to(torch.int32)


def npu_grouped_matmul(
    x,
    weight,
    *,
    bias=None,
    group_list=None,
    split_item=0,
    group_type=None,
    group_list_type=0,
    output_dtype=None,
    **unsupported,
):
    """m-axis grouped matmul: y[rows of group g] = x[rows of group g] @ weight[g].

    Only the single-tensor form used by MoE is emulated (split_item 2/3, group_type 0).
    """
    assert not unsupported, f"not emulated: {sorted(unsupported)}"
    assert bias is None and len(x) == 1 and len(weight) == 1
    assert split_item in (2, 3) and group_type == 0
    (inputs,), (weights,) = x, weight
    assert inputs.dim() == 2 and weights.dim() == 3 and inputs.shape[1] == weights.shape[1]
    assert group_list.dtype == torch.int64 and group_list.numel() == weights.shape[0]
    if group_list_type == 0:
        ends = group_list
        assert bool((ends[1:] >= ends[:-1]).all()), "group_list must be non-decreasing"
    elif group_list_type == 1:
        ends = torch.cumsum(group_list, 0)
    else:
        raise AssertionError(f"group_list_type {group_list_type} not emulated")
    assert int(ends[-1]) <= inputs.shape[0]
    dtype = output_dtype or inputs.dtype
    out = torch.full((inputs.shape[0], weights.shape[2]), float("nan"), dtype=dtype)
    start = 0
    for group, end in enumerate(ends.tolist()):
        block = inputs[start:end].float() @ weights[group].float()
        out[start:end] = block.to(dtype)
        start = end
    return [out]


def npu_swiglu(x, dim=-1):
    """silu(first half) * second half along dim."""
    gate, up = torch.chunk(x, 2, dim=dim)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def npu_moe_finalize_routing(
    expanded_permuted_rows,
    skip1,
    skip2,
    bias,
    scales,
    expanded_src_to_dst_row,
    export_for_source_row,
    drop_pad_mode=0,
):
    """out[i] = skip1 + skip2 + sum_k scales[i,k] * (rows[dst[i + k*N]] + bias[expert[i,k]])."""
    assert drop_pad_mode == 0
    assert expanded_src_to_dst_row.dtype == torch.int32
    assert scales.dtype == expanded_permuted_rows.dtype
    num_rows, top_k = scales.shape
    dst = expanded_src_to_dst_row.long().view(top_k, num_rows)  # [k, N]: index i + k*N
    gathered = expanded_permuted_rows.float()[dst]  # [k, N, H]
    if bias is not None:
        gathered = gathered + bias.float()[export_for_source_row.long().t()]
    out = (scales.float().t().unsqueeze(2) * gathered).sum(dim=0)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(expanded_permuted_rows.dtype)


def make_ops() -> SimpleNamespace:
    """A namespace with the same attribute names as torch_npu."""
    return SimpleNamespace(
        npu_moe_init_routing=npu_moe_init_routing,
        npu_moe_compute_expert_tokens=npu_moe_compute_expert_tokens,
        npu_grouped_matmul=npu_grouped_matmul,
        npu_swiglu=npu_swiglu,
        npu_moe_finalize_routing=npu_moe_finalize_routing,
    )

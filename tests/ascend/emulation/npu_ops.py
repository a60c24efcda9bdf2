"""CPU emulations of the NPU ops vllm-ascend's MoE dispatchers call (test only; the quantized
ones' formulas are in quant_ops.py).

Each follows the documented formula of its op and refuses what the documentation does not
allow, so that a caller relying on unspecified behaviour fails here rather than on an NPU:

* npu_moe_token_permute / npu_moe_token_unpermute: CANN aclnnMoeTokenPermute /
  aclnnMoeTokenUnpermute. sorted_indices = argsort(argsort(flatten(indices))) (the position of
  each source row in the sorted order, int32, always [N * k]); permuted[sorted_indices[i]] =
  tokens[i // k] for the first num_out_tokens sorted rows, num_out_tokens 0 meaning all of
  them; indices must be >= 0. Unpermute: out[t] = sum_j permuted[S[t*k + j]] * probs[t, j];
  an index past the permuted rows raises (the docs define no such read).
* npu_moe_init_routing_custom (torch.ops._C_ascend): vllm-ascend's own numpy golden
  (tests/e2e/nightly/single_node/ops/singlecard_ops/test_moe_init_routing_custom.py,
  drop_pad_mode 0, row_idx_type 0, unquantized): rows whose expert is outside
  active_expert_range get expanded_row_idx -1 and are not gathered; the output has
  min(N * k, active_num) rows (csrc/torch_binding_meta.cpp:453-520), the tail past the active
  rows is unspecified: NaN here.
* npu_grouped_matmul (split_item 2, group_type 0): rows of group g times weight[g]; rows past
  the last group are unspecified: NaN here.
  With quant_mode 1 the gathered rows are quantized per row (the golden's dynamic quant) and
  their scales returned; with a `scale` and quant_mode -1 each gathered row's scale comes
  with it. Tails past the active rows: int8 -128 / NaN scales.
* npu_grouped_matmul with scale and per_token_scale: quant_ops.grouped_matmul_quant.
* npu_dynamic_quant, npu_dequant_swiglu_quant: quant_ops.
* npu_swiglu: silu(first half) * second half (what vllm-ascend's AscendSiluAndMul relies on).
* histc on integer input (the NPU accepts it, CPU torch does not): counted as float, returned
  in the input's dtype.
"""

from __future__ import annotations

import quant_ops  # the emulation folder is on sys.path (boot.py)
import torch
import torch.nn.functional as F


def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
    assert not padded_mode, "padded_mode is not supported by the op"
    assert tokens.dim() == 2, f"tokens must be 2-D, got {tuple(tokens.shape)}"
    assert indices.dtype in (torch.int32, torch.int64), f"indices dtype {indices.dtype}"
    assert indices.dim() in (1, 2) and indices.shape[0] == tokens.shape[0]
    top_k = indices.shape[1] if indices.dim() == 2 else 1
    flat = indices.reshape(-1).long()
    assert flat.numel() == 0 or int(flat.min()) >= 0, "indices must be >= 0"
    first = torch.argsort(flat, stable=True)
    sorted_indices = torch.argsort(first, stable=True)
    rows = flat.numel() if not num_out_tokens else int(num_out_tokens)
    assert 0 <= rows <= flat.numel(), f"num_out_tokens {num_out_tokens} for {flat.numel()} rows"
    permuted = tokens.new_empty((rows, tokens.shape[1]))
    taken = first[:rows]
    permuted[:] = tokens[torch.div(taken, top_k, rounding_mode="floor")]
    return permuted, sorted_indices.to(torch.int32)


def npu_moe_token_unpermute(
    permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None
):
    assert not padded_mode, "padded_mode is not supported by the op"
    assert sorted_indices.dtype == torch.int32, f"sorted_indices dtype {sorted_indices.dtype}"
    top_k = probs.shape[1] if probs is not None else 1
    index = sorted_indices.long()
    assert index.numel() % top_k == 0
    if index.numel():
        low, high = int(index.min()), int(index.max())
        assert 0 <= low and high < permuted_tokens.shape[0], (
            f"sorted_indices reach row {high} (min {low}) of {permuted_tokens.shape[0]} "
            "permuted rows: undefined on the NPU"
        )
    rows = permuted_tokens[index].float().view(-1, top_k, permuted_tokens.shape[-1])
    if probs is not None:
        rows = rows * probs.float().unsqueeze(-1)
    out = rows.sum(dim=1).to(permuted_tokens.dtype)
    if restore_shape is not None:
        assert tuple(out.shape) == tuple(restore_shape), (tuple(out.shape), restore_shape)
    return out


def npu_moe_init_routing_custom(
    x,
    expert_idx,
    *,
    scale=None,
    offset=None,
    active_num=-1,
    expert_capacity=-1,
    expert_num=-1,
    drop_pad_mode=0,
    expert_tokens_num_type=0,
    expert_tokens_num_flag=False,
    quant_mode=0,
    active_expert_range=(),
    row_idx_type=0,
):
    assert drop_pad_mode == 0 and row_idx_type == 0 and quant_mode in (-1, 1), "only MoE's"
    assert offset is None and expert_tokens_num_type == 1
    assert scale is None or (quant_mode == -1 and scale.shape == x.shape[:1]), "scale"
    assert x.dim() == 2 and expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0]
    start, end = list(active_expert_range) or [0, expert_num]
    top_k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1).long()
    active = (flat >= start) & (flat < end)
    # Below the range sorts last (the golden's INT32_MAX); above it stays and is cut off.
    key = torch.where(flat < start, torch.full_like(flat, torch.iinfo(torch.int32).max), flat)
    order = torch.argsort(key, stable=True)
    actual = int(active.sum())
    expanded_row_idx = torch.full_like(flat, -1)
    expanded_row_idx[order[:actual]] = torch.arange(actual)
    rows = min(flat.numel(), active_num) if active_num > 0 else flat.numel()
    expanded_x = torch.full((rows, x.shape[1]), float("nan"), dtype=x.dtype)
    used = min(rows, actual)
    expanded_x[:used] = x[torch.div(order[:used], top_k, rounding_mode="floor")]
    counts = torch.bincount(flat[active] - start, minlength=end - start)
    tokens = counts if expert_tokens_num_flag else torch.zeros(1, dtype=torch.int64)
    expanded_scale = None
    if scale is not None:  # gathered with its row (the golden's quant_mode -1 with scale)
        expanded_scale = torch.full((rows,), float("nan"), dtype=scale.dtype)
        expanded_scale[:used] = scale[torch.div(order[:used], top_k, rounding_mode="floor")]
    if quant_mode == 1:  # the golden's dynamic quant of the gathered rows
        gathered = expanded_x
        expanded_x = torch.full((rows, x.shape[1]), -128, dtype=torch.int8)
        expanded_scale = torch.full((rows,), float("nan"), dtype=torch.float32)
        expanded_x[:used], expanded_scale[:used] = quant_ops.dynamic_quant(gathered[:used])
    return expanded_x, expanded_row_idx.to(torch.int32), tokens.to(torch.int64), expanded_scale


def npu_grouped_matmul(
    x,
    weight,
    *,
    bias=None,
    split_item=0,
    group_list_type=0,
    group_type=None,
    group_list=None,
    output_dtype=None,
    scale=None,
    per_token_scale=None,
    **unsupported,
):
    assert not unsupported, f"not emulated: {sorted(unsupported)}"
    assert len(x) == 1 and len(weight) == 1
    assert split_item in (2, 3) and group_type == 0
    (inputs,), (weights,) = x, weight
    if scale is not None or per_token_scale is not None:
        assert split_item == 2 and len(scale) == 1 and len(per_token_scale) == 1
        assert bias is None or len(bias) == 1
        return [quant_ops.grouped_matmul_quant(
            inputs, weights, scale=scale[0], bias=None if bias is None else bias[0],
            per_token_scale=per_token_scale[0], group_list=group_list,
            group_list_type=group_list_type, output_dtype=output_dtype)]
    assert bias is None
    assert inputs.dim() == 2 and weights.dim() == 3 and inputs.shape[1] == weights.shape[1]
    assert group_list is not None and group_list.numel() == weights.shape[0]
    counts = group_list.long()
    ends = counts.cumsum(0) if group_list_type == 1 else counts
    assert group_list_type in (0, 1) and bool((ends[1:] >= ends[:-1]).all())
    assert int(ends[-1]) <= inputs.shape[0], "group_list covers more rows than x has"
    dtype = output_dtype or inputs.dtype
    integer = inputs.dtype == torch.int8
    if integer:  # int8 x int8 -> int32 accumulators (W8A8's unfused MC2 gate-up)
        assert weights.dtype == torch.int8 and dtype == torch.int32 and split_item == 3
    out = torch.full((inputs.shape[0], weights.shape[2]), 0 if integer else float("nan"),
                     dtype=dtype)
    start = 0
    for group, end in enumerate(ends.tolist()):
        rows, weight = inputs[start:end], weights[group]
        out[start:end] = (quant_ops.int_matmul(rows, weight) if integer
                          else rows.float() @ weight.float()).to(dtype)
        start = end
    return [out]


def npu_dynamic_quant(x, smooth_scales=None, group_index=None, dst_type=torch.int8):
    return quant_ops.dynamic_quant(x, smooth_scales, group_index, dst_type)


def npu_grouped_matmul_swiglu_quant(*, x, weight, group_list, weight_scale, x_scale,
                                    bias=None, offset=None):
    """aclnnGroupedMatmulSwigluQuant, the op vllm-ascend 0.18.0's W8A8 MLP calls
    (device/device_op.py:112-131 there): the same contract as the weight-NZ custom op
    0.23.0.post1 calls (int8 x and weight, per-channel weight and per-token x scales, group
    ends as a cumsum; int8 output, per-row scale)."""
    return quant_ops.gmm_swiglu_quant(x, weight, weight_scale, x_scale, group_list, bias=bias,
                                      offset=offset)


def npu_dequant_swiglu_quant(x, **kwargs):
    return quant_ops.dequant_swiglu_quant(x, **kwargs)


def npu_swiglu(x, dim=-1):
    gate, up = x.chunk(2, dim=dim)
    return F.silu(gate) * up


def int_histc(original):
    """torch.histc that also takes integer input, in the input's dtype (as on the NPU)."""

    def histc(input, bins=100, min=0, max=0, *, out=None):  # noqa: A002 - torch's names
        if input.is_floating_point():
            return original(input, bins=bins, min=min, max=max, out=out)
        counts = original(input.float(), bins=bins, min=min, max=max)
        return counts.to(input.dtype)

    return histc

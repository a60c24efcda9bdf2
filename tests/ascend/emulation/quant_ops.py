"""CPU emulations of the quantized NPU ops vllm-ascend's W8A8 / W4A8 MoE path calls (test only).

Shared by every vllm-ascend release's contract run (the ops are torch_npu's and CANN's, not a
release's). Each follows the documented formula and refuses what the documentation does not
allow, so a caller relying on unspecified behaviour fails here rather than on an NPU. Sources:

* dynamic_quant: CANN aclnnDynamicQuant (ops-nn 9.1.0 quant/dynamic_quant/docs): per row
  scale = row_max(|x|) / 127, y = round(x / scale) int8, scale float32 of shape x.shape[:-1];
  x FLOAT16 / BFLOAT16, 2-8 dims, "supports empty Tensor". A row of zeros (0 / 0, not defined
  by the formula) quantizes to zeros with scale 0 here. Rounding: torch.round, as every
  vllm-ascend golden (tests/e2e/nightly/single_node/ops/singlecard_ops/*) compares with.
* gmm_swiglu_quant (torch.ops._C_ascend.grouped_matmul_swiglu_quant_weight_nz, schema
  csrc/torch_binding.cpp:2357; aclnnGroupedMatmulSwigluQuantWeightNZ): vllm-ascend's golden
  (test_gmm_swiglu_quant_weight_nz_tensor_list.py: process_groups / gmm_swiglu_quant): per
  group g of the cumsum group_list, d = (x @ w[g]) int32 * weight_scale[g] * x_scale,
  a = silu(d[:, :N/2]) * d[:, N/2:], then per-row quant with 127 / max|a|. x int8 [M, K];
  the NZ weight is taken in its logical [E, K, N] int8 layout (format casts are not emulated);
  weight_scale float32 [E, N]; x_scale float32 [M]; group_list int64 [E]. Rows past the last
  group are unspecified: int8 -128 and scale NaN here, so any later use shows. An empty x
  (M = 0) is not documented: refused.
* grouped_matmul_quant (torch_npu.npu_grouped_matmul with per_token_scale; torch_npu
  npu_grouped_matmul docs, "per-token quantization" table): A8W8: y = (x @ w[g]) int32 *
  scale[g] * per_token_scale, x int8, weight int8 [E, K, N], scale float32 / bfloat16 [E, N],
  per_token_scale float32 [M], output bfloat16 / float16. A8W4 (W4A8): weight int32 [E, K,
  N / 8] holding eight int4 per int32 (low nibble first, vllm-ascend's pack_int4_to_int8 then
  view(int32)), scale int64 whose low 32 bits are the float32 bits (w4a8.py process_scale),
  [E, N] per channel or [E, K / G, N] per group, bias float32 [E, N] (the offset correction
  vllm-ascend computes at load); vllm-ascend's golden (test_grouped_matmul_swiglu_quant.py:
  gmm_swiglu_quant_golden_a8_w4 / custom_mm): x split into high and low nibbles
  (x_hi = floor(x / 16), x_lo = (x & 0x0F) - 8), y = ((16 * x_hi @ w + x_lo @ w) per-group
  scaled + bias[g]) * per_token_scale. Rows past the last group: NaN. Empty x: refused.
* dequant_swiglu_quant (torch_npu / torch.ops._C_ascend npu_dequant_swiglu_quant, schema
  csrc/torch_binding.cpp:2882; W8A8's unfused MC2 MLP, moe_mlp.py:188-200): torch_npu docs
  (ptaoplist "npu_dequant_swiglu_quant"): x int32 [T, 2H] (T >= 0: empty allowed),
  weight_scale float32 [G, 2H], activation_scale float32 [T], group_index int64 [G] token
  counts, activate_left, quant_mode 1 (dynamic); vllm-ascend's reference
  (test_dequant_swiglu_quant.py: _shared_dequant_swiglu_quant): d = x * weight_scale[g] *
  activation_scale, a = silu(left) * right taken to bf16, then dynamic quant. Rows past the
  groups: -128 / NaN.
* swiglu: silu(first half) * second half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLOAT_ACTIVATIONS = (torch.float16, torch.bfloat16)
_UNSPECIFIED_INT8 = -128


def dynamic_quant(x, smooth_scales=None, group_index=None, dst_type=torch.int8):
    assert smooth_scales is None and group_index is None, "smooth quant is not emulated"
    assert dst_type == torch.int8, f"dst_type {dst_type} is not emulated"
    assert x.dtype in _FLOAT_ACTIVATIONS, f"aclnnDynamicQuant takes fp16/bf16 x, got {x.dtype}"
    assert 2 <= x.dim() <= 8, f"aclnnDynamicQuant takes 2-8 dims, got {tuple(x.shape)}"
    return _per_row_int8(x.float())


def _per_row_int8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = values.abs().amax(dim=-1) / 127 if values.shape[-1] else values.new_zeros(
        values.shape[:-1])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quant = torch.round(values / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return quant, scale.to(torch.float32)


def gmm_swiglu_quant(x, weight, weight_scale, x_scale, group_list, *, bias=None, offset=None,
                     swiglu_limit=0.0):
    assert bias is None and offset is None and swiglu_limit == 0.0, "not emulated"
    assert x.dtype == torch.int8 and x.dim() == 2, f"x must be int8 [M, K], got {x.dtype}"
    assert x.shape[0] > 0, "empty x: not documented for GroupedMatmulSwigluQuantWeightNZ"
    assert weight.dtype == torch.int8 and weight.dim() == 3 and weight.shape[1] == x.shape[1]
    experts, _, width = weight.shape
    assert width % 2 == 0
    assert weight_scale.dtype == torch.float32 and tuple(weight_scale.shape) == (experts, width)
    assert x_scale.dtype == torch.float32 and tuple(x_scale.shape) == (x.shape[0],)
    ends = _group_ends(group_list, 0, experts, x.shape[0])
    out = torch.full((x.shape[0], width // 2), _UNSPECIFIED_INT8, dtype=torch.int8)
    out_scale = torch.full((x.shape[0],), float("nan"), dtype=torch.float32)
    for group, (start, end) in enumerate(ends):
        if end > start:
            acc = int_matmul(x[start:end], weight[group]).float()
            dequant = acc * weight_scale[group] * x_scale[start:end].unsqueeze(-1)
            out[start:end], out_scale[start:end] = _per_row_int8(swiglu(dequant))
    return out, out_scale, torch.empty((), dtype=torch.float32)


def grouped_matmul_quant(inputs, weights, *, scale, bias, per_token_scale, group_list,
                         group_list_type, output_dtype):
    assert inputs.dtype == torch.int8 and inputs.dim() == 2, f"x {inputs.dtype}"
    assert inputs.shape[0] > 0, "empty x: not documented for quantized GroupedMatmul"
    assert output_dtype in _FLOAT_ACTIVATIONS, f"output_dtype {output_dtype}"
    assert per_token_scale.dtype == torch.float32
    assert tuple(per_token_scale.shape) == (inputs.shape[0],)
    experts = weights.shape[0]
    ends = _group_ends(group_list, group_list_type, experts, inputs.shape[0])
    if weights.dtype == torch.int8:
        assert bias is None, "A8W8 per-token: bias not emulated"
        assert scale.dtype in (torch.float32, torch.bfloat16)
        assert tuple(scale.shape) == (experts, weights.shape[2])
        dequant = _a8w8
    else:
        assert weights.dtype == torch.int32, f"weight dtype {weights.dtype}"
        assert scale.dtype == torch.int64 and bias is not None and bias.dtype == torch.float32
        dequant = _a8w4
    width = scale.shape[-1]
    out = torch.full((inputs.shape[0], width), float("nan"), dtype=output_dtype)
    for group, (start, end) in enumerate(ends):
        if end > start:
            rows = dequant(inputs[start:end], weights[group], scale[group],
                           None if bias is None else bias[group])
            out[start:end] = (rows * per_token_scale[start:end].unsqueeze(-1)).to(output_dtype)
    return out


def _a8w8(x, weight, scale, bias):
    return int_matmul(x, weight).float() * scale.float()


def _a8w4(x, packed, scale, bias):
    weight = unpack_int4(packed)
    assert weight.shape[0] == x.shape[1]
    scale = int64_scale_to_float(scale)
    if scale.dim() == 1:
        scale = scale.unsqueeze(0)
    groups = scale.shape[0]
    assert weight.shape[0] % groups == 0
    high = torch.div(x, 16, rounding_mode="floor")
    low = torch.bitwise_and(x, 0x0F) - 8
    acc = torch.zeros((x.shape[0], weight.shape[1]), dtype=torch.float32)
    for part, rows in zip(range(groups), weight.chunk(groups, dim=0)):
        cols = slice(part * rows.shape[0], (part + 1) * rows.shape[0])
        mixed = 16 * int_matmul(high[:, cols], rows) + int_matmul(low[:, cols], rows)
        acc += mixed.float() * scale[part]
    return acc + bias


def dequant_swiglu_quant(x, *, weight_scale=None, activation_scale=None, bias=None,
                         quant_scale=None, quant_offset=None, group_index=None,
                         activate_left=True, quant_mode=0, swiglu_mode=0, clamp_limit=0.0,
                         glu_alpha=1.0, glu_bias=0.0):
    assert bias is None and quant_scale is None and quant_offset is None, "not emulated"
    assert quant_mode == 1 and swiglu_mode == 0 and clamp_limit == 0.0, "only dynamic quant"
    assert glu_alpha == 1.0 and glu_bias == 0.0
    assert x.dtype == torch.int32 and x.dim() == 2 and x.shape[1] % 2 == 0, f"x {x.dtype}"
    assert weight_scale is not None and activation_scale is not None, "int32 x needs both"
    assert weight_scale.dtype == torch.float32 and activation_scale.dtype == torch.float32
    assert tuple(activation_scale.shape) == (x.shape[0],)
    groups = weight_scale.shape[0] if weight_scale.dim() == 2 else 1
    weight_scale = weight_scale.reshape(groups, x.shape[1])
    if group_index is None:
        assert groups == 1
        group_index = torch.tensor([x.shape[0]], dtype=torch.int64)
    ends = _group_ends(group_index, 1, groups, x.shape[0])
    out = torch.full((x.shape[0], x.shape[1] // 2), _UNSPECIFIED_INT8, dtype=torch.int8)
    out_scale = torch.full((x.shape[0],), float("nan"), dtype=torch.float32)
    for group, (start, end) in enumerate(ends):
        if end > start:
            dequant = (x[start:end].float() * weight_scale[group]
                       * activation_scale[start:end].unsqueeze(-1))
            left, right = dequant.chunk(2, dim=-1)
            act = F.silu(left) * right if activate_left else left * F.silu(right)
            out[start:end], out_scale[start:end] = dynamic_quant(act.to(torch.bfloat16))
    return out, out_scale


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., N / 8] -> int8 [..., N] in [-8, 7], low nibble first."""
    nibbles = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    low = torch.bitwise_and(nibbles, 0x0F).to(torch.int16)
    high = torch.bitwise_right_shift(nibbles, 4).to(torch.int16)
    both = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(both > 7, both - 16, both).to(torch.int8)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 [..., N] in [-8, 7] -> int32 [..., N / 8]: vllm-ascend's pack_int4_to_int8
    (w4a8.py) then view(torch.int32)."""
    assert values.shape[-1] % 8 == 0 and int(values.min()) >= -8 and int(values.max()) <= 7
    pairs = values.reshape(*values.shape[:-1], -1, 2).to(torch.int16)
    byte = torch.bitwise_or(torch.bitwise_left_shift(pairs[..., 1], 4),
                            torch.bitwise_and(pairs[..., 0], 0x0F))
    return byte.to(torch.uint8).view(torch.int8).contiguous().view(torch.int32)


def int64_scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    assert scale.dtype == torch.int64
    return torch.bitwise_and(scale, 0xFFFFFFFF).to(torch.int32).view(torch.float32)


def float_scale_to_int64(scale: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 holding its bits in the low half (w4a8.py process_scale)."""
    return scale.to(torch.float32).contiguous().view(torch.int32).to(torch.int64).bitwise_and(
        0xFFFFFFFF)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def int_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Exact: int8 products summed in int64 (the NPU accumulates in int32; K is small here).
    return x.to(torch.int64) @ weight.to(torch.int64)


def _group_ends(group_list, group_list_type, experts, rows) -> list[tuple[int, int]]:
    assert group_list.dtype == torch.int64, f"group_list dtype {group_list.dtype}"
    assert group_list.dim() == 1 and group_list.numel() == experts, (
        f"group_list {tuple(group_list.shape)} for {experts} experts")
    assert group_list_type in (0, 1), f"group_list_type {group_list_type}"
    counts = group_list.long()
    assert group_list_type == 0 or bool((counts >= 0).all())
    ends = counts.cumsum(0) if group_list_type == 1 else counts
    assert bool((ends[1:] >= ends[:-1]).all()) and int(ends[0]) >= 0
    assert int(ends[-1]) <= rows, "group_list covers more rows than x has"
    starts = [0, *ends[:-1].tolist()]
    return list(zip(starts, ends.tolist()))

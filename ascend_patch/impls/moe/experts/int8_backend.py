"""W8A8 int8 fused MoE in plain torch: the arithmetic of vLLM's CPU int8 kernel, kept rows only.

vLLM 0.32's `CPUExpertsInt8` runs `fused_experts_cpu(..., INT8_W8A8, ...)`
(csrc/cpu/sgl-kernels/moe_int8.cpp, `fused_experts_int8_kernel_impl`): int8 weights with a
float32 scale per output channel, activations quantised per row on the fly. Per computed
(token, expert) row it does, and so does `moe_forward_int8`:

  1. quantise the token's activations: amax = max(|x|, 1e-7), scale = amax / 127,
     q = round(x * 127 / amax) (symmetric, per token);
  2. gate_up = int32(q . w13[e]) * scale * w13_scale[e]   (float32);
  3. h = silu(gate) * up, rounded to the activations' dtype (the kernel's ic1 buffer);
  4. quantise h per row as in 1; down = int32(hq . w2[e]) * h_scale * w2_scale[e];
  5. row = down * router weight, rounded to the activations' dtype (its ic2 buffer);
  6. out[token] = sum over the token's top-k slots, in slot order, in float32.

The integer products are exact here too (float64 matmuls of int8 values: every partial sum is
an integer far below 2^53), so only two things differ from the kernel: its silu uses an
approximate reciprocal (`_mm512_rcp14_silu_ps`, relative error under 2^-14) and its
rounding of x * 127 / amax is the vector unit's (round half to even, as torch.round). A
rounding flip in step 3 can move one quantised value by one step; the contract test
(tests/moe/test_int8_cpu_experts.py) measures the result against the real kernel.

Unlike the kernel, a row with id -1 (dropped) or whose expert lives on another EP rank
(expert_map) is neither quantised nor multiplied: the kernel refuses id -1 outright
(`moe_align_block_size` checks that every row lands in a block) and ignores expert_map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ascend_patch.impls.moe.experts.torch_backend import active_rows

_EPS = 1e-7


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int values as float64 [n, K], float32 scale [n, 1]): symmetric per-row int8."""
    values = x.float()
    amax = values.abs().amax(dim=1, keepdim=True).clamp(min=_EPS)
    q = torch.round(values * (127.0 / amax))
    return q.double(), amax / 127.0


def _dequant_mm(
    q: torch.Tensor, q_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """float32 [n, N] = int32(q . weight^T) * q_scale * weight_scale, as the kernel scales."""
    acc = torch.mm(q, weight.double().t()).float()
    return acc * q_scale * weight_scale.unsqueeze(0)


def moe_forward_int8(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    keep: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [T, H] in x.dtype: the int8 experts of the computed rows, weighted and summed.

    x [T, H]; w13 int8 [E_local, 2I, H]; w2 int8 [E_local, H, I]; w13_scale [E_local, 2I]
    and w2_scale [E_local, H] float (a trailing 1 is accepted: compressed-tensors keeps
    [E, N, 1]); topk_* [T, k]; keep bool [T, k] (None: every row). Silu-and-mul only.
    """
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    if num_tokens == 0:
        return x.new_zeros(num_tokens, hidden)
    w13_scale = w13_scale.reshape(w13.shape[0], -1).float()
    w2_scale = w2_scale.reshape(w2.shape[0], -1).float()
    intermediate = w13.shape[1] // 2
    local_ids, active = active_rows(topk_ids, keep, expert_map)
    rows = torch.nonzero(active.reshape(-1)).squeeze(1)
    # The kernel's ic2: one row per (token, slot), zero where nothing was computed.
    slots = torch.zeros(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    if rows.numel():
        row_experts = local_ids.reshape(-1)[rows]
        tokens = torch.div(rows, top_k, rounding_mode="floor")
        weights = topk_weights.reshape(-1)[rows].float().unsqueeze(1)
        for expert in torch.unique(row_experts).tolist():
            mine = row_experts == expert
            q, scale = quantize_rows(x.index_select(0, tokens[mine]))
            gate_up = _dequant_mm(q, scale, w13[expert], w13_scale[expert])
            h = (F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]).to(x.dtype)
            hq, h_scale = quantize_rows(h)
            down = _dequant_mm(hq, h_scale, w2[expert], w2_scale[expert])
            slots[rows[mine]] = (down * weights[mine]).to(x.dtype)
    slots = slots.view(num_tokens, top_k, hidden)
    out = slots[:, 0].float()
    for slot in range(1, top_k):
        out += slots[:, slot].float()
    return out.to(x.dtype)

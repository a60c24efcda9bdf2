"""Fused MoE in plain torch: per-expert matmuls on contiguous row blocks, any device.

Only rows that are kept and whose expert is local are gathered, so dropped rows cost
nothing. The rows are sorted by expert once and gathered once; each non-empty expert then
runs one gate_up matmul and one down matmul in the weights' dtype (bf16 stays bf16) into
re-used buffers, and the weighted results are accumulated per token in float32. On a CPU
without native bf16 (AVX2; AVX-512 without BF16) the looped path computes bf16 layers in
float32 instead (rows and each expert's weights cast into float32 scratch): there a bf16
matmul takes several times as long as the float32 one plus the casts.

On CPU the scratch buffers persist between calls (per thread): a fresh multi-megabyte
tensor costs page faults on every call, a measurable share of a prefill MoE layer on this
machine (see scripts/bench_vs_native.py). Other devices have caching allocators and
allocate per call.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GATED_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
}


def gated_activation(name: str):
    """act(gate) * up for vLLM's w13 layout, where rows [0:I] are gate and [I:2I] up."""
    try:
        return _GATED_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported MoE activation {name!r} (supported: {sorted(_GATED_ACTIVATIONS)})"
        ) from None


def active_rows(
    topk_ids: torch.Tensor, keep: torch.Tensor | None, expert_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local expert id [T, k], bool [T, k] row is computed here). A row is computed when its
    id is >= 0 (-1: dropped), keep allows it, and its expert is local.

    expert_map follows vLLM: global id -> local id, -1 where the expert lives elsewhere.
    """
    active = topk_ids >= 0
    if expert_map is None:
        local_ids = topk_ids.long()
    else:
        # -1 must not index expert_map from the end.
        local_ids = expert_map[topk_ids.clamp(min=0).long()].long()
        active &= local_ids >= 0
    if keep is not None:
        active &= keep
    return local_ids, active


@dataclass
class _ExpertRows:
    """The computed rows of one call, sorted by local expert."""

    tokens: torch.Tensor  # [rows] source token of each row
    experts: torch.Tensor  # [rows] local expert, non-decreasing
    block_sizes: torch.Tensor  # [E_local] rows per expert
    sizes: list[int]  # the same, on the host
    # The router weight scales either the expert's input or its output, never both.
    input_weights: torch.Tensor | None  # float32 [rows, 1]
    output_weights: torch.Tensor | None  # float32 [rows, 1]


# The batched path pads every local expert to the largest block. It saves the per-expert
# op overhead that dominates small blocks (decode), and wastes compute on padding, so it
# is taken only for small blocks with at most this factor of padded to real rows.
_BATCHED_MAX_BLOCK = 64
_MAX_PADDING_FACTOR = 2


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
    batched: bool | None = None,
) -> torch.Tensor:
    """out [T, H] in x.dtype = sum over computed rows of weight * expert(x[token]).

    x [T, H]; w13 [E_local, 2I, H]; w2 [E_local, H, I]; topk_* [T, k]; keep bool [T, k]
    (None = all rows). With apply_router_weight_on_input the weight scales the expert's
    input instead of its output (vLLM's convention for top-1 models).

    Two ways to run the experts, same result: one matmul pair per non-empty expert
    (`batched=False`, any batch), or one bmm pair over all local experts with their rows
    padded to the largest block (`batched=True`: a handful of ops instead of ~8 per
    expert, which is what small batches pay for). None picks the batched one for blocks of
    at most 64 rows whose padding stays under a factor of two of the real rows.
    """
    act = gated_activation(activation)
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_local_experts = w13.shape[0]
    if num_tokens == 0:
        return x.new_zeros(num_tokens, hidden)

    local_ids, active = active_rows(topk_ids, keep, expert_map)
    rows = torch.nonzero(active.reshape(-1)).squeeze(1)
    row_experts, by_expert = torch.sort(local_ids.reshape(-1)[rows], stable=True)
    rows = rows[by_expert]
    row_weights = topk_weights.reshape(-1)[rows].float().unsqueeze(1)
    block_sizes = torch.bincount(row_experts, minlength=num_local_experts)
    # One host sync for the block sizes: the loop and the padding need Python ints.
    sizes = block_sizes.tolist()
    largest = max(sizes, default=0)
    if largest == 0:
        return x.new_zeros(num_tokens, hidden)
    if batched is None:
        batched = (
            largest <= _BATCHED_MAX_BLOCK
            and num_local_experts * largest <= _MAX_PADDING_FACTOR * rows.numel()
        )
    sorted_rows = _ExpertRows(
        tokens=torch.div(rows, top_k, rounding_mode="floor"),
        experts=row_experts,
        block_sizes=block_sizes,
        sizes=sizes,
        input_weights=row_weights if apply_router_weight_on_input else None,
        output_weights=None if apply_router_weight_on_input else row_weights,
    )
    run = _batched_experts if batched else _looped_experts
    # The float32 accumulator is scratch when the result is a cast of it anyway.
    if x.dtype == torch.float32:
        out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    else:
        out = _scratch("out", num_tokens * hidden, x.new_empty(0, dtype=torch.float32))
        out = out.view(num_tokens, hidden).zero_()
    run(out, x, w13, w2, sorted_rows, act)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _expert_input(x, tokens, input_weights):
    expert_input = x.index_select(0, tokens)
    if input_weights is not None:
        expert_input = (expert_input.float() * input_weights).to(x.dtype)
    return expert_input


def _accumulate(out, tokens, expert_out, output_weights):
    contribution = expert_out.float()
    if output_weights is not None:
        contribution = contribution * output_weights
    out.index_add_(0, tokens, contribution)


def _looped_experts(out, x, w13, w2, rows: _ExpertRows, act) -> None:
    """One gate_up and one down matmul per non-empty expert, on contiguous row blocks.

    The inputs of all computed rows are gathered once, in expert order, so each expert's
    rows are one contiguous slice. The matmuls write into re-used scratch buffers (`out=`),
    the router weight is folded into the activation (w * W2 h == W2 (w h)), and each block is
    accumulated into the float32 output with one index_add_. Scratch memory is re-used from
    call to call (`_scratch`): on CPU, fresh multi-megabyte buffers cost page faults on every
    call, which is a large share of a prefill MoE layer's time.
    """
    intermediate = w13.shape[1] // 2
    hidden_size = x.shape[1]
    largest = max(rows.sizes)
    num_rows = rows.tokens.numel()
    # bf16 matmuls on a CPU without native bf16 (AVX2, AVX-512 without BF16) run several
    # times slower than float32 ones plus the casts: compute in float32 there.
    upcast = x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _fast_cpu_bf16()
    like = out if upcast else x
    expert_rows = _scratch("rows", num_rows * hidden_size, like).view(num_rows, hidden_size)
    if upcast:
        expert_rows.copy_(x.index_select(0, rows.tokens))
    else:
        torch.index_select(x, 0, rows.tokens, out=expert_rows)
    if rows.input_weights is not None:
        expert_rows.copy_(expert_rows.float() * rows.input_weights)
    gate_up = _scratch("gate_up", largest * 2 * intermediate, like)
    hidden_act = _scratch("hidden", largest * intermediate, like)
    down = _scratch("down", largest * hidden_size, like)
    # index_add_ needs the source in the output's dtype (float32).
    down_f32 = down if like.dtype == torch.float32 else _scratch("down_f32", down.numel(), out)
    w13_f32 = _scratch("w13_f32", w13[0].numel(), out).view(w13.shape[1:]) if upcast else None
    w2_f32 = _scratch("w2_f32", w2[0].numel(), out).view(w2.shape[1:]) if upcast else None
    start = 0
    for expert, size in enumerate(rows.sizes):
        if size == 0:
            continue
        block = slice(start, start + size)
        w13_e = w13[expert] if w13_f32 is None else w13_f32.copy_(w13[expert])
        w2_e = w2[expert] if w2_f32 is None else w2_f32.copy_(w2[expert])
        block_gate_up = torch.mm(
            expert_rows[block], w13_e.t(), out=gate_up[: size * 2 * intermediate].view(size, -1)
        )
        block_hidden = torch.mul(
            act(block_gate_up[:, :intermediate]),
            block_gate_up[:, intermediate:],
            out=hidden_act[: size * intermediate].view(size, intermediate),
        )
        if rows.output_weights is not None:
            block_hidden.mul_(rows.output_weights[block])
        block_down = torch.mm(
            block_hidden, w2_e.t(), out=down[: size * hidden_size].view(size, hidden_size)
        )
        block_f32 = down_f32[: size * hidden_size].view(size, hidden_size)
        if block_f32.data_ptr() != block_down.data_ptr():
            block_f32.copy_(block_down)
        out.index_add_(0, rows.tokens[block], block_f32)
        start += size


@functools.cache
def _fast_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    if torch.cpu._is_amx_tile_supported():
        return True
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in info)
    except OSError:
        return False


# Re-used CPU scratch buffers, per thread and per (name, dtype), grown on demand. Requests
# over _SCRATCH_MAX_ELEMENTS are allocated per call and not kept, which bounds what stays
# allocated between calls (a few buffers of at most 128 MiB in bf16).
_SCRATCH = threading.local()
_SCRATCH_MAX_ELEMENTS = 1 << 26


def _scratch(name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A 1-D buffer of numel elements of like's dtype and device (contents undefined)."""
    if like.device.type != "cpu" or numel > _SCRATCH_MAX_ELEMENTS:
        return like.new_empty(numel)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (name, like.dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = like.new_empty(numel)
        buffers[key] = buffer
    return buffer[:numel]


def _batched_experts(out, x, w13, w2, rows: _ExpertRows, act) -> None:
    """All local experts at once (bmm) on their rows padded to [E_local, largest, H]."""
    intermediate = w13.shape[1] // 2
    block_start = torch.cumsum(rows.block_sizes, 0) - rows.block_sizes
    slot = torch.arange(rows.tokens.numel(), device=x.device) - block_start[rows.experts]
    padded = x.new_zeros(w13.shape[0], max(rows.sizes), x.shape[1])
    padded[rows.experts, slot] = _expert_input(x, rows.tokens, rows.input_weights)
    gate_up = torch.bmm(padded, w13.transpose(1, 2))
    hidden_act = act(gate_up[..., :intermediate]).mul_(gate_up[..., intermediate:])
    expert_out = torch.bmm(hidden_act, w2.transpose(1, 2))[rows.experts, slot]
    _accumulate(out, rows.tokens, expert_out, rows.output_weights)


def _part(weights: torch.Tensor | None, block: slice) -> torch.Tensor | None:
    return None if weights is None else weights[block]

"""Expert compute by vLLM's own CPU fused-MoE kernel, handed only the rows to compute.

vLLM's CPU kernel (`cpu_fused_moe`, csrc/cpu/cpu_fused_moe.cpp) takes a dense [T, k]
routing: every id must be a local expert in [0, E_local) (it indexes its per-expert counters
with the id, so an id -1 or a remote expert's id reads out of bounds: the TP + EP segfault),
every slot is computed (a row at weight 0 costs as much as any other), and each token's
output is the sum over its k slots, in slot order and in float32, of weight * expert(x),
cast once to the activation dtype.

So the rows that must be computed (kept, expert local) are handed to it as dense problems:
tokens are grouped by how many such rows they have (c = 1..k), each token's rows moved to the
front in their slot order, and each group is one kernel call on [T_c, c]. Every call reads
the weights of the experts it touches once, which on a 2-core AVX2 host costs about as much
as computing 6 rows per expert (256 experts: ~60 ms a call, ~40 us a row); so neighbouring
groups share a call where that is cheaper: a token with fewer rows than its call's width
fills the rest with its first row at weight 0 (`_widths` picks the widths that minimise
call cost + padded rows). Tokens with no row get 0 and are never handed over.

Per token the kernel then sums exactly the computed rows in the order the full problem sums
them; padding and the full problem's rows at weight 0 add 0 * y = +-0, which changes no finite
sum. The kernel computes every row on its own (its gemm tiles split rows and output columns,
never the reduction over the hidden size), so which rows share a call does not change a
row's result either: the output is bit-identical to the dropless kernel with the dropped and
remote rows' weights set to 0 (tests/moe/test_vllm_cpu_experts.py checks it), and where every
row is computed it is one call on the routing as given, which is vLLM's own call.

Cost besides the kernel: one host read (the group sizes), a stable sort of the k slots per
token, and a gather of the inputs of the tokens of each call that does not take them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ascend_patch.impls.moe.experts.torch_backend import active_rows

# kernel(x [T', H], topk_weights float32 [T', c], topk_ids int32 [T', c]) -> [T', H]: vLLM's
# kernel on a problem where every row is computed (ids local, c >= 1, T' >= 1).
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# A kernel call reads each local expert's weights once: worth about this many rows of
# compute per expert (measured on a 2-core AVX2 EPYC, scripts/bench_vs_native.py).
ROWS_PER_EXPERT_READ = 6


def moe_forward(
    kernel: Kernel,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    keep: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    *,
    num_local_experts: int,
) -> torch.Tensor:
    """out [T, H] in x.dtype: the weighted sum over the computed rows of each token, by
    `kernel`, which computes only those rows (and as few padding rows as pay)."""
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return x.new_zeros(0, x.shape[1])
    local, active = active_rows(topk_ids, keep, expert_map)
    weights = topk_weights.to(torch.float32)
    counts = active.sum(dim=1)
    # The one host read: how many tokens compute 0, 1, ..., k rows.
    group_sizes = torch.bincount(counts, minlength=top_k + 1).tolist()
    if group_sizes[top_k] == num_tokens:
        return kernel(x, weights.contiguous(), local.to(torch.int32).contiguous())
    # Each token's computed rows first, in slot order (a stable sort of "not computed"); the
    # slots past its count become padding: its first row at weight 0.
    order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices
    slots = torch.arange(top_k, device=counts.device)
    padding = slots >= counts.unsqueeze(1)
    local = torch.where(padding, local.gather(1, order[:, :1]), local.gather(1, order))
    local = local.to(torch.int32)
    weights = weights.gather(1, order).masked_fill_(padding, 0.0)
    by_count = torch.argsort(counts, stable=True)
    out = x.new_zeros(num_tokens, x.shape[1])
    start = group_sizes[0]
    for width, size in _widths(group_sizes, num_local_experts * ROWS_PER_EXPERT_READ):
        if size == num_tokens:  # one call takes every token
            return kernel(x, weights[:, :width].contiguous(), local[:, :width].contiguous())
        tokens = by_count[start:start + size]
        out.index_copy_(0, tokens, kernel(
            x.index_select(0, tokens),
            weights.index_select(0, tokens)[:, :width].contiguous(),
            local.index_select(0, tokens)[:, :width].contiguous(),
        ))
        start += size
    return out


def _widths(group_sizes: list[int], call_cost: float) -> list[tuple[int, int]]:
    """[(width, tokens)] of the kernel calls, in increasing width: the calls that cover
    every token with 1..k rows at the least call_cost per call + padded rows (a token with c
    rows in a call of width w pads w - c). Tokens are taken in count order, so each call
    covers a range of counts (exact by dynamic programming over the k counts)."""
    top_k = len(group_sizes) - 1
    # best[w]: least cost covering counts 1..w with a call of width w last; cut[w]: where
    # that call starts (counts cut+1..w).
    best = [0.0] + [float("inf")] * top_k
    cut = [0] * (top_k + 1)
    for width in range(1, top_k + 1):
        if group_sizes[width] == 0 and width < top_k:
            continue  # a call's width is its largest count
        for low in range(width):
            if low and best[low] == float("inf"):
                continue
            padded = sum(group_sizes[c] * (width - c) for c in range(low + 1, width + 1))
            tokens = sum(group_sizes[low + 1:width + 1])
            cost = best[low] + (call_cost if tokens else 0.0) + padded
            if cost < best[width]:
                best[width], cut[width] = cost, low
    calls, width = [], top_k
    while width > 0:
        low = cut[width]
        tokens = sum(group_sizes[low + 1:width + 1])
        if tokens:
            calls.append((width, tokens))
        width = low
    return calls[::-1]

"""Expert compute by vLLM's own CPU fused-MoE kernel, handed only the rows to compute.

vLLM's CPU kernel (`cpu_fused_moe`, csrc/cpu/cpu_fused_moe.cpp) takes a dense [T, k]
routing: every id must be a local expert in [0, E_local) (it indexes its per-expert counters
with the id, so an id -1 or a remote expert's id reads out of bounds: the TP + EP segfault),
every slot is computed (a row at weight 0 costs as much as any other), and each token's
output is the sum over its k slots, in slot order and in float32, of weight * expert(x),
cast once to the activation dtype.

So the rows that must be computed (kept, expert local) are handed to it as dense problems:
tokens are grouped by how many such rows they have (c = 1..k), and each group is one kernel
call on [T_c, c] with those rows moved to the front of each token, in their slot order.
Tokens with none get 0. Per token the kernel then sums exactly the computed rows in the order
the full problem sums them; the full problem with the other rows at weight 0 adds
0 * y = +-0 for them, which changes no finite sum. The kernel computes every row on its own
(its gemm tiles split rows and output columns, never the reduction over the hidden size), so
which rows share a call does not change a row's result either: the output is bit-identical
to the dropless kernel with the dropped and remote rows' weights set to 0 (tests/moe/
test_vllm_cpu_experts.py checks it), and where every row is computed it is one call on the
routing as given, which is vLLM's own call.

Cost: one host read (the group sizes), a stable sort of the k slots per token, a gather of the
inputs of the tokens of each partial group, and at most k kernel calls, each reading its
experts' weights once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# kernel(x [T', H], topk_weights float32 [T', c], topk_ids int32 [T', c]) -> [T', H]: vLLM's
# kernel on a problem where every row is computed (ids local, c >= 1, T' >= 1).
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def computed_rows(
    topk_ids: torch.Tensor, keep: torch.Tensor | None, expert_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(local id [T, k], bool [T, k] computed here). A row is computed when its id is >= 0
    (-1: dropped), keep allows it, and its expert is local (expert_map: global id -> local
    id, -1 where another EP rank owns it)."""
    active = topk_ids >= 0
    if expert_map is None:
        local = topk_ids
    else:
        # -1 must not index expert_map from the end.
        local = expert_map[topk_ids.clamp(min=0).long()].to(topk_ids.dtype)
        active &= local >= 0
    if keep is not None:
        active &= keep
    return local, active


def moe_forward(
    kernel: Kernel,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    keep: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [T, H] in x.dtype: the weighted sum over the computed rows of each token, by
    `kernel`, which computes only those rows."""
    num_tokens, top_k = topk_ids.shape
    if num_tokens == 0:
        return x.new_zeros(0, x.shape[1])
    local, active = computed_rows(topk_ids, keep, expert_map)
    weights = topk_weights.to(torch.float32)
    counts = active.sum(dim=1)
    # The one host read: how many tokens compute 0, 1, ..., k rows.
    group_sizes = torch.bincount(counts, minlength=top_k + 1).tolist()
    if group_sizes[top_k] == num_tokens:
        return kernel(x, weights.contiguous(), local.to(torch.int32).contiguous())
    # Each token's computed rows first, in slot order (a stable sort of "not computed").
    order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices
    local = local.gather(1, order).to(torch.int32)
    weights = weights.gather(1, order)
    by_count = torch.argsort(counts, stable=True)
    out = x.new_zeros(num_tokens, x.shape[1])
    start = group_sizes[0]
    for count in range(1, top_k + 1):
        size = group_sizes[count]
        if size == 0:
            continue
        if size == num_tokens:  # every token computes the same number of rows
            return kernel(x, weights[:, :count].contiguous(), local[:, :count].contiguous())
        tokens = by_count[start:start + size]
        out.index_copy_(0, tokens, kernel(
            x.index_select(0, tokens),
            weights.index_select(0, tokens)[:, :count].contiguous(),
            local.index_select(0, tokens)[:, :count].contiguous(),
        ))
        start += size
    return out

"""Torch emulations of vLLM's Triton MoE path pieces that need CUDA: the
`moe_align_block_size` op (csrc/moe/moe_align_sum_kernels.cu, behind
fused_moe/moe_align_block_size.py), the `moe_sum` op and what `fused_moe_kernel` computes per
block. For checks that run without vLLM's CUDA extension: the CPU tests of what the Triton
experts are handed (vLLM's real TritonExperts.apply runs on them), and the GPU check
(scripts/gpu_check.py), which feeds vLLM's real Triton kernel from the alignment.

Written from the kernel source: a row is counted only if 0 <= id < num_experts and, when the
map is applied, expert_map[id] != -1; counts are padded to the block size; blocks past the
last expert get expert 0; unused `sorted_token_ids` slots hold numel. An id < 0 is out of the
kernel's range (it indexes its counters with it): the emulation refuses it rather than guess.
Within an expert the CUDA op orders rows by atomics (any order); here by row index.
"""

from __future__ import annotations

import torch


def align_op(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    sorted_token_ids: torch.Tensor,
    experts_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    expert_map: torch.Tensor | None = None,
    scatter_idx: torch.Tensor | None = None,
) -> None:
    """vLLM's `_custom_ops.moe_align_block_size` (the CUDA op, same arguments): fills the
    given buffers. A given expert_map is applied while counting (what the wrapper passes only
    with ignore_invalid_experts). scatter_idx is not emulated."""
    if scatter_idx is not None:
        raise NotImplementedError("scatter_idx is not emulated")
    flat = topk_ids.reshape(-1).to(torch.int64)
    if bool((flat < 0).any()):
        raise ValueError("topk id < 0: out of moe_align_block_size's range (undefined)")
    if (num_experts + 31) // 32 * 32 >= 1024:
        raise ValueError("padded_num_experts must be less than 1024")
    numel, device = flat.numel(), topk_ids.device
    rows = torch.arange(numel, device=device)
    valid = flat < num_experts
    expert = flat.clone()
    if expert_map is not None:
        expert[valid] = expert_map.to(torch.int64)[flat[valid]]
        valid &= expert >= 0
    rows, expert = rows[valid], expert[valid]
    counts = torch.bincount(expert, minlength=num_experts)[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    starts = torch.cumsum(padded, 0) - padded
    total = int(padded.sum())
    if total > sorted_token_ids.numel():
        raise ValueError(f"{total} aligned rows overflow sorted_token_ids "
                         f"({sorted_token_ids.numel()})")
    sorted_token_ids.fill_(numel)
    order = torch.argsort(expert, stable=True)
    rows, expert = rows[order], expert[order]
    rank = torch.arange(rows.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[expert]
    sorted_token_ids[starts[expert] + rank] = rows.to(sorted_token_ids.dtype)
    experts_ids.zero_()
    experts_ids[: total // block_size] = torch.repeat_interleave(
        torch.arange(num_experts, device=device, dtype=experts_ids.dtype),
        padded // block_size)
    num_tokens_post_pad.fill_(total)


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
    ignore_invalid_experts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_token_ids int32, expert_ids int32, num_tokens_post_pad int32 [1]): vLLM's
    Python wrapper (fused_moe/moe_align_block_size.py: buffer sizes, the map applied by the
    op with ignore_invalid_experts or to the block experts after it) around `align_op`."""
    numel, device = topk_ids.numel(), topk_ids.device
    max_padded = numel + num_experts * (block_size - 1)
    if numel < num_experts:
        max_padded = min(numel * block_size, max_padded)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    expert_ids = torch.empty(-(-max_padded // block_size), dtype=torch.int32, device=device)
    post_pad = torch.empty(1, dtype=torch.int32, device=device)
    align_op(topk_ids, num_experts, block_size, sorted_ids, expert_ids, post_pad,
             expert_map if ignore_invalid_experts else None)
    if expert_map is not None and not ignore_invalid_experts:
        expert_ids = expert_map.to(torch.int32)[expert_ids.to(torch.int64)]
    return sorted_ids, expert_ids, post_pad


def moe_sum_op(input: torch.Tensor, output: torch.Tensor,
               topk_ids: torch.Tensor | None = None,
               expert_map: torch.Tensor | None = None) -> None:
    """vLLM's `_custom_ops.moe_sum`: output = input summed over the top-k slots; with
    topk_ids and expert_map (0.32's pad-aware form) the slots whose expert maps to -1 are
    left out. ASSUMED from TritonExperts.moe_sum's comment ("Skip the slots whose expert is
    not on this rank"): the CUDA kernel's source was not available."""
    if topk_ids is None or expert_map is None:
        output.copy_(input.sum(dim=1))
        return
    live = expert_map.to(torch.int64)[topk_ids.to(torch.int64)] >= 0
    output.copy_(torch.where(live.unsqueeze(-1), input, torch.zeros_like(input)).sum(dim=1))


def computed_rows(sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                  num_tokens_post_pad: torch.Tensor, block_size: int, numel: int) -> torch.Tensor:
    """Flat row indices the fused MoE kernel multiplies: those in blocks below
    num_tokens_post_pad whose expert is not -1 (a -1 block only writes zeros)."""
    total = int(num_tokens_post_pad[0])
    ids = sorted_ids[:total].to(torch.int64).reshape(-1, block_size)
    live = expert_ids[: total // block_size] >= 0
    ids = ids[live].reshape(-1)
    return torch.sort(ids[ids < numel]).values


def fused_moe_blocks(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                     topk_weights: torch.Tensor | None, sorted_ids: torch.Tensor,
                     expert_ids: torch.Tensor, num_tokens_post_pad: torch.Tensor,
                     mul_routed_weight: bool, top_k: int, block_size: int) -> None:
    """What vLLM's `fused_moe_kernel` writes into c ([M, top_k, N]): for each block below
    num_tokens_post_pad, its rows r (< M * top_k) get a[r // top_k] @ b[e].T (times the
    routing weight if asked); a block of expert -1 writes zeros. Rows in no block are not
    written at all."""
    total = int(num_tokens_post_pad[0])
    numel = a.size(0) * top_k
    rows = sorted_ids[:total].to(torch.int64).reshape(-1, block_size)
    experts = expert_ids[: total // block_size].to(torch.int64)
    out = c.view(-1, c.size(-1))
    for e in torch.unique(experts).tolist():
        r = rows[experts == e].reshape(-1)
        r = r[r < numel]
        if e < 0:
            out[r] = 0
            continue
        val = a[r // top_k].float() @ b[e].float().T
        if mul_routed_weight:
            val = val * topk_weights.reshape(-1)[r].float().unsqueeze(1)
        out[r] = val.to(out.dtype)

"""A torch emulation of vLLM's `moe_align_block_size` (the CUDA op, csrc/moe/
moe_align_sum_kernels.cu, behind fused_moe/moe_align_block_size.py), for checks that run
without vLLM's CUDA extension: the CPU tests of what the Triton experts are handed, and the
GPU check (scripts/gpu_check.py), which feeds vLLM's Triton kernel from it.

Written from the kernel source: a row is counted only if 0 <= id < num_experts and, when the
map is applied, expert_map[id] != -1; counts are padded to the block size; blocks past the
last expert get expert 0; unused `sorted_token_ids` slots hold numel. An id < 0 is out of the
kernel's range (it indexes its counters with it): the emulation refuses it rather than guess.
Within an expert the CUDA op orders rows by atomics (any order); here by row index.
"""

from __future__ import annotations

import torch


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
    ignore_invalid_experts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_token_ids int32, expert_ids int32, num_tokens_post_pad int32 [1]), the
    wrapper's outputs (0.32 semantics; 0.23 is ignore_invalid_experts=False)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    if bool((flat < 0).any()):
        raise ValueError("topk id < 0: out of moe_align_block_size's range (undefined)")
    numel = flat.numel()
    device = topk_ids.device
    max_padded = numel + num_experts * (block_size - 1)
    if numel < num_experts:
        max_padded = min(numel * block_size, max_padded)
    max_blocks = -(-max_padded // block_size)
    rows = torch.arange(numel, device=device)
    valid = flat < num_experts
    expert = flat.clone()
    if expert_map is not None and ignore_invalid_experts:
        expert[valid] = expert_map.to(torch.int64)[flat[valid]]
        valid &= expert >= 0
    rows, expert = rows[valid], expert[valid]
    counts = torch.bincount(expert, minlength=num_experts)[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    starts = torch.cumsum(padded, 0) - padded
    total = int(padded.sum())
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=device)
    order = torch.argsort(expert, stable=True)
    rows, expert = rows[order], expert[order]
    rank = torch.arange(rows.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[expert]
    sorted_ids[starts[expert] + rank] = rows.to(torch.int32)
    expert_ids = torch.zeros(max_blocks, dtype=torch.int32, device=device)
    blocks = (padded // block_size)
    expert_ids[: total // block_size] = torch.repeat_interleave(
        torch.arange(num_experts, device=device, dtype=torch.int32), blocks)
    if expert_map is not None and not ignore_invalid_experts:
        expert_ids = expert_map.to(torch.int32)[expert_ids.to(torch.int64)]
    return sorted_ids, expert_ids, torch.tensor([total], dtype=torch.int32, device=device)


def computed_rows(sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                  num_tokens_post_pad: torch.Tensor, block_size: int, numel: int) -> torch.Tensor:
    """Flat row indices the fused MoE kernel multiplies: those in blocks below
    num_tokens_post_pad whose expert is not -1 (a -1 block only writes zeros)."""
    total = int(num_tokens_post_pad[0])
    ids = sorted_ids[:total].to(torch.int64).reshape(-1, block_size)
    live = expert_ids[: total // block_size] >= 0
    ids = ids[live].reshape(-1)
    return torch.sort(ids[ids < numel]).values

"""The small tensor rules that keep dropped rows out of vllm-ascend's token dispatchers.

Torch only (no vllm-ascend, no vLLM), so they are tested on any machine; ascend_0_23.py says
where in vllm-ascend 0.23.0.post1 each rule is applied and why it holds there.

A dropped row comes out of the drop step (drop_step.py) as expert id -1 with weight 0.
Each dispatcher needs it in its own form:

* all-gather dispatcher: id -1 as is. Its routing op gathers only ids inside this rank's
  expert range and -1 is below every range; expert_map[-1] is still a valid read.
* all-to-all dispatcher: an id past the last expert (`unsent_id`). Its histogram of
  [0, E] ignores it (so the split sizes leave the row out), and its permute sorts ids
  ascending, so the row lands in the tail that `num_out_tokens` cuts off. -1 would sort
  first and be sent in place of a kept row; the permute op also requires ids >= 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def unsent_id(num_experts: int) -> int:
    """The id of a dropped row on the all-to-all path: above the histogram's closed upper
    bound E (torch.histc counts a value equal to max in the last bin)."""
    return num_experts + 1


def mark_unsent(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Dropped rows (id -1) renamed to `unsent_id`; a new tensor, same dtype."""
    return topk_ids.masked_fill(topk_ids < 0, unsent_id(num_experts))


def rows_sent(input_splits: Sequence[int] | torch.Tensor) -> int:
    """Rows this rank sends: the sum of its all-to-all input split sizes."""
    return int(sum(int(s) for s in input_splits))


def pad_rows(tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """`tokens` with zero rows appended up to `rows` (unchanged when it has that many).

    The combine's unpermute reads one row per routed (token, expert) row; dropped rows were
    never sent, so their positions are zeros, and their weight is zero as well.
    """
    missing = rows - tokens.shape[0]
    if missing <= 0:
        return tokens
    return torch.cat([tokens, tokens.new_zeros((missing, *tokens.shape[1:]))])


def contiguous_owners(num_experts: int, ep_size: int, local_experts: int) -> torch.Tensor | None:
    """int64 [E]: the EP rank of each physical expert id when every rank holds
    `local_experts` consecutive ids (vllm-ascend's dispatchers assume exactly this).
    None with one EP rank: every expert is local."""
    if ep_size <= 1:
        return None
    if local_experts < 1 or num_experts != ep_size * local_experts:
        raise ValueError(
            f"{num_experts} experts are not {ep_size} EP ranks x {local_experts} local experts"
        )
    return torch.arange(num_experts, dtype=torch.int64) // local_experts

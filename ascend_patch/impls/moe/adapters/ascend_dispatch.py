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


def physical_scores(scores: torch.Tensor, log2phy: torch.Tensor | None,
                    num_physical: int) -> torch.Tensor:
    """[T, num_physical]: the router's scores of the logical experts [T, E_logical] moved to
    the physical ids this rank's log2phy sends each logical expert to (overflow: reroute).

    With EPLB's redundant experts a logical expert has several physical replicas, and the
    router's rows reach the dispatcher on the one replica log2phy picks; a rerouted row must
    land on that same replica, or the token could get two rows of one expert. So the other
    replicas score -inf: never a reroute target. Without log2phy ids are physical already."""
    if log2phy is None:
        if scores.shape[1] != num_physical:
            raise ValueError(f"{scores.shape[1]} router scores per token for {num_physical} "
                             "experts, and no log2phy map between them")
        return scores
    if log2phy.dim() != 1 or log2phy.numel() != scores.shape[1]:
        raise ValueError(f"log2phy of shape {tuple(log2phy.shape)} does not map the "
                         f"{scores.shape[1]} logical experts the router scores")
    physical = scores.new_full((scores.shape[0], num_physical), float("-inf"))
    return physical.index_copy_(1, log2phy.to(scores.device, torch.long), scores)

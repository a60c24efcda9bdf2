"""`overflow: reroute`: rows the drop planner took off an over-capacity bin go, where they
can, to the same token's best remaining expert in a bin still below the cap.

How it relates to He et al. 2025, "Capacity-Aware Inference" (arXiv 2503.05066, ICLR
2026): their Capacity-Aware Token Drop caps each expert at C = gamma * T * k / E and drops
the lowest-scored overflow; their Expanded Drop first widens every token's candidate set
with extra experts local to the token's device, then applies the same capacity rule, so
low-load local experts absorb tokens. Here the cap is the water level of capacity.py (the
least C that drops at most floor(r * rows), per EP rank or per expert), and the expansion
is applied to the overflow rows only, after the drop, and to any bin (not only the token's
own device): a rerouted row takes the token's highest-scored expert that is not among its
top-k and whose bin is below C, within the room this source rank was given in that bin.
Rows that find no room stay dropped. The bottleneck load is therefore never above the drop
plan's (every bin ends at most at C, or at its protected rows where keep_top1 holds it
above C, where nothing is added), and the rows computed grow back towards T * k.

Spare room and data parallelism: after the drop, bin b holds load_after[b] <= C rows
globally, so its room is C - load_after[b]. Every rank knows the gathered per-source counts
and hence every source's drop quota; the room of each bin is split between the source ranks
in proportion to their overflow rows by the same largest-remainder apportionment as the
drop quotas (capacity._apportion, passed in; ties to the lower rank). Each rank then fills only its
own share, so the ranks together never put a bin above C and no extra collective is needed
(zero-token ranks get no room and run the same tensor ops on empty tensors).

Within a rank the placement is a fixed number of rounds of tensor ops (static shapes, no
host reads on the way): in each round every token with an unplaced overflow row proposes
its best open expert for its first such row (slot order); each bin accepts proposals by
score (descending; ties to the lower token) up to its remaining share. A proposal is only
rejected when its bin fills in that round, so top_k + bins rounds place every row that can
be placed; on the CPU the loop stops early once nothing is proposed (same result; one host
read per round, which the CPU pays without a device queue to drain: `stop_early`).

Weight of a rerouted row: the router's score of the new expert, on the token's own scale:
score[new] * sum(topk_weights) / sum(score[topk_ids]) over the token's routed rows. When
the model's router does not renormalise its top-k this is the score itself; when it does
(Mixtral, the tiny test MoE), it is what the new expert's weight would have been had it been
in the token's renormalised set. `renormalize: true` then rescales all computed rows of a
token, rerouted ones included, to the token's original total, as for drop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# capacity._apportion's signature (kept, rows by source, protected by source) -> [S, bins]:
# passed in by plan_drops, so this module does not import the planner that calls it.
Apportion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Reroute:
    keep: torch.Tensor  # bool [T, k]: computed rows (kept or rerouted)
    topk_ids: torch.Tensor  # [T, k]: rerouted rows carry their new expert
    weights: torch.Tensor  # [T, k]: zero where dropped
    rerouted: torch.Tensor  # bool [T, k]
    rerouted_rows: torch.Tensor  # int64 scalar: this rank's rerouted rows (a device counter)
    bin_rerouted: torch.Tensor  # int64 [bins]: rows this rank rerouted into each bin


def reroute_over_cap(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    keep: torch.Tensor,
    router_scores: torch.Tensor | None,
    expert_bin: torch.Tensor,
    renormalize: bool,
    room_shares_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    rank: int,
    apportion: Apportion,
) -> Reroute:
    """plan_drops' hook: this rank's share of the room (`room_shares` on the gathered
    counts), then `reroute_overflow`. Raises ValueError without scores [T, E]."""
    expected = (topk_ids.shape[0], expert_bin.numel())
    if router_scores is None or tuple(router_scores.shape) != expected:
        got = None if router_scores is None else tuple(router_scores.shape)
        raise ValueError(
            f"overflow: reroute needs the router scores [tokens, experts] {expected}, got {got}"
        )
    share = room_shares(*room_shares_args, apportion)[rank]
    return reroute_overflow(topk_weights, topk_ids, keep, router_scores, expert_bin, share,
                            renormalize)


def room_shares(
    capacity: torch.Tensor,
    load_after: torch.Tensor,
    rows_by_source: torch.Tensor,
    quotas: torch.Tensor,
    apportion: Apportion,
) -> torch.Tensor:
    """int64 [S, bins]: the room below `capacity` each source rank may fill in each bin.

    room[b] = max(0, C - load_after[b]); it is split between sources in proportion to their
    overflow rows (rows - quota summed over bins), largest remainder, ties to the lower
    rank: every rank computes the same matrix from the gathered counts. A bin never offers
    more room than there are overflow rows in all."""
    overflow = (rows_by_source - quotas).sum(dim=1)  # [S]
    room = (capacity - load_after).clamp(min=0).minimum(overflow.sum())  # [bins]
    by_source = overflow.unsqueeze(1).expand_as(rows_by_source)
    return apportion(room, by_source, torch.zeros_like(by_source))


def reroute_overflow(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    keep: torch.Tensor,
    scores: torch.Tensor,
    expert_bin: torch.Tensor,
    share: torch.Tensor,
    renormalize: bool,
) -> Reroute:
    """Place this rank's overflow rows (~keep, id >= 0) in the room `share` [bins] gives it.

    `scores` float [T, E] are the router's scores of every expert for each token (the
    softmax output, or whatever the router ranks and weighs with). `expert_bin` int64 [E]
    maps experts to bins. Deterministic: ties between experts go to the lower expert id
    (argmax), between tokens competing for a bin to the lower token."""
    num_tokens, top_k = topk_ids.shape
    num_experts, num_bins = scores.shape[1], share.numel()  # both >= 1 once rows drop
    device = topk_ids.device
    ids = topk_ids.long()
    routed = ids >= 0
    pending = ~keep & routed
    expert_bin = expert_bin.to(device)
    remaining = share.to(device).clone()
    # The token's own experts (dropped ones included) are never a reroute target.
    taken = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=device)
    taken.scatter_(1, ids.masked_fill(~routed, num_experts), True)
    taken = taken[:, :num_experts]
    ranked_scores = scores.float()
    new_ids, placed = ids.clone(), torch.zeros_like(keep)
    no_bin = remaining.new_zeros(1)
    for _ in range(top_k + num_bins):
        proposing = pending.any(dim=1)
        if stop_early(device) and not bool(proposing.any()):
            break
        open_expert = remaining[expert_bin] > 0
        candidate = ranked_scores.masked_fill(taken | ~open_expert, float("-inf"))
        best = candidate.argmax(dim=1, keepdim=True)  # first maximum: lower expert on ties
        best_score = candidate.gather(1, best).squeeze(1)
        proposing &= best_score > float("-inf")
        # Tokens that propose nothing go to a sentinel bin num_bins with no room.
        target = torch.where(proposing, expert_bin[best.squeeze(1)], num_bins)
        room = torch.cat([remaining, no_bin])
        accepted = proposing & (_rank_in_bin(target, best_score, num_bins) < room[target])
        slot = pending.int().argmax(dim=1, keepdim=True)  # the token's first pending row
        row = torch.zeros_like(keep).scatter_(1, slot, accepted.unsqueeze(1))
        new_ids = torch.where(row, best, new_ids)
        placed |= row
        pending &= ~row
        taken |= torch.zeros_like(taken).scatter_(1, best, accepted.unsqueeze(1))
        remaining -= torch.zeros_like(room).index_add_(0, target, accepted.long())[:num_bins]
    new_keep = keep | placed
    weights = _rerouted_weights(topk_weights, ids, routed, new_ids, placed, new_keep, scores,
                                renormalize)
    bin_rerouted = torch.zeros(num_bins, dtype=torch.int64, device=device).index_add_(
        0, expert_bin[new_ids.clamp(min=0).reshape(-1)], placed.reshape(-1).long())
    return Reroute(
        keep=new_keep,
        topk_ids=new_ids.to(topk_ids.dtype),
        weights=weights,
        rerouted=placed,
        rerouted_rows=placed.sum(),
        bin_rerouted=bin_rerouted,
    )


def stop_early(device: torch.device) -> bool:
    """Whether the rounds stop once nothing is proposed: a host read per round, so on the
    CPU only (no device queue to drain, and up to top_k + bins rounds saved); on an
    accelerator every round runs (static, no host read)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def scores_from_logits(router_logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """float32 [T, E]: the score a router weighs experts with (its softmax or sigmoid of the
    logits), for every expert: what a rerouted row is ranked and weighted by. Adapters call
    it on the logits they reach (adapters/router_scores.py)."""
    logits = router_logits.float()
    return logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)


def _rank_in_bin(target: torch.Tensor, score: torch.Tensor, num_bins: int) -> torch.Tensor:
    """int64 [T]: each proposal's place in its bin, by score descending then token."""
    by_score = torch.sort(-score, stable=True).indices
    order = by_score[torch.sort(target[by_score], stable=True).indices]
    # A scatter-add, not bincount (whose output size is read back from the largest bin).
    sizes = torch.zeros(num_bins + 1, dtype=torch.int64, device=target.device)
    sizes.scatter_add_(0, target, torch.ones_like(target))
    start = torch.cumsum(sizes, dim=0) - sizes
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel(), device=order.device) - start[target[order]]
    return place


def _rerouted_weights(
    topk_weights: torch.Tensor,
    ids: torch.Tensor,
    routed: torch.Tensor,
    new_ids: torch.Tensor,
    placed: torch.Tensor,
    keep: torch.Tensor,
    scores: torch.Tensor,
    renormalize: bool,
) -> torch.Tensor:
    """[T, k] weights: kept rows as routed, rerouted rows the new expert's score on the
    token's scale (module docstring), dropped rows 0; renormalised if asked."""
    original = topk_weights.float().masked_fill(~routed, 0)
    token_total = original.sum(dim=1, keepdim=True)
    own_scores = scores.float().gather(1, ids.clamp(min=0)).masked_fill(~routed, 0)
    score_total = own_scores.sum(dim=1, keepdim=True)
    scale = torch.where(score_total > 0, token_total / score_total, torch.ones_like(token_total))
    new_scores = scores.float().gather(1, new_ids.clamp(min=0))
    weights = torch.where(placed, new_scores * scale, original).masked_fill(~keep, 0)
    if renormalize:
        surviving = weights.sum(dim=1, keepdim=True)
        weights = weights * torch.where(surviving != 0, token_total / surviving,
                                        torch.zeros_like(surviving))
    return weights.to(topk_weights.dtype)

"""The drop planner of `moe.capacity`: which routed (token, expert) rows to skip.

Under expert parallelism the most loaded EP rank sets the step time. Given a drop ratio r,
the planner finds the smallest per-bin capacity C that drops at most floor(r * rows) rows
(the water level of REFERENCE.md section 4), then picks the rows to drop in each
over-capacity bin by policy. Bins are EP ranks or experts.

Pure torch, vectorised over rows (sorts, scatters, cumsums); only the tiny per-bin
arithmetic runs on the CPU. Works on any device and in any process layout: with data
parallelism every rank all-gathers its per-expert counts, so all ranks compute the same C
and split each bin's kept quota between source ranks identically, which keeps the global
drop count exactly at drops(C).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

from ascend_patch.impls.moe.options import CapacityOptions

# all_gather_counts: local int64 [2, E] (routed rows, protected rows per expert) -> [S, 2, E]
AllGatherCounts = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DropPlan:
    keep: torch.Tensor  # bool [T, k], True = row is computed
    weights: torch.Tensor  # [T, k] weights to use (zero where dropped; renormalised if asked)
    capacity: int  # C (per bin)
    routed_rows: int  # global
    dropped_rows: int  # global
    budget: int  # B
    bin_load_before: torch.Tensor  # int64 [bins], global
    bin_load_after: torch.Tensor  # int64 [bins], global


def drop_budget(ratio: float, routed_rows: int) -> int:
    """floor(ratio * routed_rows), with the ratio read as the decimal it was written as.

    Plain float arithmetic gives floor(0.29 * 100) == 28; a user who wrote 0.29 means 29.
    """
    return math.floor(Fraction(repr(float(ratio))) * routed_rows)


def water_level(load: torch.Tensor, protected: torch.Tensor, budget: int) -> int:
    """The smallest integer C >= 0 with drops(C) <= budget.

    drops(C) = sum_b (load_b - min(load_b, max(C, protected_b))): capping bin b at C drops
    its rows above C, but never its protected rows. drops is piecewise linear and
    non-increasing in C with breakpoints at the loads and protected counts, so it is
    evaluated at every breakpoint at once and then solved exactly on the one linear piece
    where it crosses the budget (no search loop).
    """
    load = load.detach().to("cpu", torch.int64).reshape(-1)
    protected = protected.detach().to("cpu", torch.int64).reshape(-1).minimum(load)
    budget = max(int(budget), 0)
    if load.numel() == 0:
        return 0
    droppable = load - protected
    zero = torch.zeros(1, dtype=torch.int64)
    breakpoints = torch.unique(torch.cat([zero, load, protected]))  # sorted, starts at 0
    drops_at = (
        (load.unsqueeze(0) - breakpoints.unsqueeze(1))
        .clamp_(min=0)
        .minimum(droppable.unsqueeze(0))
        .sum(dim=1)
    )
    # The last breakpoint is the max load, where nothing drops: some breakpoint qualifies.
    first_ok = int(torch.nonzero(drops_at <= budget)[0, 0])
    if first_ok == 0:
        return 0
    low, high = int(breakpoints[first_ok - 1]), int(breakpoints[first_ok])
    excess = int(drops_at[first_ok - 1]) - budget  # > 0
    # On (low, high] exactly the bins with protected <= low and load >= high lose one row
    # per unit of C, the others are constant.
    slope = int(((protected <= low) & (load >= high)).sum())
    return low + -(-excess // slope)


def plan_drops(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    ep_size: int,
    options: CapacityOptions,
    all_gather_counts: AllGatherCounts | None = None,
    rank: int = 0,
    num_tokens_global: int | None = None,
) -> DropPlan:
    """Decide which rows of this MoE call are computed.

    `topk_ids` are global expert ids; expert e lives on EP rank e // (num_experts / R), with
    R = options.simulate_ep_size or ep_size. `all_gather_counts` is the EP-group all-gather
    used when ranks hold different tokens (DP > 1): it takes this rank's int64 [2, E] counts
    and returns [S, 2, E]; every rank must call plan_drops (zero tokens included) so the
    collective never hangs. None means one process, or ranks that all hold the same tokens.
    `rank` is this rank's index among the S gathered rows. `num_tokens_global` overrides
    the token count compared with `min_tokens`.

    The counts are gathered even when nothing may drop (r = 0, or too few tokens), so the
    plan always reports the global bin loads: r = 0 measures the imbalance for free. A
    caller that wants no collective at r = 0 can skip the call: every rank has the same
    options, so all of them skip it. Expert ids must lie in [0, num_experts).
    """
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids "
            f"{tuple(topk_ids.shape)} must both be [tokens, k]"
        )
    num_ranks = options.simulate_ep_size or ep_size
    if num_ranks < 1 or num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} is not divisible by the EP size {num_ranks}")
    device = topk_ids.device
    num_local_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1).long()
    flat_protected = _protected_rows(topk_weights, options.keep_top1).reshape(-1)

    local_counts = torch.stack(
        [
            torch.bincount(flat_ids, minlength=num_experts),
            torch.bincount(flat_ids[flat_protected], minlength=num_experts),
        ]
    )
    if all_gather_counts is None:
        gathered = local_counts.unsqueeze(0)
        rank = 0
    else:
        # A concatenating all-gather ([S * 2, E], vLLM's GroupCoordinator.all_gather) is
        # accepted as well as a stacking one ([S, 2, E]).
        gathered = all_gather_counts(local_counts).reshape(-1, 2, num_experts)
        if not 0 <= rank < gathered.shape[0]:
            raise ValueError(f"rank {rank} is not among the {gathered.shape[0]} gathered ranks")
    # [S, 2, bins] on the CPU: from here on the arithmetic is per bin, not per row.
    counts = _per_bin(gathered.to("cpu", torch.int64), options.granularity, num_ranks)
    rows_by_source, protected_by_source = counts[:, 0], counts[:, 1]
    load_before = rows_by_source.sum(dim=0)
    protected_load = protected_by_source.sum(dim=0)
    routed_rows = int(load_before.sum())
    budget = drop_budget(options.drop_token_ratio, routed_rows)
    tokens = num_tokens_global if num_tokens_global is not None else routed_rows // max(top_k, 1)

    if budget == 0 or tokens < options.min_tokens:
        return DropPlan(
            keep=torch.ones_like(topk_ids, dtype=torch.bool),
            weights=topk_weights,
            capacity=int(load_before.max()) if load_before.numel() else 0,
            routed_rows=routed_rows,
            dropped_rows=0,
            budget=budget,
            bin_load_before=load_before,
            bin_load_after=load_before.clone(),
        )

    capacity = water_level(load_before, protected_load, budget)
    load_after = load_before.minimum(protected_load.clamp(min=capacity))
    quota = _apportion(load_after, rows_by_source, protected_by_source)[rank]

    flat_bins = _bin_of(flat_ids, options.granularity, num_experts // num_ranks)
    num_bins = load_before.numel()
    keep_order, sorted_bins = _keep_order(
        topk_weights, flat_bins, flat_protected, options.drop_policy, num_bins
    )
    keep = _keep_first_quota(keep_order, sorted_bins, quota.to(device), num_bins)
    keep = keep.view(num_local_tokens, top_k)
    weights = _surviving_weights(topk_weights, keep, options.renormalize)
    return DropPlan(
        keep=keep,
        weights=weights,
        capacity=capacity,
        routed_rows=routed_rows,
        dropped_rows=routed_rows - int(load_after.sum()),
        budget=budget,
        bin_load_before=load_before,
        bin_load_after=load_after,
    )


def _protected_rows(topk_weights: torch.Tensor, keep_top1: bool) -> torch.Tensor:
    """bool [T, k]: each token's highest-weight row (first slot on ties) if keep_top1."""
    protected = torch.zeros(topk_weights.shape, dtype=torch.bool, device=topk_weights.device)
    if keep_top1 and topk_weights.numel() > 0:
        # argmax returns the first maximal index, which is the lowest slot on ties.
        protected.scatter_(1, topk_weights.argmax(dim=1, keepdim=True), True)
    return protected


def _bin_of(expert_ids: torch.Tensor, granularity: str, experts_per_rank: int) -> torch.Tensor:
    if granularity == "expert":
        return expert_ids
    return torch.div(expert_ids, experts_per_rank, rounding_mode="floor")


def _per_bin(counts_by_expert: torch.Tensor, granularity: str, num_ranks: int) -> torch.Tensor:
    """[S, 2, E] per-expert counts -> [S, 2, bins]. Experts of a rank are contiguous."""
    if granularity == "expert":
        return counts_by_expert
    sources, kinds, num_experts = counts_by_expert.shape
    return counts_by_expert.view(sources, kinds, num_ranks, num_experts // num_ranks).sum(-1)


def _apportion(
    kept: torch.Tensor, rows_by_source: torch.Tensor, protected_by_source: torch.Tensor
) -> torch.Tensor:
    """Split each bin's kept quota between source ranks: int64 [S, bins].

    Source s keeps at least its protected rows and at most its rows; the rest of the quota
    goes in proportion to its droppable rows, rounded by largest remainder with ties to the
    lower rank. Every rank runs this on the same gathered counts, so all agree, and the
    quotas of a bin add up to exactly `kept`.
    """
    droppable = rows_by_source - protected_by_source  # [S, bins]
    droppable_total = droppable.sum(dim=0)  # [bins]
    to_share = kept - protected_by_source.sum(dim=0)  # [bins], in [0, droppable_total]
    scaled = to_share.unsqueeze(0) * droppable
    denominator = droppable_total.clamp(min=1).unsqueeze(0)
    share = torch.div(scaled, denominator, rounding_mode="floor")
    remainder = scaled - share * denominator
    leftover = to_share - share.sum(dim=0)  # [bins], fewer than the number of sources
    # Stable sort on -remainder: largest remainder first, lower rank first on ties.
    order = torch.sort(-remainder, dim=0, stable=True).indices
    place = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.shape[0]).unsqueeze(1).expand_as(order).contiguous()
    )
    share += (place < leftover.unsqueeze(0)).long()
    return protected_by_source + share


def _keep_order(
    topk_weights: torch.Tensor,
    flat_bins: torch.Tensor,
    flat_protected: torch.Tensor,
    policy: str,
    num_bins: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat row indices, their bins), sorted by (bin, protected first, most worth keeping).

    Most worth keeping is, for "position", the slot-major order (slot ascending, then token
    ascending): the reverse of the drop order of the seed PR (later slots, later tokens
    first). For "probs" it is the weight descending, ties in the position order.

    The three keys are packed into one int64 so a single sort does the work of three
    stable ones (this runs on every MoE call): [group | weight rank | position], where
    group = 2 * bin + (not protected) and the weight rank is the float32 bit pattern made
    order-preserving. Weights of wider types are compared as float32.
    """
    num_tokens, top_k = topk_weights.shape
    device = flat_bins.device
    position_bits = max(int(num_tokens * top_k - 1).bit_length(), 1)
    weight_bits = 32 if policy == "probs" else 0
    group_bits = max(int(2 * num_bins - 1).bit_length(), 1)
    if position_bits + weight_bits + group_bits > 63:
        raise ValueError(
            f"too many rows ({num_tokens} x {top_k}) and bins ({num_bins}) for one sort key"
        )
    # Slot-major position of each token-major flat row: slot * T + token.
    rows = torch.arange(num_tokens * top_k, device=device)
    key = (rows % top_k) * num_tokens + torch.div(rows, top_k, rounding_mode="floor")
    if policy == "probs":
        # "+ 0.0" turns -0.0 into +0.0: equal weights must tie, whatever their sign bit.
        bits = (topk_weights.reshape(-1).float() + 0.0).view(torch.int32).long()
        # Negative floats order reversed in their bit pattern: flip their magnitude bits.
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # ascending, >= 0
        key |= ((2**32 - 1) - ordered) << position_bits  # heavier weight sorts first
    group = flat_bins * 2 + (~flat_protected).long()
    key |= group << (position_bits + weight_bits)
    sorted_key, order = torch.sort(key)  # keys are unique: no need for a stable sort
    sorted_bins = sorted_key >> (position_bits + weight_bits + 1)
    return order, sorted_bins


def _keep_first_quota(
    keep_order: torch.Tensor, sorted_bins: torch.Tensor, quota: torch.Tensor, num_bins: int
) -> torch.Tensor:
    """bool [T*k]: the first quota[b] rows of each bin in keep_order are kept."""
    bin_sizes = torch.bincount(sorted_bins, minlength=num_bins)
    bin_start = torch.cumsum(bin_sizes, dim=0) - bin_sizes
    rank_in_bin = (
        torch.arange(keep_order.numel(), device=keep_order.device) - bin_start[sorted_bins]
    )
    keep = torch.empty(keep_order.numel(), dtype=torch.bool, device=keep_order.device)
    keep[keep_order] = rank_in_bin < quota[sorted_bins]
    return keep


def _surviving_weights(
    topk_weights: torch.Tensor, keep: torch.Tensor, renormalize: bool
) -> torch.Tensor:
    weights = topk_weights.masked_fill(~keep, 0)
    if not renormalize:
        return weights
    # Rescale in float32 so that bf16/fp16 weights do not lose the token's total.
    original_sum = topk_weights.float().sum(dim=1, keepdim=True)
    surviving_sum = weights.float().sum(dim=1, keepdim=True)
    scale = torch.where(
        surviving_sum != 0, original_sum / surviving_sum, torch.zeros_like(surviving_sum)
    )
    return (weights.float() * scale).to(topk_weights.dtype)

"""The drop planner of `moe.capacity`: which routed (token, expert) rows to skip.

Under expert parallelism the most loaded EP rank sets the step time. Given a drop ratio r,
the planner finds the smallest per-bin capacity C that drops at most floor(r * rows) rows
(the water level: the least C with sum over bins of max(0, load_b - C) <= floor(r * rows)),
then picks the rows to drop in each over-capacity bin by policy. Bins are EP ranks or experts.

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
from typing import Any

import torch

from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.reroute import reroute_over_cap

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
    # This rank's own rows (its tokens; equal to the global counts with one token source).
    local_routed_rows: int = 0
    local_dropped_rows: int = 0  # taken off their bin (rerouted ones included)
    # overflow: reroute (reroute.py): the ids with rerouted rows' new experts (None: the
    # router's), this rank's rerouted rows (an int64 tensor: no host read) and per bin.
    topk_ids: torch.Tensor | None = None
    local_rerouted_rows: Any = 0
    bin_rerouted: torch.Tensor | None = None


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


def linear_owners(num_experts: int, num_ranks: int, device: Any = None) -> torch.Tensor:
    """int64 [E]: the EP rank of each expert under vLLM's linear placement.

    Ranks hold contiguous experts and the first E % R ranks hold one more than the others,
    as in vLLM 0.32's determine_expert_map (vllm/model_executor/layers/fused_moe/
    expert_map_manager.py:22; the rule at lines 66-79: local_num_experts = E // R + 1 if
    rank < E % R else E // R, start_idx = rank * (E // R) + min(rank, E % R)). Its docstring
    (line 32) says the remainder goes to the last rank, but the code, which is what places
    the weights, gives it to the first ranks.
    """
    if num_ranks < 1 or num_experts < 0:
        raise ValueError(f"cannot place {num_experts} experts on {num_ranks} EP ranks")
    base, extra = divmod(num_experts, num_ranks)
    experts = torch.arange(num_experts, device=device)
    in_larger = extra * (base + 1)  # experts held by the ranks with one more
    # max(base, 1): with fewer experts than ranks every expert is in_larger, the other
    # branch is evaluated but unused.
    return torch.where(
        experts < in_larger,
        torch.div(experts, base + 1, rounding_mode="floor"),
        extra + torch.div(experts - in_larger, max(base, 1), rounding_mode="floor"),
    )


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
    expert_owner: torch.Tensor | None = None,
    router_scores: torch.Tensor | None = None,
) -> DropPlan:
    """Decide which rows of this MoE call are computed.

    `topk_ids` are global expert ids in [0, num_experts), or -1 for a masked slot (vLLM's
    padded or zero-computation slots): a masked row is not routed, it is in no bin's load,
    in neither routed_rows nor the budget, never protected, never kept (keep False, weight
    0). Other ids raise ValueError. With granularity "rank" the bins are the
    R = options.simulate_ep_size or ep_size EP ranks: `expert_owner` (int64 [E], the rank of
    each expert, any placement and any E) says which expert lives where; None means vLLM's
    linear placement (`linear_owners`).

    `all_gather_counts` is the EP-group all-gather used when ranks hold different tokens
    (DP > 1): it takes this rank's int64 [2, E] counts and returns [S, 2, E]; every rank must
    call plan_drops (zero tokens included) so the collective never hangs. None means one
    process, or ranks that all hold the same tokens. `rank` is this rank's index among the S
    gathered rows. `num_tokens_global` overrides the token count compared with `min_tokens`,
    which is otherwise the routed rows over top_k (masked slots count for no token).

    The counts are gathered even when nothing may drop (r = 0, or too few tokens), so the
    plan always reports the global bin loads: r = 0 measures the imbalance for free. A
    caller that wants no collective at r = 0 can skip the call: every rank has the same
    options, so all of them skip it.
    """
    num_ranks = options.simulate_ep_size or ep_size
    _check_arguments(topk_weights, topk_ids, num_experts, num_ranks, expert_owner)
    flat_ids, masked, owner = _flat_ids(topk_ids, num_experts, num_ranks, expert_owner)
    expert_bin, num_bins = _expert_bins(num_experts, num_ranks, options.granularity, owner)
    top_k = topk_ids.shape[1]
    flat_protected = _protected_rows(topk_weights, options.keep_top1, masked).reshape(-1)
    gathered, rank = _gather_counts(
        _expert_counts(flat_ids, flat_protected, num_experts), all_gather_counts, rank
    )
    # [S, 2, bins] on the CPU: from here on the arithmetic is per bin, not per row.
    counts = _per_bin(gathered.to("cpu", torch.int64), expert_bin, num_bins)
    rows_by_source, protected_by_source = counts[:, 0], counts[:, 1]
    load_before = rows_by_source.sum(dim=0)
    protected_load = protected_by_source.sum(dim=0)
    routed_rows = int(load_before.sum())
    budget = drop_budget(options.drop_token_ratio, routed_rows)
    tokens = num_tokens_global if num_tokens_global is not None else routed_rows // max(top_k, 1)

    local_routed = int(rows_by_source[rank].sum())
    if budget == 0 or tokens < options.min_tokens:
        plan = _plan_without_drops(topk_weights, masked, load_before, routed_rows, budget)
        plan.local_routed_rows = local_routed
        return plan

    capacity = water_level(load_before, protected_load, budget)
    load_after = load_before.minimum(protected_load.clamp(min=capacity))
    quotas = _apportion(load_after, rows_by_source, protected_by_source)
    quota = quotas[rank]
    keep = _keep_rows(
        topk_weights,
        flat_ids,
        flat_protected,
        expert_bin,
        quota,
        options.drop_policy,
        has_masked=masked is not None,
    )
    keep = keep.view(topk_ids.shape)
    weights = _surviving_weights(topk_weights, keep, options.renormalize, masked)
    rerouted = None
    if options.overflow == "reroute":
        rerouted = reroute_over_cap(
            topk_weights, topk_ids, keep, router_scores, expert_bin, options.renormalize,
            room_shares_args=(capacity, load_after, rows_by_source, quotas), rank=rank,
            apportion=_apportion)
        keep, weights = rerouted.keep, rerouted.weights
    plan = DropPlan(
        keep=keep,
        weights=weights,
        capacity=capacity,
        routed_rows=routed_rows,
        dropped_rows=routed_rows - int(load_after.sum()),
        budget=budget,
        bin_load_before=load_before,
        bin_load_after=load_after,
        local_routed_rows=local_routed,
        local_dropped_rows=local_routed - int(quota.sum()),
    )
    if rerouted is not None:
        plan.topk_ids = rerouted.topk_ids
        plan.local_rerouted_rows = rerouted.rerouted_rows
        plan.bin_rerouted = rerouted.bin_rerouted
    return plan


def _check_arguments(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    expert_owner: torch.Tensor | None,
) -> None:
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} and topk_ids "
            f"{tuple(topk_ids.shape)} must both be [tokens, k]"
        )
    if num_ranks < 1:
        raise ValueError(f"the EP size must be at least 1, not {num_ranks}")
    if expert_owner is not None and tuple(expert_owner.shape) != (num_experts,):
        raise ValueError(
            f"expert_owner has shape {tuple(expert_owner.shape)}, expected [{num_experts}] "
            f"(the EP rank of each global expert)"
        )


def _expert_bins(
    num_experts: int, num_ranks: int, granularity: str, owner: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """(int64 [E] on the CPU: the bin of each expert, number of bins)."""
    if granularity == "expert":
        return torch.arange(num_experts), num_experts
    if owner is None:
        return linear_owners(num_experts, num_ranks), num_ranks
    return owner, num_ranks


def _flat_ids(
    topk_ids: torch.Tensor, num_experts: int, num_ranks: int, expert_owner: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(int64 [T*k] ids with -1 replaced by the sentinel expert E; bool [T, k] masked rows,
    or None when there are none: the common case, which then runs exactly as before; the
    owner map on the CPU, or None). Raises for ids outside [-1, E) and owners outside [0, R)."""
    flat_ids = topk_ids.reshape(-1).long()
    ids_low, ids_high, owner = _to_host(flat_ids, expert_owner)
    for bad in (ids_low, ids_high):
        if not -1 <= bad < num_experts:
            raise ValueError(
                f"expert id {bad} is out of range for num_experts={num_experts} "
                f"(ids lie in [0, {num_experts}), -1 marks a masked slot)"
            )
    outside = [] if owner is None else owner[(owner < 0) | (owner >= num_ranks)].tolist()
    if outside:
        raise ValueError(f"expert_owner holds rank {outside[0]}, outside the {num_ranks} EP ranks")
    if ids_low >= 0:
        return flat_ids, None, owner
    masked = flat_ids < 0
    return flat_ids.masked_fill(masked, num_experts), masked.view(topk_ids.shape), owner


def _to_host(
    flat_ids: torch.Tensor, expert_owner: torch.Tensor | None
) -> tuple[int, int, torch.Tensor | None]:
    """(min id, max id (0, 0 when empty), int64 owner map on the CPU): one device-to-host
    copy, as this runs on every MoE call."""
    device = flat_ids.device
    if flat_ids.numel():
        parts = [flat_ids.min().view(1), flat_ids.max().view(1)]
    else:
        parts = [torch.zeros(2, dtype=torch.int64, device=device)]
    # An owner map on the ids' device rides along with the bounds; elsewhere it is copied
    # on its own (on the CPU: no copy at all).
    owner_with_ids = expert_owner is not None and expert_owner.device == device
    if owner_with_ids:
        parts.append(expert_owner.detach().long().reshape(-1))
    host = torch.cat(parts).cpu()
    if expert_owner is None or owner_with_ids:
        return int(host[0]), int(host[1]), None if expert_owner is None else host[2:]
    return int(host[0]), int(host[1]), expert_owner.detach().to("cpu", torch.int64)


def _expert_counts(
    flat_ids: torch.Tensor, flat_protected: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """int64 [2, E]: routed and protected rows per expert; the sentinel expert E (masked
    rows) is counted, then cut off."""
    return torch.stack(
        [
            torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts],
            torch.bincount(flat_ids[flat_protected], minlength=num_experts + 1)[:num_experts],
        ]
    )


def _gather_counts(
    local_counts: torch.Tensor, all_gather_counts: AllGatherCounts | None, rank: int
) -> tuple[torch.Tensor, int]:
    """([S, 2, E] counts of every source, this rank's index among them)."""
    if all_gather_counts is None:
        return local_counts.unsqueeze(0), 0
    # A concatenating all-gather ([S * 2, E], vLLM's GroupCoordinator.all_gather) is
    # accepted as well as a stacking one ([S, 2, E]).
    gathered = all_gather_counts(local_counts).reshape(-1, 2, local_counts.shape[1])
    if not 0 <= rank < gathered.shape[0]:
        raise ValueError(f"rank {rank} is not among the {gathered.shape[0]} gathered ranks")
    return gathered, rank


def _plan_without_drops(
    topk_weights: torch.Tensor,
    masked: torch.Tensor | None,
    load: torch.Tensor,
    routed_rows: int,
    budget: int,
) -> DropPlan:
    if masked is None:
        keep, weights = torch.ones_like(topk_weights, dtype=torch.bool), topk_weights
    else:
        keep, weights = ~masked, topk_weights.masked_fill(masked, 0)
    return DropPlan(
        keep=keep,
        weights=weights,
        capacity=int(load.max()) if load.numel() else 0,
        routed_rows=routed_rows,
        dropped_rows=0,
        budget=budget,
        bin_load_before=load,
        bin_load_after=load.clone(),
    )


def _protected_rows(
    topk_weights: torch.Tensor, keep_top1: bool, masked: torch.Tensor | None
) -> torch.Tensor:
    """bool [T, k]: each token's highest-weight valid row (first slot on ties) if keep_top1.
    A token whose slots are all masked protects nothing."""
    protected = torch.zeros(topk_weights.shape, dtype=torch.bool, device=topk_weights.device)
    if not keep_top1 or topk_weights.numel() == 0:
        return protected
    if masked is None:
        # argmax returns the first maximal index, which is the lowest slot on ties.
        return protected.scatter_(1, topk_weights.argmax(dim=1, keepdim=True), True)
    valid = ~masked
    best = topk_weights.masked_fill(masked, float("-inf")).argmax(dim=1, keepdim=True)
    # When every valid weight is -inf too, the first maximum may be a masked slot: the best
    # valid row is then the first valid one.
    first_valid = valid.int().argmax(dim=1, keepdim=True)
    best = torch.where(valid.gather(1, best), best, first_valid)
    return protected.scatter_(1, best, True) & valid


def _per_bin(
    counts_by_expert: torch.Tensor, expert_bin: torch.Tensor, num_bins: int
) -> torch.Tensor:
    """[S, 2, E] per-expert counts -> [S, 2, bins], all on the CPU."""
    sources, kinds, _ = counts_by_expert.shape
    per_bin = torch.zeros(sources, kinds, num_bins, dtype=torch.int64)
    return per_bin.index_add_(2, expert_bin, counts_by_expert)


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


def _keep_rows(
    topk_weights: torch.Tensor,
    flat_ids: torch.Tensor,
    flat_protected: torch.Tensor,
    expert_bin: torch.Tensor,
    quota: torch.Tensor,
    policy: str,
    has_masked: bool,
) -> torch.Tensor:
    """bool [T*k]: the first quota[b] rows of each bin b, in keep order.

    Masked rows (sentinel expert E) fall in a sentinel bin sorted after the real ones, with
    quota 0: they are never kept and never take a real row's place. The sentinel bin is only
    added when there are masked rows, so the sort key is as narrow as before otherwise.
    """
    num_bins = quota.numel() + int(has_masked)
    device = flat_ids.device
    sentinel = torch.full((1,), quota.numel(), dtype=torch.int64, device=device)
    flat_bins = torch.cat([expert_bin.to(device), sentinel])[flat_ids]
    quota = torch.cat([quota, quota.new_zeros(int(has_masked))]).to(device)
    keep_order, sorted_bins = _keep_order(
        topk_weights, flat_bins, flat_protected, policy, num_bins
    )
    return _keep_first_quota(keep_order, sorted_bins, quota, num_bins)


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
    group = 2 * bin + (not protected) and the weight rank comes from `_weight_rank`.
    """
    num_tokens, top_k = topk_weights.shape
    device = flat_bins.device
    position_bits = max(int(num_tokens * top_k - 1).bit_length(), 1)
    weight_rank, weight_bits = (
        _weight_rank(topk_weights.reshape(-1)) if policy == "probs" else (None, 0)
    )
    group_bits = max(int(2 * num_bins - 1).bit_length(), 1)
    if position_bits + weight_bits + group_bits > 63:
        raise ValueError(
            f"too many rows ({num_tokens} x {top_k}) and bins ({num_bins}) for one sort key"
        )
    # Slot-major position of each token-major flat row: slot * T + token.
    rows = torch.arange(num_tokens * top_k, device=device)
    key = (rows % top_k) * num_tokens + torch.div(rows, top_k, rounding_mode="floor")
    if weight_rank is not None:
        key |= weight_rank << position_bits
    group = flat_bins * 2 + (~flat_protected).long()
    key |= group << (position_bits + weight_bits)
    sorted_key, order = torch.sort(key)  # keys are unique: no need for a stable sort
    sorted_bins = sorted_key >> (position_bits + weight_bits + 1)
    return order, sorted_bins


def _weight_rank(flat_weights: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(int64 [T*k] >= 0, smaller for heavier weights and equal for equal ones; its bits).

    float32 and narrower types use the float32 bit pattern made order-preserving: no sort
    needed. Wider types (float64) would tie below float32 precision that way, so they are
    ranked exactly among their distinct values (one extra sort, on a rare dtype).
    """
    # "+ 0.0" turns -0.0 into +0.0: equal weights must tie, whatever their sign bit.
    if flat_weights.is_floating_point() and flat_weights.element_size() <= 4:
        bits = (flat_weights.float() + 0.0).view(torch.int32).long()
        # Negative floats order reversed in their bit pattern: flip their magnitude bits.
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # ascending, >= 0
        return (2**32 - 1) - ordered, 32
    if flat_weights.is_floating_point():
        flat_weights = flat_weights + 0.0
    distinct, ascending = torch.unique(flat_weights, sorted=True, return_inverse=True)
    top = distinct.numel() - 1
    return top - ascending, max(int(top).bit_length(), 1)


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
    topk_weights: torch.Tensor, keep: torch.Tensor, renormalize: bool, masked: torch.Tensor | None
) -> torch.Tensor:
    weights = topk_weights.masked_fill(~keep, 0)
    if not renormalize:
        return weights
    # A masked slot's weight belongs to no routed row: it is not part of the total to
    # restore, so a token that lost nothing keeps its weights exactly (scale 1).
    routed = topk_weights if masked is None else topk_weights.masked_fill(masked, 0)
    # Rescale in float32 so that bf16/fp16 weights do not lose the token's total.
    original_sum = routed.float().sum(dim=1, keepdim=True)
    surviving_sum = weights.float().sum(dim=1, keepdim=True)
    scale = torch.where(
        surviving_sum != 0, original_sum / surviving_sum, torch.zeros_like(surviving_sum)
    )
    return (weights.float() * scale).to(topk_weights.dtype)

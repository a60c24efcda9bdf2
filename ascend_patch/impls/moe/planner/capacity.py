"""The drop planner of `moe.capacity`: which routed (token, expert) rows to skip.

Under expert parallelism the most loaded EP rank sets the step time. Given a drop ratio r,
the planner finds the smallest per-bin capacity C that drops at most floor(r * rows) rows
(the water level: the least C with sum over bins of max(0, load_b - C) <= floor(r * rows)),
then picks the rows to drop in each over-capacity bin by policy. Bins are EP ranks or experts.

Pure torch with static shapes, on the device of the router's output: sorts, scatters and
cumsums over rows, and the per-bin arithmetic (water level, quotas) on tensors too. Nothing
in a plan reads a value back to the host (no `.item()`, no boolean-mask indexing, no
`nonzero`/`unique`), so on an NPU or GPU the step never drains the launch queue and
`torch.compile(fullgraph=True)` captures it whole; its counters are 0-d tensors that the
telemetry folds into host ints at its own interval (`DropPlan.counts`). Works in any process
layout: with data parallelism every rank all-gathers its per-expert counts, so all ranks
compute the same C and split each bin's kept quota between source ranks identically, which
keeps the global drop count exactly at drops(C).
"""

from __future__ import annotations

import dataclasses
import functools
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
class PlanCounts:
    """A plan's counters as 0-d int64 tensors on the plan's device: what the hot path and
    the telemetry use (no host read). `DropPlan.<name>` reads one as a host int."""

    capacity: torch.Tensor  # C (per bin)
    routed_rows: torch.Tensor  # global
    dropped_rows: torch.Tensor  # global
    budget: torch.Tensor  # B
    # This rank's own rows (its tokens; equal to the global counts with one token source).
    local_routed_rows: torch.Tensor
    local_dropped_rows: torch.Tensor  # taken off their bin (rerouted ones included)


COUNTS = tuple(f.name for f in dataclasses.fields(PlanCounts))


class DropPlan:
    """One call's plan. keep: bool [T, k], True = row is computed; weights: [T, k] to use
    (zero where dropped; renormalised if asked); bin_load_before/after: int64 [bins], global.

    The counters (`COUNTS`) live in `counts` as device tensors; the attributes of the same
    name (`plan.dropped_rows`) are host ints read on access, for callers that may wait on
    the device (tests, lab studies, reports). overflow: reroute (reroute.py) adds the ids
    with rerouted rows' new experts (None: the router's), this rank's rerouted rows (a 0-d
    int64 tensor) and per bin."""

    def __init__(
        self,
        keep: torch.Tensor,
        weights: torch.Tensor,
        capacity: Any,
        routed_rows: Any,
        dropped_rows: Any,
        budget: Any,
        bin_load_before: torch.Tensor,
        bin_load_after: torch.Tensor,
        local_routed_rows: Any = 0,
        local_dropped_rows: Any = 0,
        topk_ids: torch.Tensor | None = None,
        local_rerouted_rows: Any = 0,
        bin_rerouted: torch.Tensor | None = None,
    ) -> None:
        self.keep = keep
        self.weights = weights
        self.bin_load_before = bin_load_before
        self.bin_load_after = bin_load_after
        values = (capacity, routed_rows, dropped_rows, budget, local_routed_rows,
                  local_dropped_rows)
        self.counts = PlanCounts(*(_count(v, keep.device) for v in values))
        self.topk_ids = topk_ids
        self.local_rerouted_rows = local_rerouted_rows
        self.bin_rerouted = bin_rerouted

    def __repr__(self) -> str:
        return f"DropPlan(keep={tuple(self.keep.shape)}, counts={self.counts})"


def _count(value: Any, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(torch.int64).reshape(())
    return torch.full((), int(value), dtype=torch.int64, device=device)  # a fill, no copy


def _host_counter(name: str) -> property:
    def read(plan: DropPlan) -> int:
        return int(getattr(plan.counts, name))  # a host read: not for the hot path

    def write(plan: DropPlan, value: Any) -> None:
        setattr(plan.counts, name, _count(value, plan.keep.device))

    return property(read, write, doc=f"{name} as a host int (reads the device)")


for _name in COUNTS:
    setattr(DropPlan, _name, _host_counter(_name))


def drop_budget(ratio: float, routed_rows: int) -> int:
    """floor(ratio * routed_rows), with the ratio read as the decimal it was written as.

    Plain float arithmetic gives floor(0.29 * 100) == 28; a user who wrote 0.29 means 29.
    """
    return math.floor(Fraction(repr(float(ratio))) * routed_rows)


# ratio -> (p, q); a plain dict, which torch.compile traces (it bypasses lru_cache).
_FRACTIONS: dict[float, tuple[int, int]] = {}


def _ratio_fraction(ratio: float) -> tuple[int, int]:
    """(p, q): the ratio as the exact decimal fraction it was written as, in lowest terms,
    computed on the host once per ratio."""
    fraction = _FRACTIONS.get(ratio)
    if fraction is None:
        exact = Fraction(repr(float(ratio)))
        fraction = _FRACTIONS[ratio] = (exact.numerator, exact.denominator)
    return fraction


# rows * p must stay below 2**63 in int64: exact for rows < 2**32 when p < 2**31 (every
# ratio written with up to 9 significant digits and 18 decimals, which also keeps q < 2**62).
_MAX_DEVICE_NUMERATOR = 2**31
_MAX_DEVICE_ROWS = 2**32


def _budget(ratio: float, routed_rows: torch.Tensor) -> torch.Tensor:
    """drop_budget on a 0-d int64 tensor, on its device: floor(rows * p / q) in int64.

    A ratio with more decimals than int64 holds exactly (numerator >= 2**31, or a
    denominator >= 2**62) is computed on the host instead: one host read per call, for
    such ratios only."""
    p, q = _ratio_fraction(float(ratio))
    if p >= _MAX_DEVICE_NUMERATOR or q >= 2**62:
        return torch.tensor(drop_budget(ratio, int(routed_rows)), device=routed_rows.device)
    assert_async(routed_rows < _MAX_DEVICE_ROWS, "moe.capacity: too many rows for the budget",
                 lambda: ValueError(f"{int(routed_rows)} routed rows: at most "
                                    f"{_MAX_DEVICE_ROWS - 1} per call"))
    return torch.div(routed_rows * p, q, rounding_mode="floor")


def assert_async(ok: torch.Tensor, message: str, error: Callable[[], Exception]) -> None:
    """Check a 0-d bool tensor without a host read where the device can (torch's
    `_assert_async`: a device-side assert). On the CPU the check is immediate, so a failure
    raises `error()` (built on the failure path only, where host reads cost nothing). A
    device without `_assert_async` (some out-of-tree backends) checks on the host."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)
        return
    device = ok.device.type
    if device == "cpu":
        try:  # immediate on the CPU
            torch._assert_async(ok, message)
        except RuntimeError:
            raise error() from None
        return
    if _has_async_assert(device):
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise error()


@functools.lru_cache(maxsize=8)
def _has_async_assert(device_type: str) -> bool:
    key = {"cuda": "CUDA", "npu": "PrivateUse1", "xpu": "XPU"}.get(device_type, device_type)
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_assert_async.msg", key)
    except RuntimeError:
        return False


def water_level(load: torch.Tensor, protected: torch.Tensor, budget: int) -> int:
    """The smallest integer C >= 0 with drops(C) <= budget (a host int; the planner uses
    `water_level_tensor`, which stays on the device)."""
    load = load.detach().to(torch.int64).reshape(-1)
    budget_t = torch.tensor(max(int(budget), 0), dtype=torch.int64, device=load.device)
    return int(water_level_tensor(load, protected.detach().to(load.device), budget_t))


def water_level_tensor(
    load: torch.Tensor, protected: torch.Tensor, budget: torch.Tensor
) -> torch.Tensor:
    """0-d int64: the smallest integer C >= 0 with drops(C) <= budget, on load's device.

    drops(C) = sum_b (load_b - min(load_b, max(C, protected_b))): capping bin b at C drops
    its rows above C, but never its protected rows. drops is piecewise linear and
    non-increasing in C with breakpoints at the loads and protected counts, so it is
    evaluated at every breakpoint at once and then solved exactly on the one linear piece
    where it crosses the budget (no search loop, no host read). The breakpoints are sorted,
    not made unique: a repeated one has the same drops, so the first within budget and the
    one before it are the same two values unique() would give.
    """
    load = load.to(torch.int64).reshape(-1)
    protected = protected.to(torch.int64).reshape(-1).minimum(load)
    droppable = load - protected
    breakpoints = torch.sort(torch.cat([load.new_zeros(1), load, protected])).values
    drops_at = (
        (load.unsqueeze(0) - breakpoints.unsqueeze(1))
        .clamp(min=0)
        .minimum(droppable.unsqueeze(0))
        .sum(dim=1)
    )
    # The last breakpoint is the max load, where nothing drops: some breakpoint qualifies,
    # and argmax gives the first.
    first_ok = (drops_at <= budget).to(torch.int32).argmax().view(1)
    before = (first_ok - 1).clamp(min=0)
    low, high = breakpoints.gather(0, before), breakpoints.gather(0, first_ok)
    excess = drops_at.gather(0, before) - budget  # > 0 when first_ok > 0
    # On (low, high] exactly the bins with protected <= low and load >= high lose one row
    # per unit of C, the others are constant (clamped: first_ok == 0 discards the piece).
    slope = ((protected <= low) & (load >= high)).sum().clamp(min=1)
    level = low - torch.div(-excess, slope, rounding_mode="floor")  # low + ceil(excess / slope)
    return torch.where(first_ok == 0, 0, level).reshape(())


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
    0). Other ids raise ValueError (on an accelerator: a device-side assert, as the check
    reads nothing back). With granularity "rank" the bins are the
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
    options, so all of them skip it. Whether anything may drop is a device value: both
    outcomes are computed and selected (`torch.where`), never branched on.
    """
    num_ranks = options.simulate_ep_size or ep_size
    _check_arguments(topk_weights, topk_ids, num_experts, num_ranks, expert_owner)
    device = topk_ids.device
    flat_ids, masked, owner = _flat_ids(topk_ids, num_experts, num_ranks, expert_owner)
    expert_bin, num_bins = _expert_bins(num_experts, num_ranks, options.granularity, owner,
                                        device)
    top_k = topk_ids.shape[1]
    flat_protected = _protected_rows(topk_weights, options.keep_top1, masked).reshape(-1)
    gathered, rank = _gather_counts(
        _expert_counts(flat_ids, flat_protected, num_experts), all_gather_counts, rank
    )
    # [S, 2, bins]: from here on the arithmetic is per bin, not per row (still on device).
    counts = _per_bin(gathered.to(device, torch.int64), expert_bin, num_bins)
    rows_by_source, protected_by_source = counts[:, 0], counts[:, 1]
    load_before = rows_by_source.sum(dim=0)
    protected_load = protected_by_source.sum(dim=0)
    routed_rows = load_before.sum()
    budget = _budget(options.drop_token_ratio, routed_rows)
    if num_tokens_global is None:
        few_tokens = torch.div(routed_rows, max(top_k, 1), rounding_mode="floor") < (
            options.min_tokens)
    else:
        few_tokens = torch.full((), num_tokens_global < options.min_tokens, device=device)
    no_drops = (budget == 0) | few_tokens
    local_routed = rows_by_source[rank].sum()

    max_load = load_before.max() if num_bins else routed_rows.new_zeros(())
    # Without drops the weights are the router's (masked slots zeroed), not renormalised.
    unchanged = topk_weights.masked_fill(masked, 0)
    if options.drop_token_ratio == 0 or _too_few_tokens(
            topk_ids.shape[0], num_tokens_global, all_gather_counts, options.min_tokens):
        # Known on the host (r = 0, or fewer tokens than min_tokens by the shapes alone):
        # nothing can drop, the plan only measures the loads.
        return DropPlan(keep=~masked, weights=unchanged, capacity=max_load,
                        routed_rows=routed_rows, dropped_rows=routed_rows.new_zeros(()),
                        budget=budget, bin_load_before=load_before,
                        bin_load_after=load_before.clone(), local_routed_rows=local_routed,
                        local_dropped_rows=routed_rows.new_zeros(()))
    capacity = torch.where(
        no_drops, max_load, water_level_tensor(load_before, protected_load, budget))
    load_after = torch.where(
        no_drops, load_before, load_before.minimum(protected_load.maximum(capacity)))
    # Without drops every source's quota is all its rows (the apportionment of the full
    # loads gives exactly that), so every routed row is kept.
    quotas = _apportion(load_after, rows_by_source, protected_by_source)
    quota = quotas[rank]
    keep = _keep_rows(topk_weights, flat_ids, flat_protected, expert_bin, quota,
                      options.drop_policy).view(topk_ids.shape)
    weights = torch.where(
        no_drops, unchanged, _surviving_weights(topk_weights, keep, options.renormalize, masked))
    rerouted = None
    if options.overflow == "reroute":
        rerouted = reroute_over_cap(
            topk_weights, topk_ids, keep, router_scores, expert_bin, options.renormalize,
            room_shares_args=(capacity, load_after, rows_by_source, quotas), rank=rank,
            apportion=_apportion)
        keep = rerouted.keep
        weights = torch.where(no_drops, unchanged, rerouted.weights)
    plan = DropPlan(
        keep=keep,
        weights=weights,
        capacity=capacity,
        routed_rows=routed_rows,
        dropped_rows=routed_rows - load_after.sum(),
        budget=budget,
        bin_load_before=load_before,
        bin_load_after=load_after,
        local_routed_rows=local_routed,
        local_dropped_rows=local_routed - quota.sum(),
    )
    if rerouted is not None:
        plan.topk_ids = rerouted.topk_ids
        plan.local_rerouted_rows = rerouted.rerouted_rows
        plan.bin_rerouted = rerouted.bin_rerouted
    return plan


def _too_few_tokens(
    num_tokens: int, num_tokens_global: int | None, gather: AllGatherCounts | None,
    min_tokens: int,
) -> bool:
    """Whether the call has fewer tokens than min_tokens, as far as the host knows without a
    read: the given global count, or, with one token source, this call's token count (the
    routed rows over top_k never exceed it). A decode batch below min_tokens then costs no
    planning at all."""
    if num_tokens_global is not None:
        return num_tokens_global < min_tokens
    return gather is None and num_tokens < min_tokens


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
    num_experts: int, num_ranks: int, granularity: str, owner: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """(int64 [E] on `device`: the bin of each expert, number of bins)."""
    if granularity == "expert":
        return torch.arange(num_experts, device=device), num_experts
    if owner is None:
        return linear_owners(num_experts, num_ranks, device=device), num_ranks
    return owner, num_ranks


def _flat_ids(
    topk_ids: torch.Tensor, num_experts: int, num_ranks: int, expert_owner: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int64 [T*k] ids with -1 replaced by the sentinel expert E; bool [T, k] masked rows;
    the owner map as int64 on the ids' device, or None). Ids outside [-1, E) and owners
    outside [0, R) fail `assert_async`: no host read on the way."""
    flat_ids = topk_ids.reshape(-1).long()
    in_range = ((flat_ids >= -1) & (flat_ids < num_experts)).all()
    assert_async(in_range, f"moe.capacity: expert ids must lie in [-1, {num_experts})",
                 lambda: _bad_id(flat_ids, num_experts))
    owner = None
    if expert_owner is not None:
        owner = expert_owner.detach().to(flat_ids.device, torch.int64).reshape(-1)
        owned = ((owner >= 0) & (owner < num_ranks)).all()
        assert_async(owned, f"moe.capacity: expert_owner must hold ranks in [0, {num_ranks})",
                     lambda: ValueError(f"expert_owner holds rank {_outside(owner, num_ranks)}"
                                        f", outside the {num_ranks} EP ranks"))
    masked = flat_ids < 0
    return flat_ids.masked_fill(masked, num_experts), masked.view(topk_ids.shape), owner


def _bad_id(flat_ids: torch.Tensor, num_experts: int) -> ValueError:
    """The error of an out-of-range id (built on the failure path: host reads are fine)."""
    low, high = int(flat_ids.min()), int(flat_ids.max())
    bad = low if low < -1 else high
    return ValueError(
        f"expert id {bad} is out of range for num_experts={num_experts} "
        f"(ids lie in [0, {num_experts}), -1 marks a masked slot)"
    )


def _outside(owner: torch.Tensor, num_ranks: int) -> int:
    return int(owner[(owner < 0) | (owner >= num_ranks)][0])


def _expert_counts(
    flat_ids: torch.Tensor, flat_protected: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """int64 [2, E]: routed and protected rows per expert; the sentinel expert E (masked
    rows) is counted, then cut off. Scatter-adds, not bincount: bincount's output size
    depends on the largest id, which it reads back."""
    counts = torch.zeros(2, num_experts + 1, dtype=torch.int64, device=flat_ids.device)
    rows = torch.stack([torch.ones_like(flat_ids), flat_protected.long()])
    return counts.scatter_add_(1, flat_ids.unsqueeze(0).expand(2, -1), rows)[:, :num_experts]


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


def _protected_rows(
    topk_weights: torch.Tensor, keep_top1: bool, masked: torch.Tensor
) -> torch.Tensor:
    """bool [T, k]: each token's highest-weight valid row (first slot on ties) if keep_top1.
    A token whose slots are all masked protects nothing."""
    protected = torch.zeros(topk_weights.shape, dtype=torch.bool, device=topk_weights.device)
    if not keep_top1 or topk_weights.numel() == 0:
        return protected
    valid = ~masked
    # argmax returns the first maximal index, which is the lowest slot on ties.
    best = topk_weights.masked_fill(masked, float("-inf")).argmax(dim=1, keepdim=True)
    # When every valid weight is -inf too, the first maximum may be a masked slot: the best
    # valid row is then the first valid one.
    first_valid = valid.int().argmax(dim=1, keepdim=True)
    best = torch.where(valid.gather(1, best), best, first_valid)
    return protected.scatter_(1, best, True) & valid


def _per_bin(
    counts_by_expert: torch.Tensor, expert_bin: torch.Tensor, num_bins: int
) -> torch.Tensor:
    """[S, 2, E] per-expert counts -> [S, 2, bins]."""
    sources, kinds, _ = counts_by_expert.shape
    per_bin = counts_by_expert.new_zeros(sources, kinds, num_bins)
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
    sources = torch.arange(order.shape[0], device=order.device)
    place = torch.empty_like(order).scatter_(
        0, order, sources.unsqueeze(1).expand_as(order).contiguous()
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
) -> torch.Tensor:
    """bool [T*k]: the first quota[b] rows of each bin b, in keep order.

    Masked rows (sentinel expert E) fall in a sentinel bin sorted after the real ones, with
    quota 0: they are never kept and never take a real row's place (with no masked rows
    the sentinel bin is empty and changes nothing).
    """
    num_bins = quota.numel() + 1
    device = flat_ids.device
    sentinel = torch.full((1,), quota.numel(), dtype=torch.int64, device=device)
    flat_bins = torch.cat([expert_bin.to(device), sentinel])[flat_ids]
    quota = torch.cat([quota.to(device), quota.new_zeros(1, device=device)])
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
    group = 2 * bin + (not protected) and the weight rank comes from `_weight_rank`. The
    field widths follow from the shapes only (static).
    """
    num_tokens, top_k = topk_weights.shape
    device = flat_bins.device
    position_bits = max(int(num_tokens * top_k - 1).bit_length(), 1)
    weight_rank, weight_bits = (
        _weight_rank(topk_weights.reshape(-1), position_bits) if policy == "probs"
        else (None, 0)
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


def _weight_rank(flat_weights: torch.Tensor, position_bits: int) -> tuple[torch.Tensor, int]:
    """(int64 [T*k] >= 0, smaller for heavier weights and equal for equal ones; its bits).

    float32 and narrower types use the float32 bit pattern made order-preserving: no sort
    needed. Wider types (float64) would tie below float32 precision that way, so they are
    ranked exactly among their distinct values (dense ranks by one sort and a cumsum, as
    unique() would give without its data-dependent size; at most T*k of them, so the
    position's width holds any rank).
    """
    # "+ 0.0" turns -0.0 into +0.0: equal weights must tie, whatever their sign bit.
    if flat_weights.is_floating_point() and flat_weights.element_size() <= 4:
        bits = (flat_weights.float() + 0.0).view(torch.int32).long()
        # Negative floats order reversed in their bit pattern: flip their magnitude bits.
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # ascending, >= 0
        return (2**32 - 1) - ordered, 32
    if flat_weights.is_floating_point():
        flat_weights = flat_weights + 0.0
    ascending_values, by_value = torch.sort(flat_weights)
    # A new distinct value starts wherever the sorted value changes (NaNs, like unique's,
    # are each their own value).
    starts = torch.ones_like(by_value, dtype=torch.bool)
    starts[1:] = ascending_values[1:] != ascending_values[:-1]
    dense = torch.cumsum(starts.long(), dim=0) - 1
    ascending = torch.empty_like(dense).scatter_(0, by_value, dense)
    top = starts.long().sum() - 1  # distinct values - 1
    return top - ascending, position_bits


def _keep_first_quota(
    keep_order: torch.Tensor, sorted_bins: torch.Tensor, quota: torch.Tensor, num_bins: int
) -> torch.Tensor:
    """bool [T*k]: the first quota[b] rows of each bin in keep_order are kept."""
    bin_sizes = torch.zeros(num_bins, dtype=torch.int64, device=sorted_bins.device)
    bin_sizes.scatter_add_(0, sorted_bins, torch.ones_like(sorted_bins))
    bin_start = torch.cumsum(bin_sizes, dim=0) - bin_sizes
    rank_in_bin = (
        torch.arange(keep_order.numel(), device=keep_order.device) - bin_start[sorted_bins]
    )
    keep = torch.empty(keep_order.numel(), dtype=torch.bool, device=keep_order.device)
    return keep.scatter_(0, keep_order, rank_in_bin < quota[sorted_bins])


def _surviving_weights(
    topk_weights: torch.Tensor, keep: torch.Tensor, renormalize: bool, masked: torch.Tensor
) -> torch.Tensor:
    weights = topk_weights.masked_fill(~keep, 0)
    if not renormalize:
        return weights
    # A masked slot's weight belongs to no routed row: it is not part of the total to
    # restore, so a token that lost nothing keeps its weights exactly (scale 1).
    routed = topk_weights.masked_fill(masked, 0)
    # Rescale in float32 so that bf16/fp16 weights do not lose the token's total.
    original_sum = routed.float().sum(dim=1, keepdim=True)
    surviving_sum = weights.float().sum(dim=1, keepdim=True)
    scale = torch.where(
        surviving_sum != 0, original_sum / surviving_sum, torch.zeros_like(surviving_sum)
    )
    return (weights.float() * scale).to(topk_weights.dtype)

"""The analytic limit of dropping: the water level a drop budget can reach.

One MoE layer under EP costs about T_fixed + c * max_rank_load. Dropping a budget of
B = floor(r * rows) routed rows can at best cap every rank at the water level C(B), the least
C with sum_rank max(0, load_rank - C) <= B, so the load-scaled part speeds up by at most
max_load / C(B). No drop policy can beat that for that r.

With keep_top1 a token's highest-weight row is never dropped, so a rank cannot go below its
protected rows: the reachable level is water_level(load, protected, B) >= C(B). Both are
returned; `ideal_speedup` (no protection) is the strict bound that benchmarks report, and
`ideal_speedup_protected` is what a keep_top1 planner can reach at most.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ascend_patch.impls.moe.planner.capacity import drop_budget, water_level


@dataclass
class AnalyticLimit:
    ratio: float
    rows: int
    budget: int
    max_load: int
    level: int  # water level without protection
    level_protected: int  # water level (capacity) with keep_top1's protected rows
    ideal_speedup: float  # max_load / level
    # max_load / max_b min(load_b, max(level_protected, protected_b)): the bottleneck a
    # keep_top1 planner reaches at best
    ideal_speedup_protected: float

    def as_dict(self) -> dict:
        return asdict(self)


def analytic_limit(
    load: torch.Tensor, ratio: float, protected: torch.Tensor | None = None
) -> AnalyticLimit:
    """The ideal bottleneck speed-up for drop ratio `ratio` over bin loads `load`."""
    load = load.detach().to("cpu", torch.int64).reshape(-1)
    rows = int(load.sum())
    budget = drop_budget(ratio, rows)
    max_load = int(load.max()) if load.numel() else 0
    level = water_level(load, torch.zeros_like(load), budget)
    if protected is None:
        level_protected = level
        bottleneck_protected = min(level, max_load)
    else:
        protected = protected.to("cpu", torch.int64).reshape(-1).minimum(load)
        level_protected = water_level(load, protected, budget)
        # A bin cannot go below its protected rows, so the slowest bin after the cap may sit
        # above the capacity itself.
        bottleneck_protected = int(load.minimum(protected.clamp(min=level_protected)).max())
    return AnalyticLimit(
        ratio=ratio,
        rows=rows,
        budget=budget,
        max_load=max_load,
        level=level,
        level_protected=level_protected,
        ideal_speedup=max_load / level if level else float("inf"),
        ideal_speedup_protected=(max_load / bottleneck_protected if bottleneck_protected
                                 else float("inf")),
    )


def protected_rank_load(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, ep_size: int
) -> torch.Tensor:
    """int64 [ep_size]: rows keep_top1 protects (each token's highest-weight row) per rank."""
    top = topk_ids.gather(1, topk_weights.argmax(dim=1, keepdim=True)).reshape(-1).long()
    counts = torch.bincount(top, minlength=num_experts)
    return counts.view(ep_size, num_experts // ep_size).sum(dim=1)

"""The drop step: a router-side transform of (topk_weights, topk_ids), platform-free.

Every platform adapter runs it after its router (and after any logical -> physical expert
mapping, e.g. vllm-ascend's EPLB log2phy), before its own token dispatcher and experts:

    weights, ids = step(topk_weights, topk_ids)

A dropped row comes back as (weight from the plan, id -1); everything else is unchanged
(renormalised weights aside, when asked). The platform adapter then makes sure rows with
id -1 are neither sent nor computed: that part depends on the platform's kernels, this one
does not. Torch only: no vLLM import, so it is tested on its own and reused by every line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import AllGatherCounts, DropPlan, plan_drops

# What plans one call: `plan_drops`'s signature (weights, ids, keyword arguments) -> DropPlan.
Planner = Callable[..., DropPlan]


@dataclass
class DropStep:
    """The drop step of one MoE layer in one process.

    `gather` is the all-gather of per-expert counts over the ranks whose tokens share the
    experts (None: one source of tokens, or every rank holds the same tokens). Every rank
    must call the step on every MoE call, with zero tokens too, so the collective never
    hangs. `owners` maps each global (physical) expert id to its EP rank; None means vLLM's
    linear placement. `on_plan` sees every plan (counters). `planner` plans each call (the
    state passes one that follows `CapacityState.use_planner`).
    """

    num_experts: int
    ep_size: int
    options: CapacityOptions
    gather: AllGatherCounts | None = None
    rank: int = 0
    owners: torch.Tensor | None = None
    on_plan: Callable[[DropPlan], None] | None = None
    planner: Planner = plan_drops

    def plan(self, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             router_scores: torch.Tensor | None = None) -> DropPlan:
        owners = self.owners
        if owners is not None and owners.device != topk_ids.device:
            owners = self.owners = owners.to(topk_ids.device)
        plan = self.planner(
            topk_weights,
            topk_ids,
            num_experts=self.num_experts,
            ep_size=self.ep_size,
            options=self.options,
            all_gather_counts=self.gather,
            rank=self.rank,
            expert_owner=owners,
            **({} if router_scores is None else {"router_scores": router_scores}),
        )
        if self.on_plan is not None:
            self.on_plan(plan)
        return plan

    def __call__(
        self, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
        router_scores: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, ids) with dropped rows as id -1 and rerouted rows (overflow: reroute,
        which needs `router_scores` [T, E]) with their new expert; fresh tensors."""
        plan = self.plan(topk_weights, topk_ids, router_scores)
        # A call that drops nothing gives the router's output back unchanged. Whether it
        # drops is a device value: select, never branch (a branch would read it back).
        dropped = plan.counts.dropped_rows > 0
        ids = topk_ids if plan.topk_ids is None else plan.topk_ids.to(topk_ids.dtype)
        return (
            torch.where(dropped, plan.weights.to(topk_weights.dtype), topk_weights),
            torch.where(dropped, ids.masked_fill(~plan.keep, -1), topk_ids),
        )

"""Lab-only planners run inside the real engine: the seed PR's rule, option sweeps, a probe.

`installed` (or `install` ... `uninstall`) swaps the planner of every `moe.capacity` drop
step in the current process for `lab_planner` (`CapacityState.use_planner`), and puts the
product planner back at the end, so an engine running in this process (vLLM offline with
VLLM_ENABLE_V1_MULTIPROCESSING=0 and one worker: vLLM's uni executor) plans with the lab
planner meanwhile. The product never imports this module.

* rule `seed`: vllm-ascend PR #1067's rule (routing_sim.seed_fixed_capacity_keep): a fixed
  capacity per (source rank, destination rank) pair, rows over it dropped by position
  (later top-k slots, then later tokens first), weights not renormalised. Sources are the
  simulated EP ranks holding contiguous chunks of the call's tokens. Sized to drop exactly
  as many rows as the product planner (same options, position policy) drops in that call.
* rules `key:<name>`: candidate drop orders before any of them goes into the product: the
  probs policy run on a transformed weight (`KEYS`; all but `scaled` strictly increase with
  the weight within a token, so the protected row is the same; with `scaled` it is the row
  with the largest estimated contribution), the surviving weights then taken from the true
  ones (and renormalised from them when asked).
* `LAB.options`: when set, replaces the options every drop step passes to the planner, so
  one engine (one model load) evaluates many settings in turn. Every option the accuracy
  study varies (ratio, policy, keep_top1, renormalize, min_tokens, simulate_ep_size) is read
  by `plan_drops` alone; the experts and the dispatch never see them.
* `LAB.probe`: every call that drops rows keeps its router output and keep mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.planner.capacity import DropPlan, linear_owners, plan_drops
from ascend_patch.impls.moe.state import CapacityState, PlannerSwap


def _tail_mass(w: torch.Tensor) -> torch.Tensor:
    """Per row: the token's weight lost if this row and every lighter row of the token
    went (the cumulative lost mass), so a token's second row goes only when that costs
    less than another token's first."""
    ordered, order = w.sort(dim=1)
    return torch.empty_like(w).scatter_(1, order, ordered.cumsum(dim=1))


def _within_token_rank(w: torch.Tensor) -> torch.Tensor:
    """Every token's lightest row before any token's second lightest; by weight inside."""
    k = w.shape[1]
    order = w.argsort(dim=1, stable=True)  # ascending
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=w.device)
                                            .expand_as(order).contiguous())
    return rank.to(w.dtype) + w


def _scaled(w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """w times the expert's mean output norm (LAB.scales, calibrated on training text by
    scripts/router_margins.py): an estimate of what the row adds to the token. The layer is
    the planner's call index modulo the layer count: every forward calls the MoE layers
    once each, in order."""
    scales = LAB.scales[LAB.layer_calls % len(LAB.scales)].to(w.device)
    return w * scales[ids.long()]


KEYS = {
    "relative": lambda w, ids: w / w.max(dim=1, keepdim=True).values.clamp(min=1e-30),
    "tail": lambda w, ids: _tail_mass(w),
    "rank": lambda w, ids: _within_token_rank(w),
    "scaled": _scaled,
}
RULES = ("seed", *(f"key:{name}" for name in KEYS))


def key_plan(name: str, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             **kwargs: Any) -> DropPlan:
    from ascend_patch.impls.moe.planner.capacity import _surviving_weights

    options = kwargs["options"]
    key = KEYS[name](topk_weights.float(), topk_ids)
    plan = plan_drops(key, topk_ids,
                      **{**kwargs, "options": options.model_copy(update={"drop_policy": "probs"})})
    plan.weights = _surviving_weights(topk_weights, plan.keep, options.renormalize, None)
    return plan


def seed_plan(topk_weights: torch.Tensor, topk_ids: torch.Tensor, **kwargs: Any) -> DropPlan:
    from ascend_patch.lab.routing_sim import seed_fixed_capacity_keep

    options = kwargs["options"]
    reference = plan_drops(
        topk_weights, topk_ids,
        **{**kwargs, "options": options.model_copy(update={"drop_policy": "position"})},
    )
    if reference.dropped_rows == 0:
        return reference
    num_experts = kwargs["num_experts"]
    num_ranks = options.simulate_ep_size or kwargs["ep_size"]
    ids = topk_ids.long()
    keep, capacity = seed_fixed_capacity_keep(
        ids.cpu(), num_experts=num_experts, ep_size=num_ranks,
        num_drops=reference.dropped_rows,
    )
    keep = keep.to(topk_ids.device)
    owner = linear_owners(num_experts, num_ranks).to(ids.device)
    load_after = torch.bincount(owner[ids[keep]], minlength=num_ranks).cpu()
    return DropPlan(
        keep=keep,
        weights=topk_weights.masked_fill(~keep, 0),
        capacity=capacity,
        routed_rows=reference.routed_rows,
        dropped_rows=int((~keep).sum()),
        budget=reference.budget,
        bin_load_before=reference.bin_load_before,
        bin_load_after=load_after,
    )


@dataclass
class LabState:
    rule: str | None = None
    options: CapacityOptions | None = None
    probe: bool = False
    scales: list[torch.Tensor] | None = None  # per layer, per expert (key:scaled)
    layer_calls: int = 0  # planner calls since the arm began
    calls: list[dict[str, Any]] = field(default_factory=list)  # per planned call
    plans: list[dict[str, torch.Tensor]] = field(default_factory=list)  # probe records
    swap: PlannerSwap | None = None  # while installed

    def reset(self) -> None:
        self.calls, self.plans, self.layer_calls = [], [], 0


LAB = LabState()


def lab_planner(topk_weights: torch.Tensor, topk_ids: torch.Tensor, **kwargs: Any) -> DropPlan:
    if LAB.options is not None:
        kwargs["options"] = LAB.options
    if LAB.rule == "seed":
        plan = seed_plan(topk_weights, topk_ids, **kwargs)
    elif LAB.rule and LAB.rule.startswith("key:"):
        plan = key_plan(LAB.rule[4:], topk_weights, topk_ids, **kwargs)
    else:
        plan = plan_drops(topk_weights, topk_ids, **kwargs)
    before, after = plan.bin_load_before, plan.bin_load_after
    max_after_drop = int(after.max()) if after.numel() else 0
    rerouted = getattr(plan, "bin_rerouted", None)
    if rerouted is not None:  # one process here: this rank's rows are all the rows
        after = after + rerouted.cpu()
    LAB.layer_calls += 1
    LAB.calls.append({
        "rows": plan.routed_rows, "dropped": plan.dropped_rows, "budget": plan.budget,
        "rerouted": int(plan.local_rerouted_rows), "max_after_drop": max_after_drop,
        "capacity": int(plan.capacity), "min_after": int(after.min()) if after.numel() else 0,
        "max_before": int(before.max()), "mean_before": float(before.float().mean()),
        "max_after": int(after.max()), "mean_after": float(after.float().mean()),
    })
    if LAB.probe and plan.dropped_rows:
        LAB.plans.append({"weights": topk_weights.detach().float().cpu(),
                          "ids": topk_ids.detach().cpu(), "keep": plan.keep.cpu()})
    return plan


def install(rule: str | None = None) -> LabState:
    """Route this process's drop steps through `lab_planner`, with `rule` (None: the
    product planner), until `uninstall()`."""
    if rule is not None and rule not in RULES:
        raise ValueError(f"unknown lab rule {rule!r} (known: {', '.join(RULES)})")
    LAB.rule = rule
    if LAB.swap is None or LAB.swap.reverted:  # the session's revert may have reverted it
        LAB.swap = CapacityState.use_planner(lab_planner)
    return LAB


def uninstall() -> None:
    """Give the drop steps the product planner back."""
    if LAB.swap is not None:
        LAB.swap.revert()  # idempotent: the session may have reverted it already
        LAB.swap = None


@contextmanager
def installed(rule: str | None = None) -> Iterator[LabState]:
    """`install(rule)` for the `with` block."""
    lab = install(rule)
    try:
        yield lab
    finally:
        uninstall()

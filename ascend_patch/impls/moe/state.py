"""What one applied `moe.capacity` patch holds in one process.

Made from the patch's context by whichever site needs it first (`ctx.state(CapacityState)`),
shared by the patch's sites, dropped on revert: nothing outlives the patch in module globals.

One thing is process-wide: the drop planner. The product always plans with `plan_drops`; a
study running vLLM's engine in its own process (the lab) cannot reach the states the engine
makes, so it swaps the planner of all of them with `CapacityState.use_planner`, and reverts.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.core.session import SESSION
from ascend_patch.impls.moe.drop_step import DropStep, Planner
from ascend_patch.impls.moe.options import REROUTE_STACKS, CapacityOptions
from ascend_patch.impls.moe.planner.capacity import AllGatherCounts, DropPlan, plan_drops
from ascend_patch.impls.moe.telemetry.stats import CapacityStats


class PlannerSwap:
    """One `CapacityState.use_planner`: in force until `revert()` or the end of its `with`."""

    def __init__(self, planner: Planner) -> None:
        self.planner = planner
        self.reverted = False

    def revert(self) -> None:
        """Put back the planner this swap replaced (idempotent). Swaps revert last first."""
        if self.reverted:
            return
        swaps = CapacityState._swaps
        if swaps[-1] is not self:
            raise RuntimeError("moe.capacity: revert the later planner swap first")
        swaps.pop()
        self.reverted = True

    def __enter__(self) -> PlannerSwap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.revert()


class CapacityState:
    # Swaps in force, the latest last: process-wide (see the module docstring).
    _swaps: ClassVar[list[PlannerSwap]] = []

    @staticmethod
    def planner() -> Planner:
        """The planner in force: `plan_drops` unless a swap is."""
        swaps = CapacityState._swaps
        return swaps[-1].planner if swaps else plan_drops

    @staticmethod
    def use_planner(planner: Planner) -> PlannerSwap:
        """Plan every drop step of this process with `planner` (`plan_drops`'s signature)
        until the returned swap is reverted. Steps built before the swap follow it too."""
        swap = PlannerSwap(planner)
        CapacityState._swaps.append(swap)
        SESSION.on_revert("moe.planner_swaps", CapacityState.revert_swaps)
        return swap

    @staticmethod
    def revert_swaps() -> None:
        """Revert every swap in force, latest first (the session's revert)."""
        while CapacityState._swaps:
            CapacityState._swaps[-1].revert()

    def __init__(self, ctx: PatchContext) -> None:
        from ascend_patch.impls.moe import custom_ops

        self.ctx = ctx
        self.options = options_of(ctx)
        _refuse_reroute_without_scores(ctx, self.options)
        self.stats = CapacityStats(ctx.stats, self.options.log_interval, ctx.flush)
        ctx.on_read(self.stats.fold)  # the plans' device counters, before a report is read
        # Taken-over layers by name (filled at load) and their drop steps (built on the first
        # call, in the plan op, outside any tracing: they hold process groups).
        self.layers: dict[str, Any] = {}
        self.steps: dict[str, DropStep] = {}
        # The all-to-all kernels of the layers that dispatch with it (the all-to-all op runs
        # them by layer name).
        self.kernels: dict[str, Any] = {}
        # Set once this process has compared its config with the rest of its EP group.
        self.config_checked = False
        # Set by the platform adapter that takes layers over: (layer, state) -> DropStep, and
        # the experts class it installs (vLLM's modular kernel), if any.
        self.make_step: Any = None
        self.experts_cls: Any = None
        # vLLM's CPU experts subclassed per class vLLM chose, and the experts objects of the
        # layers they compute, by layer name (adapters/vllm_cpu_experts.py).
        self.cpu_experts_classes: dict[type, type] = {}
        self.cpu_experts: dict[str, Any] = {}
        # The int8 experts class (adapters/vllm_int8_cpu.py), made at its first selection.
        self.int8_experts_cls: Any = None
        # overflow: reroute: (layer name, layer) -> None, set by the adapter that brings the
        # router's scores to the layer's step (adapters/router_scores.py); raises where the
        # layer cannot have them. Called for every layer taken over.
        self.route_scores: Any = None
        custom_ops.bind(self)
        ctx.on_close(lambda: custom_ops.unbind(self))

    def error(self, message: str) -> Exception:
        return self.ctx.error(message)

    @property
    def rerouting(self) -> bool:
        """overflow: reroute: the drop step needs the router's scores (router_scores.py)."""
        return self.options.overflow == "reroute"

    @property
    def upstream(self) -> Any:
        """The vLLM / vllm-ascend symbols the catalog declares for this patch's stack."""
        return self.ctx.upstream

    def add_layer(self, name: str, layer: Any) -> None:
        if self.options.overflow == "reroute":
            if self.route_scores is None:
                raise self.error(f"overflow: reroute: nothing brings the router's scores to "
                                 f"MoE layer {name!r} here; use overflow: drop")
            self.route_scores(name, layer)
        self.layers[name] = layer
        self.steps.pop(name, None)  # a new model in this process: plan for the new layer
        self.kernels.pop(name, None)
        self.stats.layer_taken_over(name)

    def drop_step(
        self,
        layer_name: str,
        *,
        num_experts: int,
        ep_size: int,
        gather: AllGatherCounts | None,
        rank: int,
        owners: torch.Tensor | None,
    ) -> DropStep:
        """A drop step of `layer_name` with this patch's options and counters, planning with
        the planner in force at each call."""
        return DropStep(
            num_experts=num_experts,
            ep_size=ep_size,
            options=self.options,
            gather=gather,
            rank=rank,
            owners=owners,
            on_plan=lambda plan: self.stats.record(layer_name, plan),
            planner=_plan_with_planner_in_force,
        )

    def step(self, layer_name: str) -> DropStep:
        step = self.steps.get(layer_name)
        if step is None:
            layer = self.layers.get(layer_name)
            if layer is None or self.make_step is None:
                raise self.error(f"no drop planner for MoE layer {layer_name!r}")
            step = self.steps[layer_name] = self.make_step(layer, self)
        return step


def _plan_with_planner_in_force(*args: Any, **kwargs: Any) -> DropPlan:
    return CapacityState.planner()(*args, **kwargs)


_ADAPTER = {"vllm": "vllm_modular (vLLM's modular kernel)"}


def _refuse_reroute_without_scores(ctx: PatchContext, options: CapacityOptions) -> None:
    stack = ctx.stack
    if options.overflow != "reroute" or stack is None:
        return
    if (stack.line, stack.platform) in REROUTE_STACKS:
        return
    adapter = _ADAPTER.get(stack.platform, stack.platform)
    raise ctx.error(
        f"overflow: reroute needs the router's scores of every expert, which the adapter "
        f"{adapter} on vLLM {stack.line} does not reach (it sees the top-k only); it works on "
        f"vLLM 0.32, vLLM 0.23's CPU backend and vllm-ascend; use overflow: drop here"
    )


def options_of(ctx: PatchContext) -> CapacityOptions:
    options = ctx.options
    if not isinstance(options, CapacityOptions):
        options = CapacityOptions.model_validate(
            options.model_dump() if hasattr(options, "model_dump") else dict(options)
        )
    return options

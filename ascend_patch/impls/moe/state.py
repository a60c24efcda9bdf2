"""What one applied `moe.capacity` patch holds in one process.

Made from the patch's context by whichever site needs it first (`ctx.state(CapacityState)`),
shared by the patch's sites, dropped on revert: nothing outlives the patch in module globals.
"""

from __future__ import annotations

from typing import Any

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe.drop_step import DropStep
from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.telemetry.stats import CapacityStats


class CapacityState:
    def __init__(self, ctx: PatchContext) -> None:
        from ascend_patch.impls.moe import custom_ops

        self.ctx = ctx
        self.options = options_of(ctx)
        self.stats = CapacityStats(ctx.stats, self.options.log_interval, ctx.flush)
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
        custom_ops.bind(self)
        ctx.on_close(lambda: custom_ops.unbind(self))

    def error(self, message: str) -> Exception:
        return self.ctx.error(message)

    def add_layer(self, name: str, layer: Any) -> None:
        self.layers[name] = layer
        self.steps.pop(name, None)  # a new model in this process: plan for the new layer
        self.kernels.pop(name, None)
        self.stats.layer_taken_over(name)

    def step(self, layer_name: str) -> DropStep:
        step = self.steps.get(layer_name)
        if step is None:
            layer = self.layers.get(layer_name)
            if layer is None or self.make_step is None:
                raise self.error(f"no drop planner for MoE layer {layer_name!r}")
            step = self.steps[layer_name] = self.make_step(layer, self)
        return step


def options_of(ctx: PatchContext) -> CapacityOptions:
    options = ctx.options
    if not isinstance(options, CapacityOptions):
        options = CapacityOptions.model_validate(
            options.model_dump() if hasattr(options, "model_dump") else dict(options)
        )
    return options

"""Replacement factories for vLLM's RMSNorm and SiluAndMul forwards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.ops import kernels


def make_rms_norm_forward(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    stats = ctx.stats
    stats.setdefault("calls", 0)
    stats.setdefault("fallback_calls", 0)

    def forward_native(self, x, residual=None):
        # A variance over part of the hidden size has no torch_npu kernel: keep vLLM's.
        if self.variance_size_override is not None:
            stats["fallback_calls"] += 1
            return original(self, x, residual)
        stats["calls"] += 1
        weight = self.weight.data if (self.pass_weight if residual is None else self.pass_weight_add) else None
        return kernels.rms_norm(x, weight, self.variance_epsilon, residual)

    return forward_native


def make_silu_and_mul_forward(original: Callable[..., Any], ctx: PatchContext) -> Callable[..., Any]:
    stats = ctx.stats
    stats.setdefault("calls", 0)

    def forward_native(x):
        stats["calls"] += 1
        return kernels.silu_and_mul(x)

    return forward_native

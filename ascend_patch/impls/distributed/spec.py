"""Catalog entry of `distributed.cpu_collectives` (pure data: imports pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ascend_patch.core.catalog import (
    Attribute,
    Implementation,
    Site,
    SiteSet,
    ascend_only_lines,
    no_ascend_release,
)

_FACTORIES = "ascend_patch.impls.distributed.cpu_collectives"
_CPU_COMMUNICATOR = "vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"
_CPU_COMMUNICATOR_CLASS = "vllm.distributed.device_communicators.cpu_communicator:CpuCommunicator"


class CpuCollectivesOptions(BaseModel):
    """Options of `distributed.cpu_collectives`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fuse_lists: StrictBool = Field(
        True,
        description="all_gatherv of a list of tensors (hidden states, router logits, top-k ids): "
        "pack every tensor's rows as bytes into one tensor and run one collective instead of one "
        "per tensor. Needs dim 0, what vLLM's MoE dispatch uses; other dims run one per tensor.",
    )
    reduce_scatter_mode: Literal["reduce_scatter", "all_reduce"] = Field(
        "reduce_scatter",
        description="reduce_scatterv: `reduce_scatter` pads every rank's chunk to the largest and "
        "runs one reduce_scatter; `all_reduce` sums the whole tensor on every rank and slices "
        "(more traffic; for backends without reduce_scatter).",
    )

IMPLEMENTATIONS = {
    "distributed.cpu_collectives": Implementation(
        name="distributed.cpu_collectives",
        summary=(
            "all_gatherv / reduce_scatterv for vLLM's CPU communicator over gloo "
            "(pad to the largest rank, one collective, slice)."
        ),
        why=(
            "vLLM's CpuCommunicator (0.23 to 0.34) inherits DeviceCommunicatorBase.all_gatherv and "
            "reduce_scatterv, which raise NotImplementedError (vLLM issue #57837). Data "
            "parallel + expert parallel MoE on CPU dispatches through "
            "AgRsAll2AllManager.dispatch_router_logits / dispatch (all_gatherv on the DP "
            "group) and combine (reduce_scatterv), so DP>1 with --enable-expert-parallel "
            "fails at the first MoE layer without these."
        ),
        site_sets=(
            SiteSet(
                lines=("0.23", "0.32", "0.33", "0.34"),
                sites=(
                    Site(
                        target=f"{_CPU_COMMUNICATOR}.all_gatherv",
                        signature="(self, input_, dim=…, sizes=…)",
                        factory=f"{_FACTORIES}:make_all_gatherv",
                        role="all_gatherv",
                    ),
                    Site(
                        target=f"{_CPU_COMMUNICATOR}.reduce_scatterv",
                        signature="(self, input_, dim=…, sizes=…)",
                        factory=f"{_FACTORIES}:make_reduce_scatterv",
                        role="reduce_scatterv",
                    ),
                ),
                # What the replacements read on the communicator (`self`).
                reads=tuple(
                    Attribute(f"{_CPU_COMMUNICATOR_CLASS}.{name}", "the group to run on")
                    for name in ("device_group", "cpu_group", "rank_in_group", "world_size")
                ),
            ),
            SiteSet(
                lines=("0.13", "0.18", "0.23"),
                platform="ascend",
                unsupported="the CPU communicator is vLLM's CPU platform's; vllm-ascend "
                "communicates over HCCL with its own communicator",
            ),
            no_ascend_release(),
            ascend_only_lines(),
        ),
        options=CpuCollectivesOptions,
    ),
}

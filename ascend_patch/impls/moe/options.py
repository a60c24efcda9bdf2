"""Options of `moe.capacity`, validated before anything is patched."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

# The (vLLM line, platform)s whose adapters bring the router's scores to the drop step, which
# `overflow: reroute` needs (adapters/router_scores.py); elsewhere it is refused at load.
REROUTE_STACKS = frozenset({("0.32", "vllm"), ("0.23", "vllm"), ("0.23", "ascend"),
                            ("0.18", "ascend"), ("0.13", "ascend")})


class CapacityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    drop_token_ratio: float = Field(
        0.0,
        ge=0,
        le=0.5,
        allow_inf_nan=False,
        strict=True,
        description=(
            "Share r of all routed (token, expert) rows that may be dropped per MoE call, "
            "in [0, 0.5]. The per-bin capacity is the smallest one that drops at most "
            "floor(r * rows). 0 keeps every row: bit for bit our dropless path; against vLLM's "
            "stock CPU kernel at most 0.0078 max abs difference (bf16), same greedy tokens."
        ),
    )
    granularity: Literal["rank", "expert"] = Field(
        "rank",
        description=(
            "What is capped: 'rank' caps the rows each EP rank receives (what sets the step "
            "time); 'expert' caps every expert separately."
        ),
    )
    drop_policy: Literal["probs", "position"] = Field(
        "probs",
        description=(
            "Which rows of an over-capacity bin go: 'probs' drops the lowest routing weights "
            "first; 'position' drops later top-k slots and later tokens first (the behaviour "
            "of vllm-ascend PR #1067)."
        ),
    )
    overflow: Literal["drop", "reroute"] = Field(
        "drop",
        description=(
            "What happens to a row over its bin's capacity: 'drop' skips it; 'reroute' "
            "sends it to the same token's best-scored expert outside its top-k whose bin is "
            "below the capacity, within the room (split between DP ranks by their overflow "
            "rows), and drops it only where there is none. Never raises a bin above the "
            "capacity. Needs the router's scores: vLLM 0.32, vLLM 0.23's CPU backend and "
            "vllm-ascend have them; elsewhere the patch is refused at load. Weight: the new "
            "expert's score scaled as the router scaled the token's top-k (renormalize "
            "rescales as for drop)."
        ),
    )
    keep_top1: StrictBool = Field(
        True,
        description=(
            "Never drop a token's highest-weight row, so every token keeps at least one "
            "expert. May leave the drops below the budget."
        ),
    )
    renormalize: StrictBool = Field(
        False,
        description=("Rescale the surviving weights of a token so they sum to its original total."),
    )
    min_tokens: StrictInt = Field(
        256,
        ge=0,
        description=(
            "Calls with fewer tokens than this (counted over all EP ranks) drop nothing: "
            "small batches (decode) gain little and lose accuracy."
        ),
    )
    simulate_ep_size: StrictInt | None = Field(
        None,
        ge=1,
        description=(
            "Compute capacities as if experts were spread over this many EP ranks (to study "
            "dropping on one device). None uses the real EP size."
        ),
    )
    backend: Literal["auto", "torch", "npu", "vllm_cpu"] = Field(
        "auto",
        description=(
            "Expert compute: 'vllm_cpu' (vLLM 0.32's own CPU fused-MoE kernel on its "
            "prepacked weights, handed only the kept rows of local experts), 'torch' "
            "(per-expert matmuls, any device), 'npu' (torch_npu grouped-matmul ops). 'auto' "
            "picks 'vllm_cpu' where vLLM built the layer for its CPU experts, 'npu' for NPU "
            "tensors and 'torch' otherwise."
        ),
    )
    dispatch: Literal["auto", "allgather", "all_to_all"] = Field(
        "auto",
        description=(
            "How rows reach the EP rank owning their expert when ranks hold different tokens. "
            "'allgather': vLLM's path (every token all-gathered to every rank, the full "
            "output reduce-scattered; drops save compute only). 'all_to_all': each kept "
            "(token, expert) row is sent only to its expert's rank and its weighted result "
            "sent back (two uneven all-to-alls on the EP group): dropped rows are never "
            "sent. 'auto': all_to_all when DP > 1 with expert parallelism, else vLLM's path. "
            "Runs eager or under torch.compile (one opaque custom op); with CUDA graphs, PCP "
            "or EPLB, 'auto' keeps vLLM's path and 'all_to_all' is refused."
        ),
    )
    fused_mc2_overflow: StrictBool = Field(
        True,
        description=(
            "vllm-ascend with enable_fused_mc2: 1 only: on every eager FUSED_MC2 step, count "
            "per layer and receiving EP rank the (token, expert) rows past "
            "mega_moe_max_tokens, which dispatch_ffn_combine truncates silently (report, "
            "/metrics, a warning per log interval). Costs one all-gather of E int64 over the "
            "EP group and one host read per MoE layer call; works with drop_token_ratio 0."
        ),
    )
    log_interval: StrictInt = Field(
        0,
        ge=0,
        description="MoE calls between two drop-statistics log lines; 0 switches logging off.",
    )

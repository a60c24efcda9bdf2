"""Synthetic DeepSeek-V3-shaped routing for benchmarks and the layer A/B.

`deepseek_routing` reproduces the router of DeepSeek-V3 (arXiv 2412.19437, section 2.1.2, and
the model's config.json: n_group 8, topk_group 4, num_experts_per_tok 8): sigmoid
scores, noaux_tc bias-corrected grouped top-k (8 groups, the best 4 kept by the sum of their
top-2 corrected scores), top-8 experts among the kept groups, and the chosen experts'
uncorrected sigmoid scores normalised to sum to 1 (norm_topk_prob).

Real routers are not balanced: NVIDIA's TensorRT-LLM tech blog 4 ("Scaling Expert Parallelism
in TensorRT-LLM, Part 1", https://nvidia.github.io/TensorRT-LLM/blogs/tech_blog/
blog4_Scaling_Expert_Parallelism_in_TensorRT-LLM.html) reports a per-rank max/mean load of
about 2.5 for DeepSeek-R1 at EP32 without a balancer. The `skew` knob adds a per-expert
logit bias `scale * hotness`, where `hotness` makes a few EP ranks' experts hot (plus a
little per-expert spread), and `calibrate_skew` bisects `scale` until the achieved per-rank
max/mean at the given EP size is within a tolerance of the target. Everything is
deterministic by seed.

`seed_fixed_capacity_keep` is the drop policy that vllm-ascend PR #1067 shipped
(https://github.com/vllm-project/vllm-ascend/pull/1067): one fixed capacity per (source rank, destination rank) pair,
rows over it dropped by position (later k-slots, then later tokens first), weights not
renormalised. For a fair comparison it is sized to drop the same number of rows as the
ratio-based planner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ascend_patch.impls.moe.planner.capacity import water_level

# DeepSeek-V3 router shape.
NUM_EXPERTS = 256
TOP_K = 8
NUM_GROUPS = 8
TOPK_GROUPS = 4

SKEWS = {"balanced": 1.0, "moderate": 1.5, "r1": 2.5}

# Logits of the simulated router: sigmoid(LOGIT_SCALE * (z - LOGIT_SHIFT)), z ~ N(0, 1).
LOGIT_SCALE = 3.0
LOGIT_SHIFT = 2.3


@dataclass
class Routing:
    topk_weights: torch.Tensor  # float32 [T, k], rows sum to 1
    topk_ids: torch.Tensor  # int64 [T, k]
    scale: float  # skew bias scale used
    max_over_mean: float  # per-rank max/mean load at the calibration EP size
    ep_size: int


def rank_loads(topk_ids: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """int64 [ep_size]: routed rows each EP rank receives (experts contiguous per rank)."""
    counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)
    return counts.view(ep_size, num_experts // ep_size).sum(dim=1)


def max_over_mean(load: torch.Tensor) -> float:
    load = load.double()
    return float(load.max() / load.mean()) if load.numel() and load.sum() > 0 else 1.0


def hotness(num_experts: int, ep_size: int, seed: int, hot_ranks: int = 2) -> torch.Tensor:
    """float32 [E]: which experts the skew makes popular.

    The experts of `hot_ranks` EP ranks (picked by seed) get a rank-level boost, the hottest
    1.0, the next ones less, so there is one bottleneck rank and a runner-up, as in the
    published per-layer imbalance; every expert also gets a small random spread.
    """
    gen = torch.Generator().manual_seed(seed + 7919)
    per_rank = torch.zeros(ep_size)
    hot = torch.randperm(ep_size, generator=gen)[: max(min(hot_ranks, ep_size), 0)]
    for i, r in enumerate(hot.tolist()):
        per_rank[r] = 1.0 / (1.0 + 0.5 * i)
    spread = 0.25 * torch.randn(num_experts, generator=gen)
    return per_rank.repeat_interleave(num_experts // ep_size) + spread


def deepseek_routing_at_scale(
    num_tokens: int,
    scale: float,
    *,
    num_experts: int = NUM_EXPERTS,
    top_k: int = TOP_K,
    num_groups: int = NUM_GROUPS,
    topk_groups: int = TOPK_GROUPS,
    ep_size: int = 16,
    seed: int = 0,
    hot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights float32 [T, k], topk_ids int64 [T, k]) for one skew bias scale."""
    gen = torch.Generator().manual_seed(seed)
    # Affinity logits: standard normal "z" per (token, expert), shifted so that the top-8
    # of a token land in sigmoid's non-saturated region and spread by LOGIT_SCALE. With
    # plain N(0, 1) logits every chosen score is ~0.9 and the normalised weights are all
    # ~1/k, which no trained router produces; with these the top-1 weight averages ~0.2
    # and the k-th ~0.06 (see `weight_profile`). This is an assumption of the simulation.
    z = torch.randn(num_tokens, num_experts, generator=gen)
    # noaux_tc's e_score_correction_bias: small, learned to balance; here random and fixed.
    correction = 0.001 * torch.randn(num_experts, generator=gen)
    if hot is None:
        hot = hotness(num_experts, ep_size, seed)
    scores = torch.sigmoid(LOGIT_SCALE * (z + scale * hot - LOGIT_SHIFT))
    choice = scores + correction
    per_group = choice.view(num_tokens, num_groups, num_experts // num_groups)
    group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(dim=-1)
    kept_groups = group_score.topk(topk_groups, dim=-1).indices
    group_mask = torch.zeros(num_tokens, num_groups, dtype=torch.bool)
    group_mask.scatter_(1, kept_groups, True)
    expert_mask = group_mask.repeat_interleave(num_experts // num_groups, dim=1)
    masked = choice.masked_fill(~expert_mask, float("-inf"))
    # vLLM routers emit the top-k unsorted (cpu_router.py `_grouped_topk`: sorted=False), so
    # the slot order ("position") is whatever torch.topk leaves, not the weight order.
    topk_ids = masked.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, topk_ids)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.float(), topk_ids.long()


def calibrate_skew(
    num_tokens: int,
    target: float,
    *,
    ep_size: int = 16,
    num_experts: int = NUM_EXPERTS,
    top_k: int = TOP_K,
    seed: int = 0,
    tolerance: float = 0.05,
    max_steps: int = 40,
) -> Routing:
    """Routing whose per-rank max/mean at ep_size is within tolerance of target.

    A target at or below the unskewed routing's own imbalance returns scale 0 (the router's
    natural, nearly balanced load). Otherwise bisect the bias scale; the achieved value is
    reported, and a ValueError is raised if the tolerance cannot be met.
    """
    kwargs = {"num_experts": num_experts, "top_k": top_k, "ep_size": ep_size, "seed": seed}
    num_groups = NUM_GROUPS if num_experts % NUM_GROUPS == 0 else 1
    kwargs["num_groups"] = num_groups
    kwargs["topk_groups"] = min(TOPK_GROUPS, num_groups)
    hot = hotness(num_experts, ep_size, seed)

    def achieved(scale: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        weights, ids = deepseek_routing_at_scale(num_tokens, scale, hot=hot, **kwargs)
        return max_over_mean(rank_loads(ids, num_experts, ep_size)), weights, ids

    value, weights, ids = achieved(0.0)
    if value >= target - tolerance:
        return Routing(weights, ids, 0.0, value, ep_size)
    low, high = 0.0, 1.0
    while True:
        value, weights, ids = achieved(high)
        if value >= target:
            break
        low, high = high, high * 2
        if high > 64:
            raise ValueError(f"skew target {target} unreachable (got {value:.3f} at scale {high})")
    for _ in range(max_steps):
        if abs(value - target) <= tolerance:
            return Routing(weights, ids, high, value, ep_size)
        mid = (low + high) / 2
        value_mid, w_mid, i_mid = achieved(mid)
        if abs(value_mid - target) <= tolerance:
            return Routing(w_mid, i_mid, mid, value_mid, ep_size)
        if value_mid < target:
            low = mid
        else:
            high, value, weights, ids = mid, value_mid, w_mid, i_mid
    raise ValueError(f"skew target {target}: bisection ended at {value:.3f} (scale {high})")


def deepseek_routing(
    num_tokens: int,
    skew: float | str = "balanced",
    *,
    ep_size: int = 16,
    num_experts: int = NUM_EXPERTS,
    top_k: int = TOP_K,
    seed: int = 0,
) -> Routing:
    """DeepSeek-V3-shaped routing of num_tokens tokens at a target per-rank max/mean.

    skew: a number (target max/mean at ep_size) or one of SKEWS' names.
    """
    target = SKEWS[skew] if isinstance(skew, str) else float(skew)
    return calibrate_skew(
        num_tokens, target, ep_size=ep_size, num_experts=num_experts, top_k=top_k, seed=seed
    )


def source_ranks(num_tokens: int, num_sources: int) -> torch.Tensor:
    """int64 [T]: the source (attention/DP) rank holding each token, contiguous equal chunks."""
    return torch.div(
        torch.arange(num_tokens) * num_sources, max(num_tokens, 1), rounding_mode="floor"
    )


def seed_fixed_capacity_keep(
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    ep_size: int,
    num_drops: int,
    num_sources: int | None = None,
) -> tuple[torch.Tensor, int]:
    """(keep bool [T, k], capacity): PR #1067's fixed per-(source, destination) capacity.

    Each source rank holds a contiguous chunk of the tokens and may send at most `capacity`
    rows to each destination rank; rows over it are dropped by position, later k-slots and
    later tokens first. The PR derived the capacity from a fixed buffer size; here it is the
    smallest one (the water level over the S x R pair loads) that drops at most `num_drops`
    rows, and the remaining `num_drops - drops(capacity)` rows are dropped from the fullest
    pairs (one each, capacity - 1 for them) so the count matches exactly.
    """
    num_tokens, top_k = topk_ids.shape
    num_sources = num_sources or ep_size
    experts_per_rank = num_experts // ep_size
    dest = torch.div(topk_ids.long(), experts_per_rank, rounding_mode="floor")  # [T, k]
    src = source_ranks(num_tokens, num_sources).unsqueeze(1).expand_as(dest)
    pair = (src * ep_size + dest).reshape(-1)
    pair_load = torch.bincount(pair, minlength=num_sources * ep_size)
    num_drops = min(int(num_drops), int(pair_load.sum()))
    capacity = water_level(pair_load, torch.zeros_like(pair_load), num_drops)
    pair_cap = pair_load.clamp(max=capacity)
    extra = num_drops - int((pair_load - pair_cap).sum())
    if extra > 0:
        # Pairs at the capacity, fullest first (then lowest index): one more row each.
        full = torch.nonzero(pair_load >= capacity).squeeze(1)
        order = torch.sort(-pair_load[full], stable=True).indices
        pair_cap[full[order[:extra]]] -= 1
    # Position order inside a pair: slot-major (slot ascending, then token ascending).
    rows = torch.arange(num_tokens * top_k)
    position = (rows % top_k) * num_tokens + torch.div(rows, top_k, rounding_mode="floor")
    key = pair * (num_tokens * top_k) + position
    order = torch.sort(key).indices
    sorted_pair = pair[order]
    start = torch.cumsum(pair_load, 0) - pair_load
    rank_in_pair = torch.arange(rows.numel()) - start[sorted_pair]
    keep = torch.empty(rows.numel(), dtype=torch.bool)
    keep[order] = rank_in_pair < pair_cap[sorted_pair]
    return keep.view(num_tokens, top_k), capacity


def weight_profile(topk_weights: torch.Tensor) -> dict[str, float]:
    """Mean of the sorted normalised top-k weights: how peaked the simulated router is."""
    ordered = topk_weights.sort(dim=1, descending=True).values.mean(dim=0)
    return {"mean_top1": float(ordered[0]), "mean_topk_last": float(ordered[-1]),
            "mean_sorted": [round(float(v), 4) for v in ordered]}

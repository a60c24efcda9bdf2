"""A MoE-dominated Mixtral-style model with random weights and a router whose skew is set.

For the engine-level benchmark (scripts/bench_engine.py): experts must be most of a prefill,
and the router must load one EP rank more than the other by a chosen, reproducible amount.
Nothing is trained; the skew is constructed:

* every token's residual stream carries a constant channel (hidden dimension 0): the
  embeddings hold `CONSTANT` there and no layer writes to it (row 0 of every o_proj and
  expert w2 is zero), so after the RMSNorm in front of the router that channel is close to
  the same value for every token;
* the router's column 0 turns that channel into a per-expert logit bias `scale * hot`
  (`routing_sim.hotness`: the experts of one EP rank hot, plus a small per-expert spread);
  its other columns are random, giving each token a standard-normal logit per expert.

`calibrate_gate` bisects `scale` until the per-rank max/mean of the top-k routing of
`synthetic_hidden` (what the router sees in front of layer 0: a normalised embedding) is
within a tolerance of the target. Deeper layers see slightly different states; the engine's
own reports give the achieved value, which the benchmark prints.

The target: NVIDIA reports a per-rank max/mean of about 2.5 for DeepSeek-R1 at EP32 without a
balancer (routing_sim's docstring). Two EP ranks cannot show 2.5 (the most is 2.0, every row
on one rank), so `equivalent_skew` keeps what sets the step instead: the hottest rank's load
over the mean load of the other ranks (2.5 * 31 / 29.5 = 2.63 at EP32), which at EP2 is a
max/mean of 1.449.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ascend_patch.lab.routing_sim import hotness, max_over_mean

R1_MAX_OVER_MEAN = 2.5
R1_EP_SIZE = 32
CONSTANT = 1.0  # the constant channel's value in every embedding
RMS_EPS = 1e-6


def equivalent_skew(max_over_mean_: float, ep_from: int, ep_to: int) -> float:
    """The max/mean at `ep_to` ranks whose hottest rank carries the same multiple of the
    other ranks' mean load as `max_over_mean_` does at `ep_from` ranks."""
    if not 1.0 <= max_over_mean_ < ep_from:
        raise ValueError(f"max/mean {max_over_mean_} is outside [1, {ep_from}) at EP{ep_from}")
    hot_over_rest = max_over_mean_ * (ep_from - 1) / (ep_from - max_over_mean_)
    return ep_to * hot_over_rest / (hot_over_rest + ep_to - 1)


@dataclass(frozen=True)
class ModelShape:
    """A Mixtral config small everywhere but in the experts."""

    hidden: int = 128
    intermediate: int = 1024  # per expert
    experts: int = 16
    top_k: int = 2
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512

    def config(self) -> dict:
        return {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "num_local_experts": self.experts,
            "num_experts_per_tok": self.top_k, "hidden_act": "silu", "rope_theta": 10000.0,
            "vocab_size": self.vocab, "max_position_embeddings": 2048,
            "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False, "rms_norm_eps": RMS_EPS, "initializer_range": 0.02,
        }


@dataclass(frozen=True)
class Gate:
    weight: torch.Tensor  # float32 [E, H]
    scale: float
    achieved: float  # per-rank max/mean on the calibration input
    target: float
    ep_size: int


def synthetic_hidden(tokens: int, hidden: int, seed: int) -> torch.Tensor:
    """float32 [T, H]: RMS-normalised embeddings (constant channel + standard normal rest)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    x[:, 0] = CONSTANT
    return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + RMS_EPS)


def gate_weight(hidden: int, hot: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """float32 [E, H]: column 0 maps the constant channel (about 1 after the norm) to the
    bias scale * hot; the rest gives each token a standard-normal logit per expert."""
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(hot.numel(), hidden, generator=gen) / (hidden - 1) ** 0.5
    weight[:, 0] = scale * hot / CONSTANT
    return weight


def rank_max_over_mean(hidden_states: torch.Tensor, weight: torch.Tensor, top_k: int,
                       ep_size: int) -> float:
    """Per-rank max/mean of Mixtral's routing (top-k of the logits; the softmax keeps the
    order), experts contiguous per rank as vLLM places them."""
    ids = (hidden_states @ weight.T).topk(top_k, dim=1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=weight.shape[0])
    return max_over_mean(counts.view(ep_size, -1).sum(dim=1))


def calibrate_gate(shape: ModelShape, target: float, *, ep_size: int = 2, seed: int = 0,
                   tokens: int = 4096, tolerance: float = 0.02, steps: int = 40) -> Gate:
    """The gate whose routing of synthetic_hidden(tokens, H, seed) has a per-rank max/mean
    within `tolerance` of `target` (ValueError if no bias scale up to 64 reaches it)."""
    if shape.experts % ep_size:
        raise ValueError(f"{shape.experts} experts do not split over {ep_size} EP ranks")
    states = synthetic_hidden(tokens, shape.hidden, seed)
    hot = hotness(shape.experts, ep_size, seed, hot_ranks=1)

    def at(scale: float) -> tuple[float, torch.Tensor]:
        weight = gate_weight(shape.hidden, hot, scale, seed)
        return rank_max_over_mean(states, weight, shape.top_k, ep_size), weight

    low, high = 0.0, 1.0
    value, weight = at(0.0)
    if value >= target - tolerance:
        return Gate(weight, 0.0, value, target, ep_size)
    while (value := at(high)[0]) < target:
        low, high = high, 2 * high
        if high > 64:
            raise ValueError(f"max/mean {target} unreachable at EP{ep_size} (got {value:.3f})")
    for _ in range(steps):
        mid = (low + high) / 2
        value, weight = at(mid)
        if abs(value - target) <= tolerance:
            return Gate(weight, mid, value, target, ep_size)
        low, high = (mid, high) if value < target else (low, mid)
    raise ValueError(f"max/mean {target}: bisection ended at {value:.3f} (scale {mid})")


def model_weights(shape: ModelShape, gate: Gate, seed: int) -> dict[str, torch.Tensor]:
    """bf16 weights in vLLM's Mixtral checkpoint names; the router of every layer is `gate`."""
    gen = torch.Generator().manual_seed(seed + 2)
    h, i, head = shape.hidden, shape.intermediate, shape.hidden // shape.heads

    def normal(*size: int, std: float) -> torch.Tensor:
        return torch.randn(*size, generator=gen) * std

    def zero_row0(t: torch.Tensor) -> torch.Tensor:
        t[0] = 0.0  # nothing is written to the constant channel
        return t

    embed = normal(shape.vocab, h, std=1.0)
    embed[:, 0] = CONSTANT
    weights = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(h),
               "lm_head.weight": normal(shape.vocab, h, std=h ** -0.5)}
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        weights |= {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": normal(shape.heads * head, h, std=h ** -0.5),
            p + "self_attn.k_proj.weight": normal(shape.kv_heads * head, h, std=h ** -0.5),
            p + "self_attn.v_proj.weight": normal(shape.kv_heads * head, h, std=h ** -0.5),
            p + "self_attn.o_proj.weight": zero_row0(normal(h, shape.heads * head, std=0.02)),
            p + "block_sparse_moe.gate.weight": gate.weight.clone(),
        }
        for e in range(shape.experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            weights |= {q + "w1.weight": normal(i, h, std=h ** -0.5),
                        q + "w3.weight": normal(i, h, std=h ** -0.5),
                        q + "w2.weight": zero_row0(normal(h, i, std=0.02))}
    return {name: t.to(torch.bfloat16).contiguous() for name, t in weights.items()}


def write_model(out: Path, shape: ModelShape, target: float, *, ep_size: int = 2,
                seed: int = 0) -> dict:
    """Write config.json, model.safetensors and the tiny WordLevel tokenizer to `out`;
    returns what was built (shape, target, bias scale, max/mean on the calibration input)."""
    from safetensors.torch import save_file

    from ascend_patch.harness.tiny_model import _write_tokenizer

    gate = calibrate_gate(shape, target, ep_size=ep_size, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(shape.config(), indent=2))
    save_file(model_weights(shape, gate, seed), str(out / "model.safetensors"))
    _write_tokenizer(out)
    return {"shape": asdict(shape), "seed": seed, "ep_size": ep_size, "target": target,
            "bias_scale": gate.scale, "calibration_max_over_mean": gate.achieved}

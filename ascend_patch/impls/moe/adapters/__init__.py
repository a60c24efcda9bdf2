"""One module per upstream code shape that `moe.capacity` hooks (spec.py's factories):
vLLM's modular kernel, vLLM 0.23's CPU monolithic entry, vllm-ascend 0.23.0.post1."""

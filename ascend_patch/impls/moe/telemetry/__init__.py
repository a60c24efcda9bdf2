"""What `moe.capacity` counts (process report) and exports (vLLM's /metrics)."""

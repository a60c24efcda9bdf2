"""Which routed rows to drop: torch only, no vLLM, the same on every line and platform."""

"""Capacity-aware fused MoE (`moe.capacity`): drop planner, options and compute backends."""

"""Implementations the catalog names: device ops, distributed collectives, fused MoE."""

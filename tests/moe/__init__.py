"""Tests of moe.capacity: planner, backends, multi-rank."""

"""Capacity-aware fused MoE (`moe.capacity`), by role. Each layer imports only the ones
listed before it (tests/moe/test_layout.py), so none of them depends on an upstream adapter:

    options.py, schemes.py, spec_releases.py, spec.py
                          the options and the catalog entry (what `validate` reads): the
                          quantized schemes taken over, older vllm-ascend releases' site sets
    planner/              which rows to drop: the water-level planner and its analytic limit
    drop_step.py          the planner on one layer's router output (platform-free)
    experts/              the expert compute backends (torch, torch_npu)
    custom_ops.py         the opaque torch ops (plan, experts, all-to-all) the compiled graph calls
    telemetry/            drop and traffic counters, their /metrics series
    transport/            token-once all-to-all dispatch and combine of the kept rows
    state.py              what one applied patch holds in a process; the planner in force
    adapters/             one module per upstream code shape hooked (spec.py's factories)
"""

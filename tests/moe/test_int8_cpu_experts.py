"""moe.capacity on vLLM 0.32's W8A8 int8 MoE (adapters/vllm_int8_cpu.py), layer level.

The e2e run (tests/e2e/test_int8_moe_server.py) serves an int8 model with drops; here the
experts are held against vLLM's REAL CPUExpertsInt8 kernel, and the selection and drop step
against vLLM's real int8 oracle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe.options import CapacityOptions

from tests.stack import LINE

# The int8 takeover is declared for vLLM 0.32 only (the 0.23 line has no such site set).
pytestmark = [pytest.mark.contract,
              pytest.mark.skipif(LINE != "0.32", reason="int8 MoE sites are declared for 0.32")]

REPO = Path(__file__).resolve().parents[2]
# Measured against the real kernel (int8_kernel_child.py, 48 tokens, top-2 of 8 experts,
# H=256, I=128): max |ours - kernel| = 0.0044 for outputs up to 0.69 (0.64 %), 9 % of the
# values differ at all. The kernel's silu uses an approximate reciprocal (rcp14): a last-bit
# change of the bf16 intermediate can move one requantised value by one step.
TOLERANCE = 0.01  # of the largest output magnitude


def _context(ratio: float) -> PatchContext:
    return PatchContext("moe", "moe.capacity", CapacityOptions(drop_token_ratio=ratio,
                                                               min_tokens=0))


def test_int8_experts_match_vllms_real_cpu_int8_kernel_and_skip_dropped_rows():
    """r = 0: our experts give the real CPUExpertsInt8 output within TOLERANCE. Dropped
    rows (id -1): the kernel's output with those rows at weight 0, and they are never
    quantised (two quantisations per computed row, none for a dropped one). The kernel
    itself refuses id -1: the reason it is replaced."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "tests/moe/int8_kernel_child.py")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    if proc.returncode == -signal.SIGILL:
        pytest.skip("vLLM's _C kernel library needs AVX512-BF16/VNNI instructions this CPU "
                    "does not execute")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    got = json.loads(line[len("RESULT "):])
    bound = TOLERANCE * got["stock_max"]
    assert got["stock_max"] > 0.1
    assert got["dropless_max_diff"] <= bound, got
    assert got["dropped_max_diff"] <= bound, got
    assert got["rows_dropped"] > 0
    assert got["rows_quantised_dropless"] == 2 * got["rows"]
    assert got["rows_quantised_dropped"] == 2 * (got["rows"] - got["rows_dropped"])
    assert got["kernel_refuses_minus_one"].startswith(
        "Expected offsets[num_token_blocks] == numel"), got


def _int8_weights(experts: int, hidden: int, inter: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-127, 128, (experts, 2 * inter, hidden), dtype=torch.int8, generator=gen),
            torch.randint(-127, 128, (experts, hidden, inter), dtype=torch.int8, generator=gen),
            torch.rand(experts, 2 * inter, 1, generator=gen) * 1e-3,  # compressed-tensors shape
            torch.rand(experts, hidden, generator=gen) * 1e-3)


def test_int8_forward_splits_over_expert_parallel_ranks_exactly():
    """expert_map honoured: the two EP halves add up to the whole, bit for bit (top-2 rows
    sum in slot order in float32, as the kernel sums them)."""
    from ascend_patch.impls.moe.experts.int8_backend import moe_forward_int8

    w13, w2, s13, s2 = _int8_weights(8, 64, 32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 64, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(20)])
    weights = torch.rand(20, 2, generator=gen)
    whole = moe_forward_int8(x, w13, w2, s13, s2, weights, ids)
    halves = []
    for rank in (0, 1):
        expert_map = torch.full((8,), -1, dtype=torch.int32)
        expert_map[4 * rank:4 * rank + 4] = torch.arange(4, dtype=torch.int32)
        local = slice(4 * rank, 4 * rank + 4)
        halves.append(moe_forward_int8(x, w13[local], w2[local], s13[local], s2[local],
                                       weights, ids, expert_map=expert_map))
    # Each token's two rows: on one rank both, or one per rank (then bf16 + bf16 in float).
    assert torch.equal((halves[0].float() + halves[1].float()).to(torch.bfloat16), whole)


def _moe_config(backend: str = "auto"):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    return FusedMoEConfig(
        num_experts=8, experts_per_token=2, hidden_dim=64, intermediate_size=32,
        num_local_experts=8, num_logical_experts=8, activation=MoEActivation.SILU,
        device="cpu", routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
        in_dtype=torch.bfloat16, moe_backend=backend)


def test_selection_on_this_cpu_stock_fails_ours_gives_the_int8_experts():
    from vllm.model_executor.layers.fused_moe.oracle import int8 as oracle

    from ascend_patch.impls.moe.adapters import vllm_int8_cpu

    original = oracle.select_int8_moe_backend
    if not vllm_int8_cpu.state_of(_context(0.0)).upstream.current_platform.is_cpu():
        pytest.skip("the CPU build of vLLM selects the CPU int8 experts")
    if not torch.cpu._is_amx_tile_supported():
        # What an int8 model hits on this machine without the patch.
        with pytest.raises(NotImplementedError, match="No Int8 MoE backend supports"):
            original(_moe_config())
    ctx = _context(0.1)
    try:
        select = vllm_int8_cpu.make_select_int8_moe_backend(original, ctx)
        backend, cls = select(_moe_config())
        assert backend == oracle.Int8MoeBackend.CPU
        assert cls is vllm_int8_cpu.state_of(ctx).int8_experts_cls
        assert cls.ascend_patch_int8 is True
        # An explicit moe_backend is the user's: vLLM's own selection answers.
        with pytest.raises(ValueError, match="not supported for Int8 MoE"):
            select(_moe_config("flashinfer_cutlass"))
    finally:
        ctx.close()


def test_the_drop_step_runs_only_for_layers_whose_experts_are_ours():
    """Dropped rows reach the kernel as id -1 and weight 0; r = 0 hands vLLM's router
    output through unchanged; a method whose experts are vLLM's keeps every row."""
    from ascend_patch.impls.moe.adapters import vllm_int8_cpu

    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(40, 2, generator=gen).softmax(dim=1)
    ids = torch.randint(0, 8, (40, 2), generator=gen, dtype=torch.int32)
    ids[:, 0] = 7  # one hot expert: something to drop
    for ratio in (0.0, 0.3):
        ctx = _context(ratio)
        try:
            state = vllm_int8_cpu.state_of(ctx)
            ours = vllm_int8_cpu.int8_experts_class(state)
            parallel = SimpleNamespace(use_ep=False, ep_size=1, ep_rank=0, dp_size=1, dp_rank=0,
                                       tp_size=1, tp_rank=0, pcp_size=1,
                                       is_sequence_parallel=False)
            layer = SimpleNamespace(layer_name="model.layers.0.mlp.experts",
                                    global_num_experts=8, expert_map=None,
                                    moe_config=SimpleNamespace(moe_parallel_config=parallel))
            state.add_layer(layer.layer_name, layer)
            seen = []
            apply = vllm_int8_cpu.make_apply(
                lambda self, layer, x, w, i, *rest: seen.append((w, i)), ctx)
            mine = SimpleNamespace(moe_kernel=SimpleNamespace(fused_experts=ours.__new__(ours)))
            vllms = SimpleNamespace(moe_kernel=SimpleNamespace(fused_experts=object()))
            apply(mine, layer, torch.zeros(40, 16), weights, ids, None, None)
            apply(vllms, layer, torch.zeros(40, 16), weights, ids, None, None)
            (got_w, got_i), (vllm_w, vllm_i) = seen
            assert vllm_w is weights and vllm_i is ids
            dropped = ctx.read_stats()["rows_dropped"]
            if ratio == 0.0:
                assert dropped == 0
                assert torch.equal(got_w, weights) and torch.equal(got_i, ids)
            else:
                assert 0 < dropped <= int(0.3 * 80)
                assert int((got_i < 0).sum()) == dropped
                assert bool((got_w[got_i < 0] == 0).all())
                assert torch.equal(got_i[got_i >= 0], ids[got_i >= 0])
        finally:
            ctx.close()

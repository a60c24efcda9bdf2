"""The vLLM adapter's own contract: what a taken-over layer hands to vLLM's kernel."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ascend_patch.core.context import PatchContext
from ascend_patch.impls.moe.adapters import vllm_modular
from ascend_patch.impls.moe.options import CapacityOptions


def _cpu_layer():
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    parallel = SimpleNamespace(use_ep=False, ep_size=1, ep_rank=0, dp_size=1, dp_rank=0,
                               tp_size=1, tp_rank=0, pcp_size=1, is_sequence_parallel=False,
                               enable_eplb=False, use_batched_activation_format=False)
    moe = SimpleNamespace(moe_parallel_config=parallel, has_bias=False, is_lora_enabled=False,
                          is_act_and_mul=True)
    method = SimpleNamespace(moe=moe, unquantized_backend=UnquantizedMoeBackend.CPU,
                             experts_cls=None)
    layer = SimpleNamespace(layer_name="model.layers.1.mlp.experts", activation="silu",
                            global_num_experts=8, expert_map=None, moe_config=moe)
    return method, layer


def test_a_taken_over_cpu_layer_hands_dropped_rows_to_the_kernel_as_id_minus_one():
    """Dropped rows reach vLLM's modular kernel as id -1 (so the all-to-all never sends them
    and the experts never compute them), not only as weight 0."""
    ctx = PatchContext("moe", "moe.capacity", CapacityOptions(drop_token_ratio=0.3,
                                                               min_tokens=0))
    try:
        method, layer = _cpu_layer()
        built = []
        process = vllm_modular.make_process_weights_after_loading(
            lambda self, layer: built.append(self.experts_cls), ctx)
        process(method, layer)
        assert getattr(method, vllm_modular.TAKEN_OVER) == vllm_modular.EXPERTS
        assert built == [vllm_modular.state_of(ctx).experts_cls]
        seen = []
        apply = vllm_modular.make_apply(
            lambda self, layer, x, weights, ids, *rest: seen.append((weights, ids)), ctx)
        gen = torch.Generator().manual_seed(0)
        weights = torch.rand(40, 2, generator=gen).softmax(dim=1)
        ids = torch.randint(0, 8, (40, 2), generator=gen, dtype=torch.int32)
        ids[:, 0] = 7  # one hot expert: something to drop
        apply(method, layer, torch.zeros(40, 16), weights, ids, None, None)
        (got_weights, got_ids), = seen
        dropped = ctx.stats["rows_dropped"]
        assert dropped > 0
        assert int((got_ids < 0).sum()) == dropped
        assert bool((got_weights[got_ids < 0] == 0).all())
        assert torch.equal(got_ids[got_ids >= 0], ids[got_ids >= 0])
    finally:
        ctx.close()

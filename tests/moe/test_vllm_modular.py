"""The vLLM adapter's own contract: what a taken-over layer hands to vLLM's kernel, and which
layers it refuses, on the installed line's real FusedMoEConfig / FusedMoEParallelConfig (a
hand-written stand-in could keep an attribute alive that the line removed: vLLM 0.34 did
that to `use_batched_activation_format`). 0.34's shapes are checked on its real source
(tests/core/test_line_sources.py) and by the attribute audit (tests/core/test_attribute_audit.py).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from ascend_patch.core import catalog
from ascend_patch.core.catalog import Interface
from ascend_patch.core.context import PatchContext
from ascend_patch.core.upstream import Upstream
from ascend_patch.impls.moe.adapters import vllm_modular
from ascend_patch.impls.moe.options import CapacityOptions

_FM = "vllm.model_executor.layers.fused_moe"


def real_parallel_config(config_class=None, **overrides):
    """vLLM's own FusedMoEParallelConfig (the installed line's dataclass), one rank."""
    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig

    fields = dict(tp_size=1, pcp_size=1, dp_size=1, ep_size=1, tp_rank=0, pcp_rank=0,
                  dp_rank=0, ep_rank=0, sp_size=1, use_ep=False,
                  all2all_backend="allgather_reducescatter", enable_eplb=False)
    return (config_class or FusedMoEParallelConfig)(**{**fields, **overrides})


def real_moe_config(parallel, config_class=None, **overrides):
    """vLLM's own FusedMoEConfig for 8 experts, top-2, silu (0.23 names the intermediate
    size per partition, 0.32 the full one)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, RoutingMethodType

    config_class = config_class or FusedMoEConfig
    names = {f.name for f in dataclasses.fields(config_class)}
    size = ("intermediate_size" if "intermediate_size" in names
            else "intermediate_size_per_partition")
    fields = dict(num_experts=8, experts_per_token=2, hidden_dim=16, num_local_experts=8,
                  num_logical_experts=8, activation=MoEActivation.SILU, device="cpu",
                  routing_method=RoutingMethodType.Renormalize, moe_parallel_config=parallel,
                  in_dtype=torch.float32, **{size: 32})
    return config_class(**{**fields, **overrides})


def _cpu_layer(moe=None):
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    moe = moe or real_moe_config(real_parallel_config())
    # The method and the layer are vLLM objects built by a model load; what the adapter reads
    # on them is declared per line (catalog `reads`) and found in the real source.
    method = SimpleNamespace(moe=moe, unquantized_backend=UnquantizedMoeBackend.CPU,
                             experts_cls=None)
    layer = SimpleNamespace(layer_name="model.layers.1.mlp.experts", activation="silu",
                            global_num_experts=8, expert_map=None, moe_config=moe)
    return method, layer


@pytest.fixture
def ctx():
    context = PatchContext("moe", "moe.capacity", CapacityOptions(drop_token_ratio=0.3,
                                                                   min_tokens=0))
    yield context
    context.close()


def test_a_taken_over_cpu_layer_hands_dropped_rows_to_the_kernel_as_id_minus_one(ctx):
    """Dropped rows reach vLLM's modular kernel as id -1 (so the all-to-all never sends them
    and the experts never compute them), not only as weight 0."""
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
    dropped = ctx.read_stats()["rows_dropped"]
    assert dropped > 0
    assert int((got_ids < 0).sum()) == dropped
    assert bool((got_weights[got_ids < 0] == 0).all())
    assert torch.equal(got_ids[got_ids >= 0], ids[got_ids >= 0])


def test_a_batched_format_layer_keeps_vllm_s_experts_with_the_reason(ctx):
    """DeepEP low-latency under DP + EP: the installed line's own parallel config says the
    format is batched, and the layer is refused with that reason."""
    parallel = real_parallel_config(dp_size=2, ep_size=2, use_ep=True,
                                    all2all_backend="deepep_low_latency")
    assert parallel.use_batched_activation_format
    method, layer = _cpu_layer(real_moe_config(parallel))
    calls = []
    process = vllm_modular.make_process_weights_after_loading(
        lambda self, layer: calls.append(self.experts_cls), ctx)
    # One process plays one rank of two: no EP group to compare the config over at load.
    vllm_modular.state_of(ctx).config_checked = True
    process(method, layer)
    assert getattr(method, vllm_modular.TAKEN_OVER) is False
    assert calls == [None]  # the original ran with vLLM's own experts class
    assert ctx.stats["layers_not_taken_over"] == {
        "model.layers.1.mlp.experts": "batched activation format (DeepEP LL / NIXL EP)"}


def _upstream_0_34_shaped(**extra: Interface) -> Upstream:
    """The installed line's interfaces plus keys the 0.34 site set declares, pointed at this
    line's classes: which branch the adapter takes depends on the keys only."""
    declared = dict(catalog.lookup("moe.capacity").site_set(
        _installed_line(), "vllm").upstream_keys())
    declared["activation_format"] = catalog.lookup("moe.capacity").site_set(
        "0.34", "vllm").upstream_keys()["activation_format"]
    declared.update(extra)
    return Upstream(declared, what="moe.capacity (0.34 keys)")


def _installed_line() -> str:
    from ascend_patch.core.versions import detect_stack

    return detect_stack().line


def _removed_in_0_34(config):
    pytest.fail("read FusedMoEParallelConfig.use_batched_activation_format, which 0.34 removed")


def _moe_with_format(fmt):
    """The installed FusedMoEConfig with 0.34's `activation_format` property (fused_moe/
    config.py:1468 in 0.34) returning `fmt`, on a parallel config whose removed flag fails
    the test when read."""
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig

    moe_cls = dataclasses.make_dataclass("FusedMoEConfig034", [], bases=(FusedMoEConfig,),
                                         namespace={"activation_format": property(lambda s: fmt)})
    parallel_cls = dataclasses.make_dataclass(
        "FusedMoEParallelConfig034", [], bases=(FusedMoEParallelConfig,),
        namespace={"use_batched_activation_format": property(_removed_in_0_34)})
    return real_moe_config(real_parallel_config(parallel_cls), config_class=moe_cls)


@pytest.mark.parametrize("fmt_name, reason", [
    ("Standard", None),
    ("BatchedExperts", "activation format BatchedExperts (our experts take Standard only: "
                       "DeepEP LL / NIXL EP / batched_triton are batched, DeepEP v2 is "
                       "padded_standard)"),
])
def test_with_0_34_keys_the_format_is_read_on_the_moe_config(fmt_name, reason):
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEActivationFormat

    method, layer = _cpu_layer(_moe_with_format(getattr(FusedMoEActivationFormat, fmt_name)))
    got = vllm_modular._not_supported_reason(method, layer, _upstream_0_34_shaped())
    assert got == reason


def test_with_0_34_keys_a_mone_substituted_layer_is_refused():
    """SubstitutedRoutedExperts subclasses RoutedExperts in 0.34 (expert_substitution.py:292);
    here the key names this line's RoutedExperts, so a layer of that class stands for one."""
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEActivationFormat

    layer_module = f"{_FM}.routed_experts" if _installed_line() != "0.23" else f"{_FM}.layer"
    layer_class = "RoutedExperts" if _installed_line() != "0.23" else "FusedMoE"
    upstream = _upstream_0_34_shaped(SubstitutedRoutedExperts=Interface(
        f"{layer_module}:{layer_class}", None, "stand-in", key="SubstitutedRoutedExperts"))
    method, _ = _cpu_layer(_moe_with_format(FusedMoEActivationFormat.Standard))
    from importlib import import_module

    substituted = getattr(import_module(layer_module), layer_class)
    layer = substituted.__new__(substituted)
    assert vllm_modular._not_supported_reason(method, layer, upstream) == (
        "MoNE expert substitution (substituted routes would count as load on expert 0)")

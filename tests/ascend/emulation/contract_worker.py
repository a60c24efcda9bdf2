"""One rank of the vllm-ascend MoE contract run (test only; started by tests/ascend).

    python contract_worker.py SOURCE LINE RANK WORLD PORT OUT_DIR

LINE is the vLLM line of the release in SOURCE (0.23: 0.23.0.post1, 0.18: 0.18.0); RELEASES
below holds what differs between them for this run.

Boots the emulated NPU stack (boot.py), joins real vLLM groups on gloo (TP = EP = WORLD, so
each rank's all-to-all slice is its own tokens, as on a deployment), applies the ascend site
set of `moe.capacity` with the real Patcher, then runs vllm-ascend's own
AscendFusedMoE.forward_impl (prepare, AscendUnquantizedFusedMoEMethod.apply with its
select_experts, MoECommMethod.fused_experts, dispatcher, unified_apply_mlp, combine, finalize)
on a small layer object holding exactly what forward_impl reads; then the same for layers
with vllm-ascend's real W8A8_DYNAMIC and W4A8_DYNAMIC schemes (quant_worker.py); then the
unquantized and W8A8_DYNAMIC layers with overflow: reroute. Everything this rank saw is saved
to OUT_DIR/rank{RANK}.pt; tests/ascend/test_contract.py checks it.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
import types
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

HIDDEN, INTER, EXPERTS, TOP_K, TOKENS = 16, 8, 8, 2, 64
# EPLB's logical -> physical map: the hot logical experts below all land on rank 1's
# physical slots (4..7), so binning by logical id would blame rank 0 instead.
LOG2PHY = [5, 0, 7, 1, 2, 6, 3, 4]
HOT_LOGICAL = (0, 2, 5, 7)
CONFIG_FILE, CONFIG_LINE = "ascend-contract.yaml", 7
DROP_OPTIONS = {"drop_token_ratio": 0.2, "min_tokens": 0, "drop_policy": "probs"}
REROUTE_OPTIONS = {**DROP_OPTIONS, "overflow": "reroute"}
COLLECTIVE_TIMEOUT_S = 60
quant_worker = None  # the quantized scenarios (quant_worker.py), imported once booted


@dataclass(frozen=True)
class Release:
    """What this run does differently per vllm-ascend release (spec_releases.py: why)."""

    layer_module: str  # where AscendFusedMoE is
    lora: bool  # MoEFusedExpertsInput has lora_context
    fused_mc2_env: bool  # FUSED_MC2 switched by VLLM_ASCEND_ENABLE_FUSED_MC2, not ascend_config
    # 0.13.0: no MoE stage dataclasses (contract_worker_0_13.py); only w8a8_dynamic models
    # reach FUSED_MC2, so the switch is not refused; its unquantized method does not pass
    # log2phy to fused_experts (fused_moe.py:153-162), so ids stay logical there.
    old_api: bool = False
    # The from-imported copies of a site the patcher rewrites.
    copies: tuple[str, ...] = (
        "vllm_ascend.ops.fused_moe.moe_comm_method.build_token_dispatch_input",
    )
    # build_fused_experts_input takes is_per_channel_weight (not in 0.18.0).
    per_channel_arg: bool = True
    # W4A8's apply passes its scale biases as tensor lists, which the MLP hands the grouped
    # matmul as they are (w4a8.py:559-567, moe_mlp.py:263-268); 0.18.0's apply passes tensors
    # that its MLP wraps in a list (w4a8.py:401, moe_mlp.py:240-246 there).
    scale_bias_lists: bool = True


RELEASES = {
    "0.23": Release("vllm_ascend.ops.fused_moe.fused_moe_0_23_0", lora=True, fused_mc2_env=False),
    "0.18": Release("vllm_ascend.ops.fused_moe.fused_moe", lora=False, fused_mc2_env=True,
                    per_channel_arg=False, scale_bias_lists=False),
    "0.13": Release("vllm_ascend.ops.fused_moe.fused_moe", lora=False, fused_mc2_env=True,
                    old_api=True, copies=()),
}


def main(source: str, line: str, rank: int, world: int, port: int, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # contract_worker_0_13 imports this module by name: one module, one quant_worker global.
    sys.modules.setdefault("contract_worker", sys.modules[__name__])
    import boot

    boot.install(Path(source), device_type="A3")
    global quant_worker
    import quant_worker
    run_class = Run
    if line == "0.13":  # its older API: contract_worker_0_13.py
        import contract_worker_0_13

        run_class = contract_worker_0_13.Run
    run = run_class(line, rank, world, port)
    results: dict = {}
    try:
        run.scenarios(results)
    except BaseException:
        results["error"] = traceback.format_exc()
    import torch

    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


class Run:
    def __init__(self, line: str, rank: int, world: int, port: int) -> None:
        import torch

        self.line, self.release = line, RELEASES[line]
        self.rank, self.world = rank, world
        self.vllm_config = _init_groups(rank, world, port)
        self.mods = _import_vllm_ascend(self.release)
        self.weights = _expert_weights(torch.Generator().manual_seed(7))
        self.hidden, self.logits = _inputs(torch.Generator().manual_seed(11))
        self.a2a = self._comm("AlltoAllCommImpl")
        self.allgather = self._comm("AllGatherCommImpl")
        self.spy = self.make_spy()
        self.patcher = None

    def make_spy(self) -> Spy:
        return Spy(self.mods)

    def adapter(self):
        """The module of the site set's factories for this release."""
        from ascend_patch.impls.moe.adapters import ascend_0_23

        return ascend_0_23

    # -- scenarios ----------------------------------------------------------------------

    def scenarios(self, results: dict) -> None:
        import torch

        results["unpatched"] = {p: self.forward(p) for p in ("all_to_all", "allgather")}
        results["quant_unpatched"] = quant_worker.unpatched(self)
        record = self.apply(DROP_OPTIONS)
        results["record"] = _record_facts(record)
        results["all_to_all"] = self.observed_forward("all_to_all")
        results["allgather"] = self.observed_forward("allgather")
        results["dropless_with_kept_weights"] = self.dropless_with_kept_weights(
            results["all_to_all"]
        )
        results["combine_pad_needed"] = self.without_combine_pad()
        results["nothing_sent"] = self.rank_sends_nothing()
        results["kept_whole"] = self.kept_whole_cases(record)
        results["fused_mc2"] = self.fused_mc2_refused()
        results["stats"] = _plain(record.context.read_stats())
        results["quant"] = quant_worker.with_drops(self)
        results["quant_weights"] = {s: quant_worker.dequantized(s) for s in quant_worker.SCHEMES}
        results["quant_stats"] = _plain(record.context.read_stats())
        self.patcher.revert()
        record = self.apply({"drop_token_ratio": 0.0, "min_tokens": 0})
        results["ratio0"] = {p: self.forward(p) for p in ("all_to_all", "allgather")}
        results["quant_ratio0"] = quant_worker.ratio0(self)
        results["ratio0_stats"] = _plain(record.context.read_stats())
        self.patcher.revert()
        record = self.apply(REROUTE_OPTIONS)
        w8a8 = quant_worker.quant_layer(self, "W8A8_DYNAMIC")
        results["reroute"] = {
            kind: {p: self.observed_forward(p, layer=layer) for p in ("all_to_all", "allgather")}
            for kind, layer in (("unquantized", None), ("W8A8_DYNAMIC", w8a8))
        }
        results["reroute_stats"] = _plain(record.context.read_stats())
        self.patcher.revert()
        self.apply({**REROUTE_OPTIONS, "drop_token_ratio": 0.0})
        results["reroute_ratio0"] = {p: self.forward(p) for p in ("all_to_all", "allgather")}
        self.patcher.revert()
        torch.distributed.barrier()

    def observed_forward(self, path: str, layer=None, keep_input: bool = False) -> dict:
        self.spy.reset()
        out = self.forward(path, layer=layer)
        seen = self.spy.take()
        if not keep_input:  # vllm-ascend objects do not load in the test process
            seen.pop("fused_input", None)
        seen["out"] = out
        return seen

    def dropless_with_kept_weights(self, seen: dict) -> dict:
        """vllm-ascend's own dropless path (no layer call is current, so every site passes
        through) on this rank's slice, with the original ids and weight 0 on dropped rows."""
        import torch

        keep = seen["dispatch_in"]["ids"] < EXPERTS
        inputs = self._fused_input(
            seen["dispatch_in"]["hidden"], seen["fused_in"]["weights"] * keep,
            seen["fused_in"]["ids"], self.a2a,
        )
        with self.forward_context(self.a2a):
            routed = self.a2a.fused_experts(fused_experts_input=inputs).routed_out
        return {"routed": routed, "drop_routed": seen["routed"], "keep": keep.to(torch.int8)}

    def without_combine_pad(self) -> str:
        """The same forward with vllm-ascend's own _combine_postprocess: must fail."""
        td = self.mods.td.TokenDispatcherWithAll2AllV
        patched = td.__dict__["_combine_postprocess"]
        td._combine_postprocess = patched.__wrapped__
        try:
            self.forward("all_to_all")
        except AssertionError as exc:
            return f"failed: {exc}"
        finally:
            td._combine_postprocess = patched
        return "ran"

    def rank_sends_nothing(self) -> dict:
        """Rank 0 drops every row (ids marked unsent): the dispatcher must send nothing from
        it, compute nothing for it, and give it zeros back; rank 1 is unaffected."""
        import torch

        hidden, weights, ids = self._slice_routing()
        if self.rank == 0:
            ids = torch.full_like(ids, EXPERTS + 1)
            weights = torch.zeros_like(weights)
        self.spy.reset()
        with self.forward_context(self.a2a):
            out = self.dispatch_mlp_combine(self.a2a, hidden, weights, ids)
        seen = self.spy.take()
        return {"out": out, "hidden": hidden, "weights": weights, "ids": ids,
                "a2a": seen["a2a"], "permute": seen["permute"]}

    def kept_whole_cases(self, record) -> dict:
        import torch


        ctx = record.context
        out = {}
        for case, comm in (("MC2", self._bare("MC2CommImpl")),
                           ("FUSED_MC2", self._bare("FusedMC2CommImpl")),
                           ("graph capture", self.allgather)):
            torch.npu.capture.active = case == "graph capture"
            try:
                out[case] = self._through_hook(ctx, comm, lora=None)
            finally:
                torch.npu.capture.active = False
        if self.release.lora:
            out["MoE LoRA"] = self._through_hook(ctx, self.allgather, lora=object())
        quantized = self.layer(name="model.layers.9.mlp.experts", quantized=True)
        out["quantized_current"] = self._current_during(ctx, quantized, self.allgather)
        return out

    def fused_mc2_refused(self) -> str:
        with self.fused_mc2_enabled():
            try:
                self.forward("allgather", layer=self.layer(name="model.layers.5.mlp.experts"))
            except Exception as exc:  # noqa: BLE001 - the message is what is checked
                return f"{type(exc).__name__}: {exc}"
        return "ran"

    @contextmanager
    def fused_mc2_enabled(self):
        if self.release.fused_mc2_env:  # envs.py reads it on every access
            os.environ["VLLM_ASCEND_ENABLE_FUSED_MC2"] = "1"
            try:
                yield
            finally:
                del os.environ["VLLM_ASCEND_ENABLE_FUSED_MC2"]
            return
        from vllm_ascend.ascend_config import get_ascend_config

        config = get_ascend_config()
        saved, config.enable_fused_mc2 = config.enable_fused_mc2, 1
        try:
            yield
        finally:
            config.enable_fused_mc2 = saved

    # -- building blocks ----------------------------------------------------------------

    def apply(self, options: dict):
        from ascend_patch.core.patcher import Patcher

        self.patcher = Patcher()
        (record,) = self.patcher.apply(_loaded_config(options, self.line))
        assert record.status == "applied", (record.status, record.reason)
        return record

    def forward(self, path: str, layer=None):
        """AscendFusedMoE.forward_impl (patched or not) on every token; the routed output
        summed over the EP ranks where vllm-ascend leaves that to the runner."""
        import torch

        comm = self.a2a if path == "all_to_all" else self.allgather
        layer = layer or self.layer()
        # Quantized schemes take bf16 activations (aclnnDynamicQuant: fp16/bf16 only).
        dtype = torch.float32 if layer.quant_type == self.mods.QuantType.NONE else torch.bfloat16
        # What 0.23.0.post1's forward_impl passes finalize itself; 0.18.0 reads the layer's.
        layer.reduce_results = path == "allgather"
        with self.forward_context(comm):
            out = self.mods.layer.AscendFusedMoE.forward_impl(
                layer, self.hidden.to(dtype), self.logits.clone()
            )
        if path == "allgather":  # AscendMoERunner all-reduces the partial outputs
            torch.distributed.all_reduce(out)
        return out

    def layer(self, name: str = "model.layers.3.mlp.experts", quantized: bool = False):
        import torch

        mods = self.mods
        method = types.SimpleNamespace()
        if not quantized:
            method = mods.fm.AscendUnquantizedFusedMoEMethod.__new__(
                mods.fm.AscendUnquantizedFusedMoEMethod
            )
            method.dynamic_eplb, method.tid2eid = False, None
            method.moe = types.SimpleNamespace(has_bias=False)
        local = EXPERTS // self.world
        mine = self.mine()
        expert_map = torch.full((EXPERTS,), -1, dtype=torch.int32)
        expert_map[mine] = torch.arange(local, dtype=torch.int32)
        return types.SimpleNamespace(
            layer_name=name, quant_method=method, quant_type=mods.QuantType.NONE,
            enable_npugraph_ex_static_kernel=False, multistream_overlap_gate=False,
            enable_shared_expert_dp=False, top_k=TOP_K, renormalize=False,
            use_grouped_topk=False, topk_group=None, num_expert_group=None,
            custom_routing_function=_route, scoring_func="softmax",
            _original_routed_scaling_factor=1.0, e_score_correction_bias=None,
            activation=mods.MoEActivation.SILU, apply_router_weight_on_input=False,
            log2phy=torch.tensor(LOG2PHY, dtype=torch.int32), global_redundant_expert_num=0,
            moe_config=types.SimpleNamespace(num_experts=EXPERTS), _expert_map=expert_map,
            dynamic_eplb=False, w13_weight=self.weights[0][mine], w2_weight=self.weights[1][mine],
            swiglu_limit=0.0, global_num_experts=EXPERTS, local_num_experts=local,
            routed_scaling_factor=1.0,
            ep_size=self.world,
            vllm_config=types.SimpleNamespace(
                model_config=types.SimpleNamespace(enable_return_routed_experts=False)
            ),
        )

    # -- the quantized scenarios' calls (quant_worker.py; 0.13.0's in contract_worker_0_13) --

    def quant_fused_input(self, layer, hidden, weights, ids):
        return quant_worker.fused_input(self, layer, hidden, weights, ids)

    def quant_fused_experts(self, comm, inputs, keep=None):
        return quant_worker.fused_experts(comm, inputs, keep)

    def unguarded_zero_row_mlp(self, inputs) -> str:
        return quant_worker.unguarded_zero_row_mlp(self, inputs)

    def mine(self) -> slice:
        """This rank's physical experts."""
        local = EXPERTS // self.world
        return slice(self.rank * local, (self.rank + 1) * local)

    @contextmanager
    def forward_context(self, comm):
        from vllm.config import set_current_vllm_config
        from vllm.forward_context import get_forward_context, set_forward_context

        # The current config too, as in a worker's forward: 0.18.0's prepare reads it.
        with set_current_vllm_config(self.vllm_config), \
                set_forward_context(None, self.vllm_config, num_tokens=TOKENS):
            context = get_forward_context()
            context.moe_comm_method = comm
            context.moe_comm_type = None
            context.flash_comm_v1_enabled = False
            context.in_profile_run = False
            context.max_tokens_across_dp = TOKENS
            yield context

    def _comm(self, name: str):
        from vllm.distributed import get_dp_group, get_tp_group

        config = types.SimpleNamespace(
            experts_per_token=TOP_K, num_experts=EXPERTS, num_local_experts=EXPERTS // self.world,
            ep_size=self.world, dp_size=1, pcp_size=1, tp_group=get_tp_group(),
            dp_group=get_dp_group(), global_redundant_expert_num=0,  # 0.13.0 reads it here
        )
        return getattr(self.mods.cm, name)(config)

    def _bare(self, name: str):
        """A comm method object of that class whose constructor (HCCL MC2 group) never ran."""
        cls = getattr(self.mods.cm, name)
        return cls.__new__(cls)

    def _slice_routing(self):
        """This rank's TP slice and its physical routing, as the all-to-all path sees it."""
        import torch

        hidden = torch.tensor_split(self.hidden, self.world)[self.rank]
        logits = torch.tensor_split(self.logits, self.world)[self.rank]
        weights, logical = _route(hidden, logits, TOP_K, False)
        return hidden, weights, torch.tensor(LOG2PHY, dtype=torch.int32)[logical.long()]

    def _fused_input(self, hidden, weights, ids, comm, lora=None):
        layer = self.layer()
        extra = {"lora_context": lora} if self.release.lora else {}
        return self.mods.args.build_fused_experts_input(
            hidden_states=hidden, topk_weights=weights, topk_ids=ids, w1=layer.w13_weight,
            w2=layer.w2_weight, quant_type=self.mods.QuantType.NONE, dynamic_eplb=False,
            expert_map=layer._expert_map, activation=self.mods.MoEActivation.SILU, **extra,
        )

    def dispatch_mlp_combine(self, comm, hidden, weights, ids):
        """Dispatcher, MLP and combine of `comm` on these rows, outside any layer call."""
        inputs = self._fused_input(hidden, weights, ids, comm)
        dispatch_in = self.mods.contracts.MoETokenDispatchInput(
            hidden_states=hidden, topk_weights=weights, topk_ids=ids,
            routing=inputs.routing, quant=inputs.quant,
        )
        args = self.mods.args
        dispatcher = comm.token_dispatcher
        output = dispatcher.token_dispatch(token_dispatch_input=dispatch_in)
        mlp_in = args.build_mlp_compute_input(
            fused_experts_input=inputs, token_dispatch_output=output, use_fusion_ops=False
        )
        mlp_out = self.mods.mlp.unified_apply_mlp(mlp_compute_input=mlp_in)
        if isinstance(mlp_out, tuple):  # 0.23.0.post1 returns (out, event)
            mlp_out = mlp_out[0]
        return dispatcher.token_combine(
            hidden_states=mlp_out, combine_metadata=output.combine_metadata
        )

    def _through_hook(self, ctx, comm, lora) -> dict:
        """The patched build_token_dispatch_input called from inside a forward_impl made by
        the patch's own factory (original replaced by a stub: these comm methods cannot
        run here): what the dispatcher would receive."""
        from ascend_patch.impls.moe.adapters import ascend_0_23

        hidden, weights, ids = self._slice_routing()
        inputs = self._fused_input(hidden, weights, ids, comm, lora=lora)
        build = self.mods.cm.build_token_dispatch_input

        def stub(layer, hidden_states, router_logits, return_with_event=False):
            return build(fused_experts_input=inputs, topk_ids=ids)

        forward_impl = ascend_0_23.make_forward_impl(stub, ctx)
        with self.forward_context(comm):
            built = forward_impl(self.layer(), hidden, hidden)
        return {"same_ids": bool(built.topk_ids.equal(ids)),
                "same_weights": bool(built.topk_weights.equal(weights))}

    def _current_during(self, ctx, layer, comm) -> bool:
        from ascend_patch.impls.moe.adapters import ascend_0_23

        state = ascend_0_23.state_of(ctx)
        seen = []
        forward_impl = self.adapter().make_forward_impl(
            lambda *a, **k: seen.append(state.current), ctx
        )
        with self.forward_context(comm):
            forward_impl(layer, self.hidden, self.logits)
        return seen == [None]


class Spy:
    """Records what crosses vllm-ascend's boundaries during one forward."""

    def __init__(self, mods) -> None:
        import torch
        import torch_npu

        self.records: dict = {}
        self._wrap(torch_npu, "npu_moe_token_permute", self._permute)
        self._wrap(torch.distributed, "all_to_all_single", self._all_to_all)
        self._wrap(mods.comm_utils, "gather_from_sequence_parallel_region", self._gather)
        self._wrap(mods.cm.MoECommMethod, "fused_experts", self._fused)
        for dispatcher in ("TokenDispatcherWithAll2AllV", "TokenDispatcherWithAllGather"):
            self._wrap(getattr(mods.td, dispatcher), "token_dispatch", self._dispatched)
        self._wrap_routing(mods)
        self._wrap(mods.cm.MoECommMethod, "finalize", self._finalize)
        quant_worker.spy_ops(self, mods)

    def _wrap_routing(self, mods) -> None:
        routing = mods.td.DeviceOperator.npu_moe_init_routing
        spied = functools.wraps(routing)(self._routing(routing))
        mods.td.DeviceOperator.npu_moe_init_routing = staticmethod(spied)

    def wrap_quant_mlp(self, mods) -> None:
        def mlp(original):
            def _apply_mlp(comm, mlp_compute_input):
                quant_worker.record_mlp(self, mlp_compute_input.hidden_states,
                                        mlp_compute_input.dynamic_scale)
                return original(comm, mlp_compute_input)
            return _apply_mlp

        self._wrap(mods.cm.MoECommMethod, "_apply_mlp", mlp)

    def reset(self) -> None:
        self.records = {"permute": [], "a2a": [], "gathers": 0, "routing": [],
                        "quant_rows": [], "mlp_rows": [], "mlp_scales": []}

    def take(self) -> dict:
        records, self.records = self.records, {}
        return records

    def _wrap(self, owner, name, make) -> None:
        original = getattr(owner, name)
        # wraps: the patcher's signature checks see through a spy to what it wraps.
        setattr(owner, name, functools.wraps(original)(make(original)))

    def _permute(self, original):
        def permute(tokens, indices, num_out_tokens=None, padded_mode=False):
            out = original(tokens, indices, num_out_tokens, padded_mode)
            if self.records and indices.dim() == 2:
                self.records["permute"].append(
                    {"num_out_tokens": num_out_tokens, "rows": out[0].shape[0],
                     "indices": indices.clone()}
                )
            return out

        return permute

    def _all_to_all(self, original):
        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                              group=None, async_op=False):
            if self.records:
                self.records["a2a"].append(
                    {"rows_in": input.shape[0], "rows_out": output.shape[0],
                     "in_splits": [int(s) for s in input_split_sizes],
                     "out_splits": [int(s) for s in output_split_sizes]}
                )
            return original(output, input, output_split_sizes=output_split_sizes,
                            input_split_sizes=input_split_sizes, group=group, async_op=async_op)

        return all_to_all_single

    def _fused(self, original):
        def fused_experts(comm, fused_experts_input):
            if self.records:
                ids = fused_experts_input.topk_ids
                log2phy = fused_experts_input.routing.log2phy
                self.records["fused_in"] = {
                    "weights": fused_experts_input.topk_weights.clone(),
                    "ids": (log2phy[ids] if log2phy is not None else ids).clone(),
                }
                self.records["fused_input"] = fused_experts_input
            return original(comm, fused_experts_input=fused_experts_input)

        return fused_experts

    def _dispatched(self, original):
        def token_dispatch(dispatcher, token_dispatch_input):
            if self.records:
                self.records["dispatch_in"] = {
                    "hidden": token_dispatch_input.hidden_states.clone(),
                    "weights": token_dispatch_input.topk_weights.clone(),
                    "ids": token_dispatch_input.topk_ids.clone(),
                }
            return original(dispatcher, token_dispatch_input=token_dispatch_input)

        return token_dispatch

    def _finalize(self, original):
        # The last parameter differs per release (padded_hidden_states_shape, context_metadata).
        def finalize(comm, hidden_states, reduce_results, *args, **kwargs):
            if self.records:
                self.records["routed"] = hidden_states.clone()
            return original(comm, hidden_states, reduce_results, *args, **kwargs)

        return finalize

    def _gather(self, original):
        def gather(input_, group, output_split_sizes=None):
            if self.records:
                self.records["gathers"] += 1
            return original(input_, group, output_split_sizes)

        return gather

    def _routing(self, original):
        def npu_moe_init_routing(hidden_states, topk_ids, **kwargs):
            out = original(hidden_states, topk_ids, **kwargs)
            if self.records:
                self.records["routing"].append({
                    "expert_tokens": out[2].clone(), "quant_mode": kwargs.get("quant_mode"),
                    "scales": None if out[3] is None else int(out[3].shape[0])})
            return out

        return npu_moe_init_routing


# -- process set-up ---------------------------------------------------------------------


def _init_groups(rank: int, world: int, port: int):
    os.environ["VLLM_DIST_IDENT"] = f"ascend-contract-{port}"
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
    )

    config = VllmConfig()
    with set_current_vllm_config(config):
        init_distributed_environment(
            world_size=world, rank=rank, local_rank=rank, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            # A rank that failed leaves its peer in a collective: fail fast, not in 30 min.
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        initialize_model_parallel(tensor_model_parallel_size=world, backend="gloo")
    import vllm_ascend.utils
    from vllm_ascend.ascend_config import get_ascend_config, init_ascend_config

    init_ascend_config(config)
    # As the model runner does (model_runner_v1.py:338 in 0.23.0.post1, :265 in 0.18.0,
    # :250 in 0.13.0): 0.18.0's select_experts calls the method without a None check. It asks
    # whether the model is MoE, from a model config this process has none of: it runs MoE.
    vllm_ascend.utils._IS_MOE_MODEL = True
    with set_current_vllm_config(config):
        vllm_ascend.utils.set_weight_prefetch_method(get_ascend_config().weight_prefetch_config)
    return config


def _import_vllm_ascend(release: Release):
    import importlib

    if release.old_api:
        import contract_worker_0_13

        return contract_worker_0_13.import_vllm_ascend()

    # fused_moe.py first: 0.23.0.post1's fused_moe_0_23_0 imports from it, and it re-exports
    # fused_moe_0_23_0 at its end (importing fused_moe_0_23_0 first is circular).
    import vllm_ascend.ops.fused_moe.fused_moe as fm
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm_ascend.ops.fused_moe import comm_utils, moe_mlp
    from vllm_ascend.ops.fused_moe import moe_comm_method as cm
    from vllm_ascend.ops.fused_moe import moe_runtime_args as args
    from vllm_ascend.ops.fused_moe import moe_stage_contracts as contracts
    from vllm_ascend.ops.fused_moe import token_dispatcher as td
    from vllm_ascend.quantization.quant_type import QuantType

    return types.SimpleNamespace(
        fm=fm, layer=importlib.import_module(release.layer_module), cm=cm, td=td, args=args,
        contracts=contracts, mlp=moe_mlp,
        comm_utils=comm_utils, MoEActivation=MoEActivation, QuantType=QuantType,
    )


def _loaded_config(options: dict, line: str):
    from ascend_patch.core.catalog import lookup
    from ascend_patch.core.config import LoadedConfig, PlannedInterface, PlannedPatch, PlannedSite
    from ascend_patch.core.targets import parse_target
    from ascend_patch.core.versions import Stack
    from ascend_patch.impls.moe.options import CapacityOptions

    impl = lookup("moe.capacity")
    site_set = impl.site_set(line, "ascend")
    patch = PlannedPatch(
        name="capacity", impl=impl, options=CapacityOptions(**options), on_error="fail",
        enabled=True, line=CONFIG_LINE, file=CONFIG_FILE,
        sites=tuple(PlannedSite(s.role, parse_target(s.target), s.signature, s.factory)
                    for s in site_set.sites),
        relies_on=tuple(PlannedInterface(parse_target(i.target), i.signature, i.why)
                        for i in site_set.relies_on),
    )
    return LoadedConfig(path=CONFIG_FILE, digest="contract", files=(CONFIG_FILE,), vllm=None,
                        description=None, patches=(patch,), stack=Stack(line, "ascend"))


def _record_facts(record) -> dict:
    return {"status": record.status, "roles": list(record.applied_roles),
            "copies": list(record.copies), "checked": list(record.interfaces_checked),
            "unchecked": list(record.interfaces_unchecked)}


def _plain(value):
    import json

    return json.loads(json.dumps(value, default=str))


# -- the model ----------------------------------------------------------------------------


def _expert_weights(gen):
    """Physical-slot weights in vllm-ascend's post-load layout: w13 [E, H, 2I], w2 [E, I, H]."""
    import torch

    w13 = torch.randn(EXPERTS, HIDDEN, 2 * INTER, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, INTER, HIDDEN, generator=gen) / INTER**0.5
    return w13, w2


def _inputs(gen):
    """Hidden states and router logits that load the hot logical experts heavily."""
    import torch

    hidden = torch.randn(TOKENS, HIDDEN, generator=gen)
    logits = torch.randn(TOKENS, EXPERTS, generator=gen)
    logits[:, list(HOT_LOGICAL)] += 1.5
    return hidden, logits


def _route(hidden_states, gating_output, topk, renormalize, global_num_experts=None):
    """The layer's custom routing function (softmax top-k over logical experts): it makes
    vllm-ascend's select_experts take its native path, which runs on CPU (0.18.0 and 0.13.0
    also pass global_num_experts)."""
    import torch

    weights, ids = gating_output.softmax(dim=-1).topk(topk, dim=-1)
    return weights.to(hidden_states.dtype), ids.to(torch.int32)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
         sys.argv[6])

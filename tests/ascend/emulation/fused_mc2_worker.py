"""One rank of the FUSED_MC2 visibility contract run (test only; tests/ascend starts it).

    python fused_mc2_worker.py SOURCE LINE RANK WORLD PORT OUT_DIR

Runs vllm-ascend 0.23.0.post1 only (LINE 0.23): the scenarios set its ascend_config's
enable_fused_mc2 and mega_moe_max_tokens.

What runs: the real Patcher applies `moe.capacity`'s ascend site set; each step goes through
the patch's own AscendFusedMoE.forward_impl wrapper (ascend_0_23.make_forward_impl) around a
stand-in for vllm-ascend's forward_impl body (prepare, select_experts and the W8A8 method's
apply do not run: the stand-in makes the call W8A8's apply makes, `moe_comm_method.
fused_experts(fused_experts_input=build_fused_experts_input(...))`, QM/w8a8_dynamic.py:326-
346), then the patched FusedMC2CommImpl.fused_experts, i.e. our counting hook and vllm-
ascend's own method body (log2phy, asserts, the dispatch_ffn_combine call with its real
arguments), then the emulated kernel (fused_mc2_op.py). The FusedMC2CommImpl object is made
without its constructor (it needs an HCCL MC2 group and an NPU tensor); its dispatcher is a
real TokenDispatcherWithMC2 made the same way, whose EP group properties are vLLM's gloo EP
group. Everything this rank saw goes to OUT_DIR/rank{RANK}.pt.
"""

from __future__ import annotations

import logging
import sys
import traceback
import types
from pathlib import Path

import contract_worker as cw

LOCAL, TOP_K, HIDDEN, INTER = 4, 2, 8, 4
GROUP_NAME = "emulated-mc2"
# Logical experts; cw.LOG2PHY puts the hot ones (0, 2, 5, 7) on rank 1 (physical 4..7).
HOT, COLD = (0, 2, 5, 7), (1, 3, 4, 6)


def routing(rank: int, tokens: int):
    """Rank 0: every token one hot and one cold expert; rank 1: two hot experts. Logical ids."""
    import torch

    if rank == 0:
        pairs = [(HOT[t % 4], COLD[t % 4]) for t in range(tokens)]
    else:
        pairs = [(HOT[t % 4], HOT[(t + 1) % 4]) for t in range(tokens)]
    return torch.tensor(pairs, dtype=torch.int32).reshape(tokens, TOP_K)


def main(source: str, line: str, rank: int, world: int, port: int, out_dir: str) -> None:
    assert line == "0.23", f"the FUSED_MC2 run is written for vllm-ascend 0.23.0.post1, not {line}"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import boot

    boot.install(Path(source), device_type="A3")
    import fused_mc2_op

    fused_mc2_op.install()
    results: dict = {}
    try:
        Run(rank, world, port, Path(out_dir), fused_mc2_op).scenarios(results)
    except BaseException:
        results["error"] = traceback.format_exc()
    import torch

    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


class Run:
    def __init__(self, rank, world, port, out_dir: Path, op) -> None:
        import torch

        self.rank, self.world, self.op = rank, world, op
        self.vllm_config = cw._init_groups(rank, world, port)
        self.mods = cw._import_vllm_ascend(cw.RELEASES["0.23"])
        from vllm.distributed import get_ep_group

        op.register_group(GROUP_NAME, get_ep_group().device_group)
        gen = torch.Generator().manual_seed(3)
        experts = LOCAL * world
        self.w13 = torch.randint(-127, 128, (experts, HIDDEN, 2 * INTER), generator=gen,
                                 dtype=torch.int8)
        self.w2 = torch.randint(-127, 128, (experts, INTER, HIDDEN), generator=gen,
                                dtype=torch.int8)
        self.s1 = torch.rand(experts, 2 * INTER, generator=gen) / 256
        self.s2 = torch.rand(experts, HIDDEN, generator=gen) / 256
        self.comm = self._fused_mc2_comm()
        self.metrics_dir = out_dir / "metrics"
        self.gathers = 0
        self._count_gathers()

    def scenarios(self, results: dict) -> None:
        import torch

        from ascend_patch.core import metrics

        self.metrics("over")
        log = _LogLines()
        # Rank 1's last 4 tokens are padding (mc2_mask False): their rows are sent nowhere.
        tokens = 24 if self.rank == 0 else 16
        active = torch.ones(tokens, dtype=torch.bool)
        if self.rank == 1:
            active[-4:] = False
        patcher, record = self.apply({"drop_token_ratio": 0.0, "log_interval": 2})
        steps = []
        for limit in (30, 20, 65536, 48):  # over, over, under, exactly at the limit
            steps.append(self.step(tokens, active, limit))
        results["steps"] = steps
        results["warnings"] = log.take()
        results["stats"] = cw._plain(record.context.read_stats())
        results["gathers"] = self.gathers
        patcher.revert()

        # A rank with no tokens still takes part in every gather (rank 1 here).
        self.metrics("empty")
        patcher, record = self.apply({"drop_token_ratio": 0.0})
        empty = 0 if self.rank == 1 else 24
        results["empty_rank"] = self.step(empty, torch.ones(empty, dtype=torch.bool), 20)
        results["empty_stats"] = cw._plain(record.context.read_stats())
        patcher.revert()

        # Switched off: no collective, nothing counted, the kernel call unchanged.
        self.metrics("off")
        patcher, record = self.apply({"drop_token_ratio": 0.0, "fused_mc2_overflow": False})
        before = self.gathers
        results["off"] = self.step(tokens, active, 20)
        results["off_gathers"] = self.gathers - before
        results["off_stats"] = cw._plain(record.context.read_stats())
        patcher.revert()
        results["unpatched"] = self.step(tokens, active, 20, through_patch=False)
        metrics.reset()
        torch.distributed.barrier()

    def step(self, tokens, active, limit, through_patch=True) -> dict:
        import torch
        from vllm_ascend.ascend_config import get_ascend_config

        config = get_ascend_config()
        config.enable_fused_mc2, config.mega_moe_max_tokens = 1, limit
        gen = torch.Generator().manual_seed(100 + self.rank)
        hidden = torch.randn(tokens, HIDDEN, generator=gen)
        weights = torch.rand(tokens, TOP_K, generator=gen)
        logical = routing(self.rank, tokens)
        inputs = self.mods.args.build_fused_experts_input(
            hidden_states=hidden, topk_weights=weights, topk_ids=logical,
            w1=[self.w13[self._mine()]], w2=[self.w2[self._mine()]],
            quant_type=self.mods.QuantType.W8A8, dynamic_eplb=False,
            mc2_mask=active, log2phy=torch.tensor(cw.LOG2PHY, dtype=torch.int32),
            w1_scale=[self.s1[self._mine()]], w2_scale=[self.s2[self._mine()]],
            w1_scale_bias=[torch.tensor([], dtype=torch.float32)],
            w2_scale_bias=[torch.tensor([], dtype=torch.float32)], swiglu_limit=0.0,
        )
        comm = self.comm

        def body(layer, hidden_states, router_logits, return_with_event=False):
            return comm.fused_experts(fused_experts_input=inputs).routed_out

        calls_before = len(self.op.CALLS)
        layer = types.SimpleNamespace(layer_name="model.layers.3.mlp.experts",
                                      quant_method=types.SimpleNamespace(), ep_size=self.world)
        with cw.Run.forward_context(self, comm):
            if through_patch:
                out = self._patched_forward_impl(body)(layer, hidden, hidden)
            else:
                out = body(layer, hidden, hidden)
        (call,) = self.op.CALLS[calls_before:]
        return {"out": out, "kernel": call, "logical": logical, "active": active,
                "limit": limit}

    # -- building blocks ----------------------------------------------------------------

    def metrics(self, scenario: str) -> None:
        """A fresh metrics directory per scenario: a re-applied patch would restart the same
        labelled series from 0 in this process's files."""
        from ascend_patch.core import metrics

        directory = self.metrics_dir / scenario
        directory.mkdir(parents=True, exist_ok=True)
        metrics.configure({"PROMETHEUS_MULTIPROC_DIR": str(directory)}, lambda *_: None)

    def apply(self, options: dict):
        from ascend_patch.core.patcher import Patcher

        patcher = Patcher()
        (record,) = patcher.apply(cw._loaded_config({"min_tokens": 0, **options}, "0.23"))
        assert record.status == "applied", (record.status, record.reason)
        self._record = record
        return patcher, record

    def _patched_forward_impl(self, body):
        from ascend_patch.impls.moe.adapters import ascend_0_23

        return ascend_0_23.make_forward_impl(body, self._record.context)

    def _mine(self):
        return slice(self.rank * LOCAL, (self.rank + 1) * LOCAL)

    def _fused_mc2_comm(self):
        import torch

        cm, td = self.mods.cm, self.mods.td
        comm = cm.FusedMC2CommImpl.__new__(cm.FusedMC2CommImpl)
        dispatcher = td.TokenDispatcherWithMC2.__new__(td.TokenDispatcherWithMC2)
        dispatcher.moe_all_to_all_group_name = GROUP_NAME
        comm.token_dispatcher = dispatcher
        comm.moe_config = types.SimpleNamespace(num_local_experts=LOCAL,
                                                num_experts=LOCAL * self.world)
        comm.expert_token_nums = torch.zeros(LOCAL, dtype=torch.int32)
        return comm

    def _count_gathers(self) -> None:
        import functools

        comm_utils = self.mods.comm_utils
        original = comm_utils.gather_from_sequence_parallel_region
        run = self

        @functools.wraps(original)
        def gather(input_, group, output_split_sizes=None):
            run.gathers += 1
            return original(input_, group, output_split_sizes)

        comm_utils.gather_from_sequence_parallel_region = gather


class _LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        logging.getLogger("ascend_patch.moe.capacity").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
         sys.argv[6])

"""Lab hooks in every process of a served engine (scripts/bench_engine.py): moe.capacity's
op timers, and a drop ratio switched at run time.

A server's workers are processes vLLM starts, where nothing can be installed from the
outside. The benchmark puts lab/worker_site first on the server's PYTHONPATH: the
`sitecustomize` there calls `install_from_env` at interpreter start, before vLLM binds the
ops. With BENCH_ENGINE_TIMERS=FOLDER, every process that runs an op keeps its totals in
FOLDER/<pid>.json, rewritten after each call (a few per MoE layer and step: cheap against
the op itself), so the benchmark reads them between rounds.

With BENCH_ENGINE_RATIO=FILE as well, every drop step plans with the product planner
(`plan_drops`) at the drop_token_ratio written in FILE instead of the config's (on CPU the
ratio reaches nothing but the planner), and the plans' loads are counted per ratio. One
server then serves every arm of an A/B: the arms share processes, placement and warm-up,
and the rounds of different ratios interleave closely. The benchmark changes FILE only
while the engine is idle, so both ranks of a call plan at the same ratio.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ascend_patch.lab.engine_eval import OpTimers

TIMERS_ENV = "BENCH_ENGINE_TIMERS"
RATIO_ENV = "BENCH_ENGINE_RATIO"


class PlanCounts:
    """Per ratio: calls, routed and dropped rows, bottleneck-bin rows before and after."""

    def __init__(self) -> None:
        self.by_ratio: dict[str, dict[str, float]] = {}

    def add(self, ratio: str, plan: Any) -> None:
        row = self.by_ratio.setdefault(ratio, {"calls": 0, "routed": 0, "dropped": 0,
                                               "max_before": 0, "max_after": 0,
                                               "mean_before": 0.0})
        import torch  # here: this module loads at every process's start (sitecustomize)

        row["calls"] += 1
        # One host read for the call's counters (device tensors: capacity.PlanCounts).
        before, after = plan.bin_load_before, plan.bin_load_after
        routed, dropped, max_before, max_after, load = torch.stack([
            plan.counts.routed_rows, plan.counts.dropped_rows, before.max(), after.max(),
            before.sum()]).tolist()
        row["routed"] += routed
        row["dropped"] += dropped
        row["max_before"] += max_before
        row["max_after"] += max_after
        row["mean_before"] += load / max(before.numel(), 1)


class SwitchedRatio:
    """The planner that plans at the ratio in `path` (the config's while it holds none)."""

    def __init__(self, path: Path, counts: PlanCounts) -> None:
        self.path = path
        self.counts = counts
        self.swap = None

    def ensure_installed(self) -> None:
        # Installed on the first plan call, once the patch session exists (its revert
        # would undo a swap made earlier).
        from ascend_patch.impls.moe.state import CapacityState

        if self.swap is None or self.swap.reverted:
            self.swap = CapacityState.use_planner(self)

    def __call__(self, topk_weights, topk_ids, **kwargs: Any):
        from ascend_patch.impls.moe.planner.capacity import plan_drops

        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        if text:
            kwargs["options"] = kwargs["options"].model_copy(
                update={"drop_token_ratio": float(text)})
        plan = plan_drops(topk_weights, topk_ids, **kwargs)
        self.counts.add(text or "config", plan)
        return plan


class DumpingTimers(OpTimers):
    """OpTimers that also count each op's CPU seconds (the process's: a worker computes on
    the one OpenMP thread vLLM binds it, so this is the op's own work, which the other load
    of a shared machine does not inflate as it does wall time) and write both after each call."""

    def __init__(self, folder: Path, switch: SwitchedRatio | None = None) -> None:
        super().__init__()
        self.path = folder / f"{os.getpid()}.json"
        self.switch = switch
        self.counts = switch.counts if switch else PlanCounts()
        self.cpu_seconds = dict.fromkeys(self.seconds, 0.0)

    def _timed(self, name: str, fn):
        timed = super()._timed(name, fn)

        def dumped(*args: Any):
            if self.switch is not None and name == "plan":
                self.switch.ensure_installed()
            start = time.process_time()
            try:
                return timed(*args)
            finally:
                self.cpu_seconds[name] += time.process_time() - start
                self.dump()

        return dumped

    def dump(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                                   "calls": self.calls, "plans": self.counts.by_ratio}))
        tmp.replace(self.path)


def install_from_env() -> None:
    folder = os.environ.get(TIMERS_ENV)
    if folder:
        ratio = os.environ.get(RATIO_ENV)
        switch = SwitchedRatio(Path(ratio), PlanCounts()) if ratio else None
        DumpingTimers(Path(folder), switch).install()


def read_dumps(folder: Path) -> dict[int, dict[str, Any]]:
    """What each process has written so far, per process id."""
    dumps = {}
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text())
            dumps[int(path.stem)] = {"seconds": data["seconds"],
                                     "cpu_seconds": data.get("cpu_seconds", {}),
                                     "plans": data.get("plans", {})}
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now: the next read has it
    return dumps

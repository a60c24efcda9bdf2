"""moe.capacity's op timers in every process of a served engine (scripts/bench_engine.py).

A server's workers are processes vLLM starts, where lab/engine_eval.py's OpTimers cannot be
installed from the outside. The benchmark puts lab/worker_site first on the server's
PYTHONPATH and sets BENCH_ENGINE_TIMERS to a folder: the `sitecustomize` there calls
`install_from_env` at interpreter start, before vLLM binds the ops, and every process that
runs an op keeps its totals in FOLDER/<pid>.json, rewritten after each call (a few per MoE
layer and step: cheap against the op itself), so the benchmark reads totals between rounds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ascend_patch.lab.engine_eval import OpTimers

ENV = "BENCH_ENGINE_TIMERS"


class DumpingTimers(OpTimers):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.path = folder / f"{os.getpid()}.json"

    def _timed(self, name: str, fn):
        timed = super()._timed(name, fn)

        def dumped(*args: Any):
            try:
                return timed(*args)
            finally:
                self.dump()

        return dumped

    def dump(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": self.seconds, "calls": self.calls}))
        tmp.replace(self.path)


def install_from_env() -> None:
    folder = os.environ.get(ENV)
    if folder:
        DumpingTimers(Path(folder)).install()


def read_totals(folder: Path) -> dict[int, dict[str, float]]:
    """Seconds per op so far, per process id."""
    totals = {}
    for path in folder.glob("*.json"):
        try:
            totals[int(path.stem)] = json.loads(path.read_text())["seconds"]
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now: the next read has it
    return totals

"""One vLLM engine per A/B arm, kept up across the repeats (harness/offline_run.py --driver).

Starting the tiny model's engine took 20-142 s on the loaded 2-core machine while one repeat
of the default workload took 0.4-1.4 s once warm, so a new engine per repeat would spend
nearly all of an A/B run starting engines, and would measure each engine's first, cold pass.

Every wait is bounded: start-up and each command have a deadline, an engine that exits
early is noticed at once (its stdout closes), and stop() ends the engine's whole process
group (the engine core and the workers vLLM starts) with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ascend_patch.ab.common import WORKER_SETTLE_S
from ascend_patch.harness import offline_run


class EngineFailed(RuntimeError):
    pass


class EngineProcess:
    # How long this engine's worker keeps a CPU busy after a request (common.WORKER_SETTLE_S).
    settle_s = WORKER_SETTLE_S

    def __init__(self, label: str, cmd: Sequence[str], env: Mapping[str, str], log_path: Path):
        self.label = label
        self.cmd = list(cmd)
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self._events: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._next_id = 0
        self._tail: list[str] = []
        self.startup_s: float | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        if self.proc is not None:
            raise EngineFailed(f"arm {self.label}: engine already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        threading.Thread(target=self._read, name=f"ab-engine-{self.label}", daemon=True).start()

    def _read(self) -> None:
        prefixes = {offline_run.READY_PREFIX: "ready", offline_run.DONE_PREFIX: "done",
                    offline_run.FAILED_PREFIX: "failed"}
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._tail = (self._tail + [line])[-80:]
                for prefix, kind in prefixes.items():
                    if line.startswith(prefix):
                        try:
                            self._events.put((kind, json.loads(line[len(prefix):])))
                        except json.JSONDecodeError:
                            pass  # another process's text glued to ours: not a status line
        self._events.put(None)  # stdout closed: the engine is gone

    def log_tail(self) -> str:
        return "".join(self._tail)

    def _fail(self, what: str) -> EngineFailed:
        code = self.proc.poll() if self.proc else None
        state = f"exit {code}" if code is not None else "still running"
        return EngineFailed(f"arm {self.label}: {what} ({state}); log {self.log_path}:\n"
                            f"{self.log_tail()[-3000:]}")

    def _wait(self, kinds: set[str], want_id: int | None, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"no answer within {timeout:.0f} s")
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                raise self._fail("the engine exited")
            kind, data = event
            if want_id is not None and data.get("id") != want_id:
                continue
            if kind == "failed":
                raise self._fail(f"command failed: {data.get('error')}")
            if kind in kinds:
                return data

    def wait_ready(self, timeout: float) -> float:
        data = self._wait({"ready"}, None, timeout)
        self.startup_s = float(data["startup_s"])
        return self.startup_s

    def request(self, op: str, out: Path, timeout: float) -> dict[str, Any]:
        """Run one command; returns the result the engine wrote to `out`."""
        assert self.proc is not None and self.proc.stdin is not None
        self._next_id += 1
        command = {"id": self._next_id, "op": op, "out": str(out)}
        try:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._fail("the engine no longer reads commands") from None
        self._wait({"done"}, self._next_id, timeout)
        return json.loads(Path(out).read_text())

    def stop(self, grace: float = 5.0) -> int | None:
        """Ask the engine to quit, then end its process group; returns its exit code.

        The grace is short on purpose: vLLM's own shutdown waited out its grace periods for
        12-17 s per engine on the loaded 2-core machine, and everything ab needs (results,
        reports) has been read before stop() is called."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            if proc.stdin is not None:
                proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc, signal.SIGKILL, 10.0)  # the engine core and workers too
        return proc.returncode


def _kill_group(proc: subprocess.Popen, sig: int, wait: float) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass

"""Imports for `validate` and `plan` where a failure of any kind cannot take the checker down.

A target module may raise anything when imported on the wrong host (a platform module for
another accelerator), or end the interpreter (a fatal signal in a native extension, an
`os._exit`). The checks that import run in a forked child (`Imports.guarded`), which names
each module before importing it: when the child dies, the module it was importing is a
refusal naming how it died, and the checks run again in a new child that does not import it.
The checker's own process imports nothing of vLLM, and vLLM is imported once per run, not
once to try it and once to use it.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import os
import pickle
import select
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

# Long enough for vLLM's heaviest modules on a loaded machine; a module that takes longer is
# reported as hanging.
TIMEOUT_S = 600.0

R = TypeVar("R")

# Modules (and their packages) a guarded child of this process imported without harm: the same
# import is safe here, so a process that checks again (a test, a long-lived tool) imports them
# itself once, and its later children inherit them instead of importing vLLM again.
PROVEN: set[str] = set()


class Imports:
    """Modules imported for the checks, and why those that failed did."""

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}
        self._tell: Callable[[dict], None] | None = None  # set in the guarded child

    def problem(self, module: str) -> str | None:
        """Why `module` cannot be imported (None: it is imported now). Inside `guarded`, a
        failure that ends the process is the parent's to report."""
        if module in self.failed:
            return self.failed[module]
        if module in sys.modules:
            return None
        self._say({"start": module})
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt alike
            text = " ".join(str(exc).split())[:300]
            self.failed[module] = why = f"failed: {type(exc).__name__}" + (
                f": {text}" if text else "")
            self._say({"fail": module, "why": why})
            return why
        self._say({"done": module})
        return None

    def _say(self, message: dict) -> None:
        if self._tell is not None:
            self._tell(message)

    def guarded(self, work: Callable[[], R], timeout: float = TIMEOUT_S) -> R:
        """work() run in a forked child whose imports go through `problem`; its result (or
        exception) comes back pickled. Until one child finishes, each that dies takes its
        current module into `failed`, and the next one starts."""
        if self._tell is not None:  # already the child
            return work()
        while True:
            outcome = self._run_child(work, timeout)
            if outcome is not None:
                kind, value = outcome
                if kind == "raise":
                    raise value
                return value

    def _run_child(self, work: Callable[[], R], timeout: float) -> tuple[str, object] | None:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_end)
            # A fatal signal is the parent's to report, in one line: no traceback dump here.
            faulthandler.disable()
            code = 0
            try:
                stream = os.fdopen(write_end, "w")

                def tell(message: dict) -> None:
                    stream.write(json.dumps(message) + "\n")
                    stream.flush()

                self._tell = tell
                try:
                    outcome = ("return", work())
                except BaseException as exc:  # noqa: BLE001 - handed to the parent
                    outcome = ("raise", exc)
                try:
                    payload = pickle.dumps(outcome)
                except Exception as exc:  # noqa: BLE001 - an unpicklable exception
                    payload = pickle.dumps(("raise", RuntimeError(repr(outcome[1]) or str(exc))))
                tell({"outcome": payload.hex()})
            except BaseException:  # noqa: BLE001 - whatever happens, the child ends here
                code = 1
            finally:
                os._exit(code)
        os.close(write_end)
        current: str | None = None
        outcome = None
        buffer = b""
        hung = False
        with os.fdopen(read_end, "rb", buffering=0) as stream:
            while True:
                ready, _, _ = select.select([stream], [], [], timeout)
                if not ready:
                    hung = True
                    os.kill(pid, signal.SIGKILL)
                    break
                chunk = stream.read(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if "start" in message:
                        current = message["start"]
                    elif "fail" in message:
                        self.failed[message["fail"]] = message["why"]
                        current = None
                    elif "done" in message:
                        parts = message["done"].split(".")  # its packages imported too
                        PROVEN.update(".".join(parts[:n]) for n in range(1, len(parts) + 1))
                        current = None
                    elif "outcome" in message:
                        outcome = pickle.loads(bytes.fromhex(message["outcome"]))
        _, status = os.waitpid(pid, 0)
        if outcome is not None:
            return outcome
        if current is None:
            # Died outside any import: not a module's doing, so no retry can help.
            raise RuntimeError("the checks' child process died outside any import "
                               f"({_death(status, hung, timeout)})")
        self.failed[current] = _death(status, hung, timeout)
        return None


def _death(status: int, hung: bool, timeout: float) -> str:
    if hung:
        return f"did not finish within {timeout:g}s"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed the process ({signal.Signals(number).name})"
        except ValueError:
            return f"killed the process (signal {number})"
    return f"ended the process (exit status {os.waitstatus_to_exitcode(status)})"

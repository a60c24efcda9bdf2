"""Importing modules for `validate` where a failure of any kind cannot take the checker down.

A target module may raise anything when imported on the wrong host (a platform module for
another accelerator), or end the interpreter (a fatal signal in a native extension, an
`os._exit`). `validate` imports each module a check needs in a child interpreter first; only
the modules that imported there are imported in the checker's own process, and each other is
a refusal naming the module and how its import failed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterable

# Long enough for vLLM's heaviest modules on a loaded machine; a module that takes longer is
# reported as hanging.
TIMEOUT_S = 600.0

# The child: report each module before and after importing it, so that the parent knows which
# one was being imported when the child died.
_CHILD = """
import json, sys, traceback
sys.path[:] = json.loads(sys.argv[1])
for name in sys.argv[2:]:
    print("start", name, flush=True)
    try:
        __import__(name)
    except BaseException as exc:
        text = " ".join(str(exc).split())[:300]
        print("fail", name, type(exc).__name__ + (": " + text if text else ""), flush=True)
    else:
        print("ok", name, flush=True)
"""


def import_failures(modules: Iterable[str], timeout: float = TIMEOUT_S) -> dict[str, str]:
    """{module: why importing it failed} for each of `modules` whose import raises, kills or
    hangs a child interpreter; the others are not in the result."""
    pending = list(dict.fromkeys(modules))
    failures: dict[str, str] = {}
    while pending:
        finished, current, died = _run_child(pending, timeout)
        failures.update({name: why for name, why in finished.items() if why})
        if current is None:
            break
        failures[current] = died
        pending = pending[pending.index(current) + 1:]
    return failures


def _run_child(modules: list[str], timeout: float) -> tuple[dict[str, str], str | None, str]:
    """What the child said per module ("" when it imported), the module it was importing when
    it died (None: it did not die), and how it died."""
    argv = [sys.executable, "-c", _CHILD, json.dumps(sys.path), *modules]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        output, code = run.stdout, run.returncode
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or b""
        output = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        code = None
    finished: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        kind, _, rest = line.partition(" ")
        name, _, why = rest.partition(" ")
        if kind == "start":
            current = name
        elif kind in ("ok", "fail") and name == current:
            finished[name] = f"failed: {why}" if kind == "fail" else ""
            current = None
    if current is None:  # every module said how its import went (a failure at exit is no
        return finished, None, ""  # module's: the checker's process does not exit)
    if code is None:
        died = f"did not finish within {timeout:g}s"
    elif code < 0:
        try:
            died = f"killed the process ({signal.Signals(-code).name})"
        except ValueError:
            died = f"killed the process (signal {-code})"
    else:
        died = f"ended the process (exit status {code})"
    return finished, current, died

"""Per-process report: one log line per patch, and a JSON file when ASCEND_PATCH_REPORT_DIR is set."""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ascend_patch import __version__

log = logging.getLogger("ascend_patch")

REPORT_DIR_ENV = "ASCEND_PATCH_REPORT_DIR"
REPORT_INTERVAL_ENV = "ASCEND_PATCH_REPORT_INTERVAL"
# The process whose writer thread runs (a forked child has none and starts its own).
_writer_pid: int | None = None


def process_role() -> str:
    # vLLM names its processes (EngineCore_DP0, VllmWorker-0, ...); the first is MainProcess.
    return multiprocessing.current_process().name


def snapshot() -> dict[str, Any]:
    from ascend_patch.core.imports import WATCHER
    from ascend_patch.core.patcher import PATCHER
    from ascend_patch.core.versions import installed_vllm

    config = PATCHER.config
    torch_module = sys.modules.get("torch")
    return {
        "pid": os.getpid(),
        "role": process_role(),
        "ascend_patch": __version__,
        "vllm": str(installed_vllm()),
        "torch": getattr(torch_module, "__version__", None),
        "config": config.path if config else None,
        "digest": config.digest if config else None,
        "profile": config.profile if config else None,
        "vllm_line": config.stack.line if config else None,
        "platform": config.stack.platform if config else None,
        "patches": [r.as_json() for r in PATCHER.records.values()],
        "waiting_for_import": WATCHER.watched(),
        "updated_at": time.time(),
    }


def report_path(directory: str | Path) -> Path:
    return Path(directory) / f"{process_role()}-{os.getpid()}.json"


def flush() -> Path | None:
    """Write this process's report atomically, if ASCEND_PATCH_REPORT_DIR is set."""
    directory = os.environ.get(REPORT_DIR_ENV)
    if not directory:
        return None
    _start_background_writer()
    target = report_path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(snapshot(), indent=2, default=str)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        handle.write(body)
    os.replace(tmp, target)
    return target


def report_interval() -> float:
    """Seconds between background rewrites (ASCEND_PATCH_REPORT_INTERVAL); raises if invalid."""
    raw = os.environ.get(REPORT_INTERVAL_ENV, "1")
    try:
        return float(raw)
    except ValueError:
        from ascend_patch.core.errors import ConfigError

        raise ConfigError.single(f"${REPORT_INTERVAL_ENV}", None, "",
                                 f"{raw!r} is not a number of seconds") from None


def _start_background_writer() -> None:
    """Rewrite the report every ASCEND_PATCH_REPORT_INTERVAL seconds, and at exit.

    vLLM stops its workers with signals, and atexit does not always run then: without the
    periodic write a report could miss a worker's last counters.
    """
    global _writer_pid
    if _writer_pid == os.getpid():
        return
    _writer_pid = os.getpid()
    atexit.register(_flush_quietly)
    interval = report_interval()
    if interval <= 0:
        return

    def loop() -> None:
        while True:
            time.sleep(interval)
            _flush_quietly()

    threading.Thread(target=loop, name="ascend-patch-report", daemon=True).start()


def _flush_quietly() -> None:
    try:
        flush()
    except (RuntimeError, OSError, ValueError):
        # A counter dict changed while being serialised, or the directory went away: the
        # next write catches up. A report must never break the process that writes it.
        pass


def read_reports(directory: str | Path) -> list[dict[str, Any]]:
    """All reports in a directory (what tests and tools use)."""
    # Skip the temporary files of a write in progress (".tmp-*.json", renamed when complete).
    paths = sorted(p for p in Path(directory).glob("*.json") if not p.name.startswith("."))
    return [json.loads(p.read_text()) for p in paths]


def log_records(records) -> None:
    role = process_role()
    for record in records:
        targets = ", ".join(record.targets.values())
        if record.status == "applied":
            extra = f"; also patched copies {', '.join(record.copies)}" if record.copies else ""
            log.info("ascend-patch [%s pid %d]: %s (%s) applied -> %s%s",
                     role, os.getpid(), record.name, record.impl, targets, extra)
        elif record.status == "pending":
            waiting = [t for role_, t in record.targets.items() if role_ not in record.applied_roles]
            log.info("ascend-patch [%s pid %d]: %s (%s) waits for import of %s",
                     role, os.getpid(), record.name, record.impl, ", ".join(waiting))
        else:
            log.warning("ascend-patch [%s pid %d]: %s (%s) %s: %s",
                        role, os.getpid(), record.name, record.impl, record.status, record.reason)

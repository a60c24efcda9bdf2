"""Per-process report: one log line per patch, and a JSON file when ASCEND_PATCH_REPORT_DIR is set.

The report is a side channel: a directory that cannot be written (a file in its place, no
permission, removed, disk full) costs one warning, never a failed patch, import or request.
What goes into it comes from a snapshot provider that the runtime registers, so this module
imports nothing of the patcher.

Each report is named by the process's role and ranks (ranks.py) and its pid:
`worker-dp1-tp0-ep1-12009.json`. The pid keeps names unique while the ranks are unknown
(every worker is `worker` until its process groups exist) and between processes with no
ranks (several API servers, the headless launchers of nodes that share the directory), and
a process restarted on the same rank does not overwrite the report of the one it replaces.
A process whose ranks become known after its first write renames its report.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ascend_patch import __version__
from ascend_patch.core import ranks
from ascend_patch.core.session import SESSION

log = logging.getLogger("ascend_patch")

# Where and how often this process writes its report (runtime.apply_from_env sets them from
# the validated settings); None: no report.
_directory: Path | None = None
DEFAULT_INTERVAL = 1.0
_interval: float = DEFAULT_INTERVAL
_provider: Callable[[], dict[str, Any]] | None = None
# The process whose writer thread runs (a forked child has none and starts its own).
_writer_pid: int | None = None
# Set to stop that thread (the session's revert).
_writer_stop: threading.Event | None = None
# Whether the last write failed and was reported: one warning until a write succeeds again.
_warned = False
# (pid, path) of this process's last written report: moved when its name changes.
_written: tuple[int, Path] | None = None
_lock = threading.Lock()


def process_role() -> str:
    # vLLM names its processes (EngineCore_DP0, VllmWorker-0, ...); the first is MainProcess.
    # Log lines keep this name: it is also how vLLM's own log lines name the process.
    return multiprocessing.current_process().name


def set_snapshot_provider(provider: Callable[[], dict[str, Any]] | None) -> None:
    """Register what the report holds besides pid, role and versions (config, patches)."""
    global _provider
    _provider = provider


def configure(directory: str | Path | None, interval: float = DEFAULT_INTERVAL) -> str | None:
    """Write reports to `directory` (None: no reports), rewritten every `interval` seconds.

    Checks the directory at once (creates it, writes and removes a probe file) so that a bad
    one is found before anything is patched; returns the warning it logged, if any. Reports
    stay on either way: the directory may become usable later.
    """
    global _directory, _interval, _warned, _written
    _directory = Path(directory) if directory else None
    _interval = interval
    _warned = False
    _written = None
    if _directory is not None or _interval != DEFAULT_INTERVAL:
        SESSION.on_revert("report", configure_off)
    if _directory is None:
        return None
    problem = _probe(_directory)
    if problem is not None:
        _warn(problem)
    return problem


def configure_off() -> None:
    """No reports, at the default interval (what a fresh process has)."""
    configure(None)


def directory() -> Path | None:
    return _directory


def _probe(where: Path) -> str | None:
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".probe-", suffix=".json")
        os.close(fd)
        os.unlink(tmp)
    except FileExistsError:
        return f"cannot write reports to {where}: it exists and is not a directory"
    except (OSError, ValueError) as exc:
        return f"cannot write reports to {where}: {_reason(exc)}"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc)


def _warn(problem: str) -> None:
    global _warned
    _warned = True
    log.warning("ascend-patch [%s pid %d]: %s ($ASCEND_PATCH_REPORT_DIR); patching and serving "
                "go on without the report (warned once)", process_role(), os.getpid(), problem)


def snapshot() -> dict[str, Any]:
    import sys

    from ascend_patch.core.versions import installed_vllm

    torch_module = sys.modules.get("torch")
    data: dict[str, Any] = {
        "pid": os.getpid(),
        **ranks.current().fields(),
        "ascend_patch": __version__,
        "vllm": str(installed_vllm()),
        "torch": getattr(torch_module, "__version__", None),
        "config": None,
        "digest": None,
        "profile": None,
        "patches": [],
        "waiting_for_import": [],
    }
    if _provider is not None:
        data.update(_provider())
    data["updated_at"] = time.time()
    return data


def report_path(directory: str | Path, label: str | None = None) -> Path:
    label = ranks.current().label if label is None else label
    return Path(directory) / f"{label}-{os.getpid()}.json"


def flush() -> Path | None:
    """Write this process's report atomically, if reports are on; never raises.

    A failed write logs one warning (until a write succeeds again) and is retried at the
    next flush: the directory may be back by then (a removed one is created again).
    """
    global _warned
    where = _directory
    if where is None:
        return None
    _start_background_writer()
    try:
        with _lock:
            target = _write(where)
    except (OSError, ValueError) as exc:
        if not _warned:
            _warn(f"cannot write reports to {where}: {_reason(exc)}")
        return None
    except Exception:  # noqa: BLE001 - e.g. a counter dict changed while being serialised
        return None  # the next write catches up
    if _warned:
        _warned = False
        log.info("ascend-patch [%s pid %d]: report written to %s again", process_role(),
                 os.getpid(), target)
    return target


def _write(where: Path) -> Path:
    global _written
    data = snapshot()
    target = report_path(where, data["label"])
    body = json.dumps(data, indent=2, default=str)
    where.mkdir(parents=True, exist_ok=True)
    previous = _written[1] if _written is not None and _written[0] == os.getpid() else None
    if previous is not None and previous != target and previous.parent == target.parent:
        # Renamed (ranks now known): move the old file first so that a reader never sees
        # two reports of this process; the write below then replaces its content.
        try:
            os.replace(previous, target)
        except FileNotFoundError:
            pass
    fd, tmp = tempfile.mkstemp(dir=where, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _written = (os.getpid(), target)
    return target


def _start_background_writer() -> None:
    """Rewrite the report every ASCEND_PATCH_REPORT_INTERVAL seconds, and at exit.

    vLLM stops its workers with signals, and atexit does not always run then: without the
    periodic write a report could miss a worker's last counters.
    """
    global _writer_pid, _writer_stop
    if _writer_pid == os.getpid():
        return
    _writer_pid = os.getpid()
    atexit.register(flush)
    stop = _writer_stop = threading.Event()
    SESSION.on_revert("report.writer", _stop_background_writer)
    interval = _interval
    if interval <= 0:
        return

    def loop() -> None:
        while not stop.wait(interval):
            flush()

    threading.Thread(target=loop, name="ascend-patch-report", daemon=True).start()


def _stop_background_writer() -> None:
    """Stop the writer thread and the write at exit: the next configure starts them again
    with its own interval."""
    global _writer_pid, _writer_stop
    if _writer_stop is not None:
        _writer_stop.set()
    atexit.unregister(flush)
    _writer_pid, _writer_stop = None, None


def read_reports(directory: str | Path) -> list[dict[str, Any]]:
    """All reports in a directory (what tests and tools use)."""
    # Skip the temporary files of a write in progress (".tmp-*.json", renamed when complete).
    paths = sorted(p for p in Path(directory).glob("*.json") if not p.name.startswith("."))
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(path.read_text()))
        except FileNotFoundError:
            pass  # renamed by its process since the listing (its ranks became known)
    return reports


def report_order(report: dict[str, Any]) -> tuple:
    """Sort key: first processes, then engine cores, then workers, each by rank."""
    role = report.get("role")
    kind = ranks.ROLES.index(role) if role in ranks.ROLES else len(ranks.ROLES)
    at = tuple(-1 if report.get(k) is None else report[k]
               for k in ("node_rank", "dp_rank", "pp_rank", "tp_rank", "ep_rank", "index"))
    return kind, at, report.get("pid", 0)


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

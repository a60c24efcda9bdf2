"""Counters and gauges on vLLM's /metrics, through prometheus_client's multiprocess files.

The counters live in the worker processes (where the model runs) and /metrics is served by
the API server process: prometheus_client's multiprocess mode is how one process exposes
another's numbers. Each process writes its values into a per-process file
(`counter_<pid>.db`, `gauge_<mode>_<pid>.db`, prometheus_client's MmapedDict format) in one
directory, and the serving process aggregates the directory with
`prometheus_client.multiprocess.MultiProcessCollector` (counters summed over processes,
gauges by their multiprocess_mode).

Which directory, in every process (`configure`, run by the loader before anything is
patched):

* PROMETHEUS_MULTIPROC_DIR set (by the user, or by vLLM itself for api_server_count > 1):
  that one. vLLM's /metrics then already aggregates it (vllm/v1/metrics/prometheus.py,
  get_prometheus_registry), so our files simply join vLLM's.
* otherwise ASCEND_PATCH_METRICS_DIR (inherited from the first process, or set by the user):
  a directory of our own, which the process registers as a MultiProcessCollector on
  prometheus_client's default REGISTRY, the registry vLLM's /metrics serves in that case.
  The first process creates a temporary one when neither is set, passes it to its children,
  and removes it when it exits.

Our own directory leaves vLLM's metrics exactly as they were: vLLM's multiprocess mode is
decided when prometheus_client is first imported (values.ValueClass), which in the API
server happens before any plugin loads, so switching it on from here would drop the API
server's own metrics from /metrics. Only our `ascend_patch_*` families are added.

Writes are a few bytes into a memory-mapped file (no syscall, no formatting): the series
objects are made once per layer and their keys precomputed, so a counter increment costs
about a microsecond. The directory is a side channel, like the report: one that cannot be
used costs a warning, never a failed patch.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ascend_patch.core import settings
from ascend_patch.core.session import SESSION

log = logging.getLogger("ascend_patch")

PREFIX = "ascend_patch_"
PROMETHEUS_DIR = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR = settings.METRICS_DIR
# Gauge aggregation modes prometheus_client knows (prometheus_client.metrics.Gauge).
GAUGE_MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
               "mostrecent", "livemostrecent")


@dataclass
class _State:
    directory: Path | None = None
    # Set when this process created `directory` and removes it at exit.
    created: Path | None = None
    collector: Any = None
    writer: Writer | None = None
    why: str = ""


_state = _State()
_lock = threading.Lock()


def configure(env: MutableMapping[str, str], set_env: Callable[[str, str], None]) -> Path | None:
    """Choose (and if needed create) this process's metrics directory; register the
    collector that puts its files on /metrics. `set_env(name, value)` passes a created
    directory to child processes (the loader restores it on reset). None: metrics off."""
    reset()
    SESSION.on_revert("metrics", reset)
    prometheus_dir = env.get(PROMETHEUS_DIR)
    if prometheus_dir:
        return _use(Path(prometheus_dir), "PROMETHEUS_MULTIPROC_DIR", collect=False)
    ours = env.get(METRICS_DIR)
    if ours:
        return _use(Path(ours), f"${METRICS_DIR}", collect=True, create=True)
    try:
        created = Path(tempfile.mkdtemp(prefix="ascend-patch-metrics-"))
    except OSError as exc:
        return _off(f"cannot create a metrics directory in {tempfile.gettempdir()}: {exc}")
    _state.created = created
    owner = os.getpid()
    # A forked child inherits atexit handlers: only the creator removes the directory.
    atexit.register(lambda: _remove(created) if os.getpid() == owner else None)
    set_env(METRICS_DIR, str(created))
    return _use(created, "created by this process", collect=True)


def _use(directory: Path, why: str, *, collect: bool, create: bool = False) -> Path | None:
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        if not directory.is_dir():
            return _off(f"{directory} ({why}) is not a directory")
        if collect:
            _register_collector(directory)
    except (OSError, ValueError) as exc:
        return _off(f"cannot use {directory} ({why}) for metrics: {exc}")
    _state.directory, _state.why = directory, why
    return directory


def _off(problem: str) -> None:
    log.warning("ascend-patch [pid %d]: %s; serving goes on without ascend_patch_* metrics",
                os.getpid(), problem)
    _state.directory, _state.why = None, problem
    return None


def _register_collector(directory: Path) -> None:
    from prometheus_client import REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    # Kept to unregister on reset: a second collector of the same directory would make the
    # registry refuse the families it already knows from the first.
    _state.collector = MultiProcessCollector(REGISTRY, path=str(directory))


def _remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def reset() -> None:
    """Unregister the collector and remove a directory this process created (tests, and
    the loader's reset)."""
    with _lock:
        writer, _state.writer = _state.writer, None
    if writer is not None:
        writer.close()
    if _state.collector is not None:
        from prometheus_client import REGISTRY

        try:
            REGISTRY.unregister(_state.collector)
        except KeyError:
            pass
    if _state.created is not None:
        _remove(_state.created)
    _state.directory, _state.created, _state.collector, _state.why = None, None, None, ""


def directory() -> Path | None:
    return _state.directory


def describe() -> dict[str, Any]:
    """For the process report."""
    return {"dir": str(_state.directory) if _state.directory else None,
            "created_here": _state.created is not None, "why": _state.why}


def process_label() -> str:
    """The `process` label of this process's series: its role and ranks (ranks.py), e.g.
    `worker-dp1-tp0-ep1`. Rank-based, not pid-based: a restarted process writes the same
    series again instead of adding new ones, so the series count stays bounded by the
    deployment's shape."""
    from ascend_patch.core import ranks

    return ranks.current().label


def writer() -> Writer | None:
    """This process's writer (None when metrics are off)."""
    with _lock:
        if _state.writer is None and _state.directory is not None:
            _state.writer = Writer(_state.directory)
        return _state.writer


# --------------------------------------------------------------------------------------
# Writing prometheus_client's multiprocess files
# --------------------------------------------------------------------------------------


@dataclass
class Series:
    """One labelled counter or gauge value of this process."""

    writer: Writer
    prefix: str  # file prefix: "counter" or "gauge_<mode>"
    key: str
    timestamped: bool
    value: float = 0.0
    pid: int = field(default_factory=os.getpid)

    def inc(self, amount: float) -> None:
        self.value += amount
        self.writer.write(self)

    def set(self, value: float) -> None:
        self.value = value
        self.writer.write(self)


class Writer:
    """The per-process files of one metrics directory (prometheus_client's layout)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._files: dict[str, Any] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._failed = False

    def counter(self, name: str, documentation: str, labels: Mapping[str, str]) -> Series:
        return self._series("counter", name, name + "_total", documentation, labels, False)

    def gauge(self, name: str, documentation: str, labels: Mapping[str, str],
              mode: str) -> Series:
        if mode not in GAUGE_MODES:
            raise ValueError(f"unknown gauge multiprocess_mode {mode!r} ({', '.join(GAUGE_MODES)})")
        return self._series(f"gauge_{mode}", name, name, documentation, labels,
                            mode.endswith("mostrecent"))

    def _series(self, prefix: str, name: str, sample: str, documentation: str,
                labels: Mapping[str, str], timestamped: bool) -> Series:
        from prometheus_client.mmap_dict import mmap_key

        if not name.startswith(PREFIX):
            raise ValueError(f"metric {name!r} must start with {PREFIX!r}")
        names = list(labels)
        key = mmap_key(name, sample, names, [str(labels[n]) for n in names], documentation)
        series = Series(self, prefix, key, timestamped)
        self.write(series)  # the series appears at 0 before its first event
        return series

    def write(self, series: Series) -> None:
        with self._lock:
            if self._failed:
                return
            pid = os.getpid()
            if pid != self._pid:
                # Forked: the parent's files are not ours to write, nor its counts.
                self._files, self._pid = {}, pid
            if series.pid != pid:
                series.pid, series.value = pid, 0.0
            try:
                file = self._files.get(series.prefix)
                if file is None:
                    file = self._files[series.prefix] = self._open(series.prefix, pid)
                file.write_value(series.key, series.value,
                                 time.time() if series.timestamped else 0.0)
            except (OSError, ValueError) as exc:  # a side channel must not fail a forward
                self._failed = True
                log.warning("ascend-patch [pid %d]: cannot write metrics to %s: %s; "
                            "ascend_patch_* metrics of this process stop here", pid,
                            self.directory, exc)

    def _open(self, prefix: str, pid: int) -> Any:
        from prometheus_client.mmap_dict import MmapedDict

        return MmapedDict(str(self.directory / f"{prefix}_{pid}.db"))

    def close(self) -> None:
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files = {}

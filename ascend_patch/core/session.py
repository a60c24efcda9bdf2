"""The one session of this process: what ascend-patch applied here, and how to undo it.

Whatever per-process state a module creates (installed patches, pending import hooks, the
model-config hook, the report and metrics settings, cached classes and ranks, variables
written for child processes) it registers an undo for with `SESSION.on_revert(name, undo)`
at the moment it creates that state. `SESSION.revert()` runs the undos newest first, so
nothing here knows the modules, and a module added later is reverted without touching this
file or the runtime.

One session per process, a module global, not reset after fork: a forked child (vLLM's
engine and workers on CUDA and NPU, `VLLM_WORKER_MULTIPROC_METHOD=fork`) inherits the
patched functions, the watcher on `sys.meta_path` and the variables written to os.environ,
so it inherits their undos with them; the plugin then runs again in the child, finds the
same config applied and changes nothing. A spawned child (vLLM's choice on CPU,
platforms/cpu.py) imports everything afresh and starts with an empty session. What must
not cross a fork (the report's writer thread, metrics files, the ranks) is keyed on the pid
by its own module; the session's lock is held across a fork, so that a child never starts
with an apply that another thread of its parent had half done.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

from ascend_patch.core.errors import AscendPatchError

log = logging.getLogger("ascend_patch")

Undo = Callable[[], object]
# (config path, digest, pinned profile, ASCEND_PATCH_OVERRIDE, ASCEND_PATCH_DISABLE)
AppliedKey = tuple[str, str, "str | None", str, str]

ENV_UNDO = "session.env"


class RevertError(AscendPatchError):
    """Some undos failed; every other one ran. `failures`: (name, exception), in run order."""

    def __init__(self, failures: list[tuple[str, BaseException]]):
        self.failures = failures
        parts = [f"{name}: {type(exc).__name__}: {exc}" for name, exc in failures]
        super().__init__(f"ascend-patch: revert: {len(failures)} undo(s) failed (the others "
                         "ran): " + "; ".join(parts))


class Session:
    def __init__(self) -> None:
        # Held by apply and revert (and the patcher's lazy installs): reentrant because an
        # apply reverts what it did when it fails, and a lazy install can import a module
        # that another hook watches.
        self.lock = threading.RLock()
        # Guards only the registry below and is never held while calling out, so that a
        # module may register from under its own lock (the report's writer reads the ranks)
        # without ordering that lock against `lock`.
        self._registry_lock = threading.Lock()
        self._undos: dict[str, Undo] = {}
        self.applied: AppliedKey | None = None
        # The environment written to (os.environ, or a test's dict) and the value (None:
        # unset) each variable had before this session first set it.
        self.env: MutableMapping[str, str] | None = None
        self._saved_env: dict[str, str | None] = {}
        # Not reverted: each unknown ASCEND_PATCH_* variable is warned about once per
        # process, however often a test applies and reverts.
        self.warned: set[str] = set()

    # -- the undo registry --------------------------------------------------------------
    def on_revert(self, name: str, undo: Undo) -> None:
        """Run `undo` at the next revert, after every undo registered later than `name`.

        One undo per name: registering a name again replaces its undo (the latest one knows
        the latest state) and keeps its place, the time the state was first created, since
        everything registered after that may depend on it. Undos must be idempotent: a
        module may also undo its state itself before the session reverts.
        """
        with self._registry_lock:
            self._undos[name] = undo

    def cancel(self, name: str) -> bool:
        """Forget `name`'s undo without running it (its owner undid the state itself)."""
        with self._registry_lock:
            return self._undos.pop(name, None) is not None

    def pending(self) -> list[str]:
        """The names of the registered undos, oldest first (revert runs them last first)."""
        with self._registry_lock:
            return list(self._undos)

    def revert(self) -> None:
        """Undo everything registered, newest first, then forget what was applied.

        Every undo runs even when one fails; then one `RevertError` names each that failed
        (each is logged with its traceback). An undo that registers a name that already ran
        in this revert leaves it for the next one instead of looping. A KeyboardInterrupt or
        SystemExit stops the revert at once: what did not run stays registered.
        """
        with self.lock:
            done: set[str] = set()
            failures: list[tuple[str, BaseException]] = []
            while (entry := self._pop_newest(done)) is not None:
                name, undo = entry
                done.add(name)
                try:
                    undo()
                except Exception as exc:  # noqa: BLE001 - collected, raised below
                    log.error("ascend-patch [pid %d]: revert: %s failed", os.getpid(), name,
                              exc_info=exc)
                    failures.append((name, exc))
            self.applied = None
            if failures:
                raise RevertError(failures) from failures[0][1]

    def _pop_newest(self, skip: set[str]) -> tuple[str, Undo] | None:
        with self._registry_lock:
            for name in reversed(self._undos):
                if name not in skip:
                    return name, self._undos.pop(name)
        return None

    # -- variables for child processes --------------------------------------------------
    def set_env(self, env: MutableMapping[str, str], key: str, value: str) -> None:
        """Set `key` in `env` for child processes; revert puts back what was there."""
        with self._registry_lock:
            if self.env is not env:
                self._restore_env_locked()
                self.env = env
            if key not in self._saved_env:
                self._saved_env[key] = env.get(key)
            env[key] = value
        self.on_revert(ENV_UNDO, self._restore_env)

    def _restore_env(self) -> None:
        with self._registry_lock:
            self._restore_env_locked()

    def _restore_env_locked(self) -> None:
        if self.env is not None:
            for key, value in self._saved_env.items():
                if value is None:
                    self.env.pop(key, None)
                else:
                    self.env[key] = value
        self.env, self._saved_env = None, {}

    # -- what it holds ------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What is applied, the variables set for children, the pending undos (oldest first)."""
        with self._registry_lock:
            return {"applied": self.applied, "env_set": sorted(self._saved_env),
                    "undo": list(self._undos)}


SESSION = Session()


def _hold_across_fork() -> None:
    # A fork while another thread applies or reverts would give the child a half-applied
    # session and a lock no thread of it can release: the fork waits for the apply instead.
    os.register_at_fork(before=SESSION.lock.acquire, after_in_parent=SESSION.lock.release,
                        after_in_child=SESSION.lock.release)


_hold_across_fork()

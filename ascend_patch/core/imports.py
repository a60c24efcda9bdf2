"""Post-import hooks: run a callback right after a module is first executed.

A patch whose target module is not imported yet must not import it (the API server process
never builds a model, so it should never import the fused MoE layer). The watcher sits first on
`sys.meta_path`, lets the real finders find the module, and wraps the loader so that the
callbacks run when the module body has run, before any importer sees the module. An exception
in a callback makes that import fail with the callback's message. When an import fails (in
the module body or in a callback), the module is discarded, so its callbacks are watched
again: the next import of the module runs them on the new module object.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ascend_patch.core.session import SESSION

Callback = Callable[[ModuleType], None]


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, callbacks: list[Callback], watcher: ImportWatcher):
        self._loader = loader
        self._callbacks = callbacks
        self._watcher = watcher

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Put the real loader back first: tools that inspect __loader__ expect it.
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        try:
            self._loader.exec_module(module)
            for callback in self._callbacks:
                callback(module)
        except BaseException:
            self._watcher.rewatch(module.__name__, self._callbacks)
            raise


class ImportWatcher(importlib.abc.MetaPathFinder):
    def __init__(self, name: str = "imports.watcher") -> None:
        self.name = name
        self._callbacks: dict[str, list[Callback]] = {}
        self._lock = threading.Lock()

    def watch(self, module_name: str, callback: Callback) -> None:
        with self._lock:
            self._callbacks.setdefault(module_name, []).append(callback)
            self._install()

    def rewatch(self, module_name: str, callbacks: list[Callback]) -> None:
        """Watch again for callbacks whose import failed (ahead of any added since)."""
        with self._lock:
            self._callbacks[module_name] = callbacks + self._callbacks.get(module_name, [])
            self._install()

    def _install(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)
            SESSION.on_revert(self.name, self.clear)

    def clear(self) -> None:
        with self._lock:
            self._callbacks.clear()
            if self in sys.meta_path:
                sys.meta_path.remove(self)

    def watched(self) -> list[str]:
        return sorted(self._callbacks)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        with self._lock:
            callbacks = self._callbacks.pop(fullname, None)
        if callbacks is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            with self._lock:
                self._callbacks[fullname] = callbacks
            return spec
        spec.loader = _HookedLoader(spec.loader, callbacks, self)
        return spec


WATCHER = ImportWatcher()

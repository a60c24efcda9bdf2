"""Errors the loader raises; each names where in which file the problem is."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


class AscendPatchError(RuntimeError):
    """Base of every error the patcher raises on purpose."""


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name a mistyped `name` most likely meant, or None when none is close."""
    found = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return found[0] if found else None


class ConfigError(AscendPatchError):
    """A config that cannot be applied; carries every problem found, in file order."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line or 0, p.key))
        super().__init__(self._render())

    @classmethod
    def single(cls, file: str, line: int | None, key: str, message: str) -> ConfigError:
        return cls([Problem(file, line, key, message)])

    def _render(self) -> str:
        if len(self.problems) == 1:
            return f"invalid ascend-patch config: {self.problems[0]}"
        lines = [f"invalid ascend-patch config ({len(self.problems)} problems):"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


class PatchError(AscendPatchError):
    """A patch that could not be applied to the running vLLM (target, signature, version)."""


class TargetConflict(PatchError):
    """Two patches of one config on one function (aliases, re-exports, inherited attributes)."""


class ConsistencyError(AscendPatchError):
    """Processes of one deployment would run different configs."""

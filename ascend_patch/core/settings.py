"""Every ASCEND_PATCH_* environment variable, read and validated in one place, up front.

`Settings.from_environ(env)` checks all of them before anything is patched and raises one
ConfigError listing every bad value, each naming its variable (`$ASCEND_PATCH_X: ...`). An
empty value means unset. Variables with the prefix that are not ours (typos) are reported by
`unknown_variables`, each with the closest known name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ascend_patch.core.errors import ConfigError, Problem, closest
from ascend_patch.core.source import Document, parse_document
from ascend_patch.core.spec import PATCH_NAME_PATTERN

PREFIX = "ASCEND_PATCH_"
CONFIG = "ASCEND_PATCH_CONFIG"
CONFIG_DIGEST = "ASCEND_PATCH_CONFIG_DIGEST"
DISABLE = "ASCEND_PATCH_DISABLE"
PROFILE = "ASCEND_PATCH_PROFILE"
PROFILE_RESOLVED = "ASCEND_PATCH_PROFILE_RESOLVED"
OVERRIDE = "ASCEND_PATCH_OVERRIDE"
REPORT_DIR = "ASCEND_PATCH_REPORT_DIR"
REPORT_INTERVAL = "ASCEND_PATCH_REPORT_INTERVAL"
LOG_LEVEL = "ASCEND_PATCH_LOG_LEVEL"
METRICS_DIR = "ASCEND_PATCH_METRICS_DIR"
KNOWN = (CONFIG, CONFIG_DIGEST, DISABLE, PROFILE, PROFILE_RESOLVED, OVERRIDE, REPORT_DIR,
         REPORT_INTERVAL, LOG_LEVEL, METRICS_DIR)

# "-" in ASCEND_PATCH_PROFILE_RESOLVED: the first process chose the base patches.
BASE = "-"
# An override is a handful of options; anything longer is a mistake (or an attack).
MAX_OVERRIDE_BYTES = 64 * 1024
# Rewriting the report more often than this is a busy loop; less often than daily is off.
MIN_REPORT_INTERVAL = 0.05
MAX_REPORT_INTERVAL = 86400.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}

_NAME = re.compile(PATCH_NAME_PATTERN)
_DIGEST = re.compile(r"[0-9a-f]{64}")


class _Problems(ValueError):
    def __init__(self, problems: list[Problem]):
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


def _shown(value: str, limit: int = 60) -> str:
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


class Settings(BaseModel):
    """The validated values; field aliases are the variable names."""

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True,
                              populate_by_name=True)

    config: str | None = Field(
        None, alias=CONFIG, description="The config file. Unset: no patching at all (the "
        "plugin returns at once and imports nothing).")
    config_digest: str | None = Field(
        None, alias=CONFIG_DIGEST, description="Set by the first process for its children (do "
        "not set it yourself): the sha256 of the config files; a child that reads different "
        "bytes refuses to start.")
    disable: frozenset[str] = Field(
        frozenset(), alias=DISABLE, description="`name1,name2` or `*`: switch patches off "
        "without editing the file. An unknown name is an error (a typo must not silently leave "
        "a patch on).")
    profile: str | None = Field(
        None, alias=PROFILE, description="Pin a profile of the config instead of choosing it "
        "by the served model.")
    profile_resolved: str | None = Field(
        None, alias=PROFILE_RESOLVED, description="Set by the first process for its children "
        "(do not set it yourself): the profile it chose (`-`: the base patches); a child that "
        "would choose another refuses to start.")
    override: Document | None = Field(
        None, alias=OVERRIDE, description="`{patch: {option: value}}` (YAML or JSON, UTF-8, at "
        "most 64 KiB), applied last and validated like the file, against the base patches and "
        "every profile, before anything is patched: how `ascend-patch ab` varies one option.")
    report_dir: str | None = Field(
        None, alias=REPORT_DIR, description="Write one JSON report per process into this "
        "folder, named by its role, ranks and pid (`worker-dp1-tp0-ep1-12009.json`): versions, "
        "config, digest, profile, each patch's status, targets, options and counters. A folder "
        "that cannot be written costs one warning; patching goes on.")
    report_interval: float = Field(
        1.0, alias=REPORT_INTERVAL, description="Seconds between rewrites of the report: 0.05 "
        "to 86400, or 0: only when a patch applies, at log intervals and at exit.")
    log_level: str = Field(
        "INFO", alias=LOG_LEVEL, description="Level of the `ascend_patch` logger: `DEBUG`, "
        "`INFO`, `WARNING`, `ERROR`, `CRITICAL`.")
    metrics_dir: str | None = Field(
        None, alias=METRICS_DIR, description="Where processes write the `ascend_patch_*` "
        "metric files when `PROMETHEUS_MULTIPROC_DIR` is unset (an absolute path). Unset: the "
        "first process creates a temporary folder, passes it on, and removes it at exit.")
    # The override as written (a second apply in the process must ask for the same one).
    override_text: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        raw = {name: environ[name] for name in KNOWN if environ.get(name)}
        try:
            return cls.model_validate({**raw, "override_text": raw.get(OVERRIDE, "")})
        except ValidationError as exc:
            problems: list[Problem] = []
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else PREFIX
                context = err.get("ctx") or {}
                nested = context.get("error")
                if isinstance(nested, _Problems):
                    problems.extend(nested.problems)
                    continue
                message = str(nested) if nested is not None else err["msg"]
                problems.append(Problem(f"${name}", None, "", message))
            raise ConfigError(problems) from None

    # -- validators (mode="before": they see the variable's text) -------------------------
    @field_validator("config_digest", mode="before")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not _DIGEST.fullmatch(value):
            raise ValueError(f"{_shown(value)} is not a sha256 digest (64 lower-case hex "
                             "digits); the first process sets it for its children, do not set "
                             "it yourself")
        return value

    @field_validator("disable", mode="before")
    @classmethod
    def _disable(cls, value: str) -> frozenset[str]:
        names = frozenset(n.strip() for n in value.split(",") if n.strip())
        bad = sorted(n for n in names if n != "*" and not _NAME.fullmatch(n))
        if bad:
            raise ValueError(f"{', '.join(_shown(n) for n in bad)}: not a patch name; give "
                             "name1,name2 or *")
        return names

    @field_validator("profile", mode="before")
    @classmethod
    def _profile(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"{_shown(value)} is not a profile name (it must match "
                             f"{PATCH_NAME_PATTERN})")
        return value

    @field_validator("profile_resolved", mode="before")
    @classmethod
    def _profile_resolved(cls, value: str) -> str:
        if value != BASE and not _NAME.fullmatch(value):
            raise ValueError(f"{_shown(value)} is not a profile name; the first process sets "
                             "it for its children, do not set it yourself")
        return value

    @field_validator("override", mode="before")
    @classmethod
    def _override(cls, value: str) -> Document:
        # os.environ decodes bytes that are not UTF-8 as lone surrogates; get them back.
        raw = value.encode("utf-8", "surrogateescape")
        if len(raw) > MAX_OVERRIDE_BYTES:
            raise ValueError(f"the value is {len(raw)} bytes; an override is limited to "
                             f"{MAX_OVERRIDE_BYTES} (put larger changes in a config file)")
        try:
            return parse_document(raw, f"${OVERRIDE}", max_bytes=MAX_OVERRIDE_BYTES)
        except ConfigError as exc:  # its problems name the variable and the line already
            raise _Problems(exc.problems) from None

    @field_validator("report_interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> float:
        allowed = (f"seconds: 0 (no periodic rewrite) or {MIN_REPORT_INTERVAL:g} to "
                   f"{MAX_REPORT_INTERVAL:g}")
        try:
            seconds = float(str(value).strip())
        except ValueError:
            raise ValueError(f"{_shown(str(value))} is not a number of {allowed}") from None
        if math.isnan(seconds) or not (
            seconds == 0 or MIN_REPORT_INTERVAL <= seconds <= MAX_REPORT_INTERVAL
        ):
            raise ValueError(f"{_shown(str(value))} is out of range; give a number of {allowed}")
        return seconds

    @field_validator("metrics_dir", mode="before")
    @classmethod
    def _metrics_dir(cls, value: str) -> str:
        # Child processes may start in another working directory than the first.
        if not value.startswith("/"):
            raise ValueError(f"{_shown(value)} is not an absolute path")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        level = _LEVEL_ALIASES.get(level, level)
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown level {_shown(value)} (levels: {', '.join(LOG_LEVELS)})")
        return level


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ASCEND_PATCH_* variable that is not ours, naming the closest known one."""
    lines = []
    for name in sorted(k for k in environ if k.startswith(PREFIX) and k not in KNOWN):
        # Compare what follows the prefix: every name shares the prefix itself.
        suffixes = {known[len(PREFIX):]: known for known in KNOWN}
        close = closest(name[len(PREFIX):], suffixes)
        hint = f"did you mean {suffixes[close]}?" if close else f"known: {', '.join(KNOWN)}"
        lines.append(f"${name} is not an ascend-patch variable and is ignored ({hint})")
    return lines

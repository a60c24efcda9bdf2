"""What every process does at start-up: read the config named by the environment and apply it."""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from pathlib import Path

from ascend_patch.core import profiles, report
from ascend_patch.core.config import LoadedConfig, load_config
from ascend_patch.core.errors import ConfigError, ConsistencyError
from ascend_patch.core.patcher import PATCHER, PatchRecord
from ascend_patch.core.source import parse_document

CONFIG_ENV = "ASCEND_PATCH_CONFIG"
DIGEST_ENV = "ASCEND_PATCH_CONFIG_DIGEST"
DISABLE_ENV = "ASCEND_PATCH_DISABLE"
PROFILE_ENV = "ASCEND_PATCH_PROFILE"
OVERRIDE_ENV = "ASCEND_PATCH_OVERRIDE"
# Set by the first process once it knows the profile; "-" means the base patches.
RESOLVED_PROFILE_ENV = "ASCEND_PATCH_PROFILE_RESOLVED"
LOG_LEVEL_ENV = "ASCEND_PATCH_LOG_LEVEL"
BASE = "-"

log = logging.getLogger("ascend_patch")


def _configure_logging() -> None:
    # vLLM configures only its own logger; without a handler our INFO lines would vanish.
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(os.environ.get(LOG_LEVEL_ENV, "INFO").upper())


def parse_disabled(value: str | None, config: LoadedConfig) -> frozenset[str]:
    names = frozenset(n.strip() for n in (value or "").split(",") if n.strip())
    known = {p.name for p in config.patches}
    for profile in config.profiles.values():
        known |= {p.name for p in profile.patches}
    unknown = sorted(names - known - {"*"})
    if unknown:
        raise ConfigError.single(
            f"${DISABLE_ENV}", None, "", f"names no patch of {config.path}: {', '.join(unknown)} "
            f"(patches: {', '.join(sorted(known)) or 'none'})"
        )
    return names


def _check_profile_name(config: LoadedConfig, name: str | None, source: str) -> None:
    if name is not None and name != BASE and name not in config.profiles:
        raise ConfigError.single(
            f"${source}", None, "", f"names no profile of {config.path}: {name!r} "
            f"(profiles: {', '.join(config.profiles) or 'none'})"
        )


def apply_from_env(environ: MutableMapping[str, str] | None = None) -> list[PatchRecord] | None:
    """Apply the config in ASCEND_PATCH_CONFIG; None when it is unset.

    The first process pins the absolute path, the files' digest and (once the model is known)
    the chosen profile in the environment, which vLLM's child processes inherit: a child that
    reads different bytes refuses to start.
    """
    env = os.environ if environ is None else environ
    path = env.get(CONFIG_ENV)
    if not path:
        return None
    _configure_logging()
    report.report_interval()  # refuse a bad setting before anything is patched
    config = load_config(path)
    expected = env.get(DIGEST_ENV)
    if expected and expected != config.digest:
        raise ConsistencyError(
            f"{path}: the file changed after the first process read it (sha256 {config.digest[:12]} "
            f"here, {expected[:12]} in the parent); all processes of one deployment must apply "
            "the same config: restart the deployment"
        )
    env[CONFIG_ENV] = str(Path(path).resolve())
    env[DIGEST_ENV] = config.digest
    disabled = parse_disabled(env.get(DISABLE_ENV), config)
    pinned = env.get(PROFILE_ENV) or None
    resolved = env.get(RESOLVED_PROFILE_ENV) or None
    _check_profile_name(config, pinned, PROFILE_ENV)
    _check_profile_name(config, resolved, RESOLVED_PROFILE_ENV)

    overrides = env.get(OVERRIDE_ENV)
    override_doc = parse_document(overrides.encode(), f"${OVERRIDE_ENV}") if overrides else None

    def apply(profile: str | None) -> list[PatchRecord]:
        effective = config.with_profile(profile)
        if override_doc is not None:
            effective = effective.with_option_overrides(override_doc)
        records = PATCHER.apply(effective, disabled=disabled)
        report.log_records(records)
        report.flush()
        return records

    if resolved is not None:  # a child: the first process chose already
        return apply(None if resolved == BASE else resolved)
    if not config.profiles:
        env[RESOLVED_PROFILE_ENV] = BASE
        return apply(None)
    if pinned is not None:
        env[RESOLVED_PROFILE_ENV] = pinned
        records = apply(pinned)
        profiles.watch_model_config(lambda model: profiles.select(config, model, pinned))
        return records

    def on_model(model: profiles.ModelInfo) -> None:
        choice = profiles.select(config, model, None)
        previous = env.get(RESOLVED_PROFILE_ENV)
        chosen = choice or BASE
        if previous is not None and previous != chosen:
            raise ConsistencyError(
                f"{config.path}: this process serves two models needing different profiles "
                f"({previous} and {chosen}); run them as separate deployments"
            )
        env[RESOLVED_PROFILE_ENV] = chosen
        log.info("ascend-patch [%s pid %d]: profile %s chosen for %s", report.process_role(),
                 os.getpid(), choice or "(none: base patches)", model.name)
        apply(choice)

    profiles.watch_model_config(on_model)
    log.info("ascend-patch [%s pid %d]: %s has profiles; choosing when vLLM builds the model",
             report.process_role(), os.getpid(), config.path)
    return []


def reset() -> None:
    """Undo everything this process applied (tests, A/B runs in one process)."""
    PATCHER.revert()
    profiles.unwatch_model_config()

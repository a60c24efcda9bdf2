"""What every process does at start-up: read the config named by the environment and apply it.

Every ASCEND_PATCH_* variable is read once, through `settings.Settings`, and validated before
anything is patched or written back. What it applies, and the variables it sets for child
processes (the absolute config path, its digest, the chosen profile), belong to the process's
session (session.py); `reset()` reverts that session.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from ascend_patch.core import effective, metrics, profiles, report, settings
from ascend_patch.core.config import load_config
from ascend_patch.core.errors import ConsistencyError, PatchError
from ascend_patch.core.imports import WATCHER
from ascend_patch.core.patcher import PATCHER, PatchRecord
from ascend_patch.core.session import SESSION, AppliedKey, RevertError
from ascend_patch.core.settings import Settings

CONFIG_ENV = settings.CONFIG
DIGEST_ENV = settings.CONFIG_DIGEST
DISABLE_ENV = settings.DISABLE
PROFILE_ENV = settings.PROFILE
OVERRIDE_ENV = settings.OVERRIDE
# Set by the first process once it knows the profile; "-" means the base patches.
RESOLVED_PROFILE_ENV = settings.PROFILE_RESOLVED
LOG_LEVEL_ENV = settings.LOG_LEVEL
BASE = settings.BASE

log = logging.getLogger("ascend_patch")


def _snapshot() -> dict[str, Any]:
    """The report's view of this process's patches (registered with report.py)."""
    config = PATCHER.config
    return {
        "config": config.path if config else None,
        "digest": config.digest if config else None,
        "profile": config.profile if config else None,
        "vllm_line": config.stack.line if config else None,
        "platform": config.stack.platform if config else None,
        "patches": [r.as_json() for r in list(PATCHER.records.values())],
        "waiting_for_import": WATCHER.watched(),
        # Attributes revert() left alone because another tool replaced them after us.
        "left_in_place": list(PATCHER.left_in_place),
        "metrics": metrics.describe(),
    }


report.set_snapshot_provider(_snapshot)


def _configure_logging(level: str = "INFO") -> None:
    # vLLM configures only its own logger; without a handler our INFO lines would vanish.
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s", "%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)


def warn_unknown_variables(environ) -> None:
    """One warning per ASCEND_PATCH_* variable that is not ours (a typo), per process."""
    for line in settings.unknown_variables(environ):
        if line not in SESSION.warned:
            SESSION.warned.add(line)
            log.warning("ascend-patch [%s pid %d]: %s", report.process_role(), os.getpid(), line)


def _check_same_as_applied(key: AppliedKey) -> None:
    """A second apply in one process must ask for exactly what the first applied."""
    if SESSION.applied is None or SESSION.applied == key:
        return
    names = ("config", "sha256", f"${PROFILE_ENV}", f"${OVERRIDE_ENV}", f"${DISABLE_ENV}")
    diffs = [f"{name} {new!r} (applied: {old!r})"
             for name, old, new in zip(names, SESSION.applied, key) if old != new]
    raise PatchError(
        "ascend-patch is already applied in this process with other settings: "
        + "; ".join(diffs) + ". One process applies one config: start a new process, or "
        "call ascend_patch.core.runtime.reset() first"
    )


def apply_from_env(environ: MutableMapping[str, str] | None = None) -> list[PatchRecord] | None:
    """Apply the config in ASCEND_PATCH_CONFIG; None when it is unset.

    The first process pins the absolute path, the files' digest and (once the model is known)
    the chosen profile in the environment, which vLLM's child processes inherit: a child that
    reads different bytes refuses to start. Everything is validated before anything is
    patched or written to the environment.
    """
    env = os.environ if environ is None else environ
    if not env.get(CONFIG_ENV):
        return None
    # Read, checked against what is applied, and applied as one step: threads call the
    # loader, and another thread's apply or revert rewrites the variables read here.
    with SESSION.lock:
        return _apply(env)


def _apply(env: MutableMapping[str, str]) -> list[PatchRecord]:
    values = Settings.from_environ(env)
    _configure_logging(values.log_level)
    warn_unknown_variables(env)
    path = values.config
    assert path is not None
    config = load_config(path)
    # What `plan` shows for the same settings: effective.py decides it for both.
    decided = effective.resolve(config, values)
    disabled = decided.disabled
    pinned = values.profile
    resolved = values.profile_resolved
    override_doc = values.override
    key = (str(Path(path).resolve()), config.digest, pinned, values.override_text,
           ",".join(sorted(disabled)))
    _check_same_as_applied(key)
    first_call = SESSION.applied is None

    def apply(profile: str | None) -> list[PatchRecord]:
        records = PATCHER.apply(effective.variant(config, profile, override_doc),
                                disabled=disabled)
        report.log_records(records)
        report.flush()
        return records

    def on_model(model: profiles.ModelInfo) -> None:
        choice = profiles.select(config, model, None)
        chosen = choice or BASE
        with SESSION.lock:  # vLLM may build configs in several threads
            previous = env.get(RESOLVED_PROFILE_ENV)
            if previous is not None and previous != chosen:
                raise ConsistencyError(
                    f"{config.path}: this process serves two models needing different "
                    f"profiles ({previous} and {chosen}); run them as separate deployments"
                )
            if previous == chosen and PATCHER.config is not None:
                return  # the same model again (vLLM copies its VllmConfig)
            SESSION.set_env(env, RESOLVED_PROFILE_ENV, chosen)
            log.info("ascend-patch [%s pid %d]: profile %s chosen for %s",
                     report.process_role(), os.getpid(), choice or "(none: base patches)",
                     model.name)
            apply(choice)

    if first_call:
        # Checked before anything is patched: a bad directory is one warning, not a failure
        # (the report and the metrics are side channels; serving goes on without them).
        report.configure(values.report_dir, values.report_interval)
        metrics.configure(env, lambda key, value: SESSION.set_env(env, key, value))
    try:
        SESSION.set_env(env, CONFIG_ENV, key[0])
        SESSION.set_env(env, DIGEST_ENV, config.digest)
        SESSION.applied = key
        if resolved is not None:  # a child: the first process chose already
            return apply(decided.profile)
        if not config.profiles:
            SESSION.set_env(env, RESOLVED_PROFILE_ENV, BASE)
            records = apply(None)
            profiles.watch_model_config(None, on_config=mark_compile_cache)
            return records
        if pinned is not None:
            SESSION.set_env(env, RESOLVED_PROFILE_ENV, pinned)
            records = apply(decided.profile)
            profiles.watch_model_config(lambda model: profiles.select(config, model, pinned),
                                        on_config=mark_compile_cache)
            return records
        if first_call:
            profiles.watch_model_config(on_model, on_config=mark_compile_cache)
            log.info("ascend-patch [%s pid %d]: %s has profiles; choosing when vLLM builds the "
                     "model", report.process_role(), os.getpid(), config.path)
        return []
    except BaseException as exc:
        if first_call:
            # Nothing was applied before this call: the session holds what this call began.
            try:
                SESSION.revert()
            except RevertError as failed:
                exc.add_note(str(failed))
        raise


COMPILE_KEY = "ascend_patch"


def compile_key() -> dict[str, Any]:
    """What this deployment patches, in the form vLLM's compile-cache hash takes."""
    import hashlib

    from ascend_patch import __version__

    applied = SESSION.applied
    if applied is None:
        return {}
    _, digest, _, override, disable = applied
    env = SESSION.env if SESSION.env is not None else os.environ
    return {
        "version": __version__,
        "config_sha256": digest,
        "profile": env.get(RESOLVED_PROFILE_ENV),
        "override_sha256": hashlib.sha256(override.encode()).hexdigest() if override else None,
        "disable": disable,
    }


def mark_compile_cache(vllm_config: Any) -> None:
    """Make vLLM's torch.compile cache key depend on what is patched.

    vLLM keeps compiled models on disk, keyed by a hash of its config and environment
    (vllm/compilation/caching.py, aot_compile_hash_factors), and with AOT compilation it
    loads a saved graph without tracing the Python code again: a graph traced before a patch
    was configured (or under other patches) would run as saved, and the patch would silently
    do nothing. VllmConfig.compute_hash covers `additional_config` (the dict platform plugins
    keep their options in), so the first process puts the deployment's patch identity there;
    the config travels to every engine and worker, so they compute the same key.
    """
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict) and SESSION.applied is not None:
        extra[COMPILE_KEY] = compile_key()


def reset() -> None:
    """Undo everything this process applied (tests, A/B runs in one process): the patches,
    the model hook, the report settings, the variables set for child processes, and any
    other state registered with the session, newest first (`Session.revert`)."""
    SESSION.revert()

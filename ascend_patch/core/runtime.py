"""What every process does at start-up: read the config named by the environment and apply it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ascend_patch.core import report
from ascend_patch.core.config import LoadedConfig, load_config
from ascend_patch.core.errors import ConfigError, ConsistencyError
from ascend_patch.core.patcher import PATCHER, PatchRecord

CONFIG_ENV = "ASCEND_PATCH_CONFIG"
DIGEST_ENV = "ASCEND_PATCH_CONFIG_DIGEST"
DISABLE_ENV = "ASCEND_PATCH_DISABLE"
LOG_LEVEL_ENV = "ASCEND_PATCH_LOG_LEVEL"

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
    unknown = sorted(names - known - {"*"})
    if unknown:
        raise ConfigError.single(
            f"${DISABLE_ENV}", None, "", f"names no patch of {config.path}: {', '.join(unknown)} "
            f"(patches: {', '.join(sorted(known)) or 'none'})"
        )
    return names


def apply_from_env(environ: Mapping[str, str] | None = None) -> list[PatchRecord] | None:
    """Apply the config in ASCEND_PATCH_CONFIG; None when it is unset.

    The first process pins the absolute path and the file's digest in the environment, which
    vLLM's child processes inherit: a child that reads different bytes refuses to start.
    """
    env = os.environ if environ is None else environ
    path = env.get(CONFIG_ENV)
    if not path:
        return None
    _configure_logging()
    config = load_config(path)
    expected = env.get(DIGEST_ENV)
    if expected and expected != config.digest:
        raise ConsistencyError(
            f"{path}: the file changed after the first process read it (sha256 {config.digest[:12]} "
            f"here, {expected[:12]} in the parent); all processes of one deployment must apply "
            "the same config: restart the deployment"
        )
    if environ is None:
        os.environ[CONFIG_ENV] = str(Path(path).resolve())
        os.environ[DIGEST_ENV] = config.digest
    records = PATCHER.apply(config, disabled=parse_disabled(env.get(DISABLE_ENV), config))
    report.log_records(records)
    report.flush()
    return records

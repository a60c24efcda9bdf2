"""vLLM's `vllm.general_plugins` entry point.

vLLM calls `register()` once in every process it starts, before the model is built. With
ASCEND_PATCH_CONFIG unset this returns at once and imports nothing else.
"""

from __future__ import annotations

import os


def register() -> None:
    if not os.environ.get("ASCEND_PATCH_CONFIG"):
        if any(key.startswith("ASCEND_PATCH_") for key in os.environ):
            _warn_unknown()  # e.g. a misspelt ASCEND_PATCH_CONFIG: say so, patch nothing
        return
    from ascend_patch.core.errors import AscendPatchError
    from ascend_patch.core.runtime import apply_from_env, log

    # An exception here propagates out of vLLM's plugin loader and stops the process, which is
    # what a config that cannot be applied must do. Log it first so the message stands out in
    # the process's log, above vLLM's traceback.
    try:
        apply_from_env()
    except AscendPatchError as exc:
        log.error("%s", exc)
        raise


def _warn_unknown() -> None:
    from ascend_patch.core.runtime import _configure_logging, warn_unknown_variables

    _configure_logging()
    warn_unknown_variables(os.environ)

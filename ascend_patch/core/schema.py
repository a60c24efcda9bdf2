"""The JSON Schema of the config file, for editors (`ascend-patch schema`).

Generated from the same pydantic models the loader validates with (spec.py and each catalog
implementation's options model), so an editor flags what the loader would refuse: unknown
keys, wrong types, out-of-range values, and each catalog implementation's options, chosen by
the patch's `impl` (an if/then per implementation). What JSON Schema cannot say stays the
loader's alone: version ranges that do not parse, targets, duplicate names, `extends`
chains, and the options of profile overrides (they name a patch, not an implementation).

Shipped configs point at configs/ascend-patch.schema.json (the output of this module; a test
keeps the two equal) with the yaml-language-server modeline

    # yaml-language-server: $schema=ascend-patch.schema.json
"""

from __future__ import annotations

import json
from typing import Any

from pydantic.json_schema import models_json_schema

from ascend_patch.core import catalog
from ascend_patch.core.spec import PATCH_NAME_PATTERN, ConfigSpec

DIALECT = "https://json-schema.org/draft/2020-12/schema"
MODELINE = "# yaml-language-server: $schema=ascend-patch.schema.json"
SHIPPED_NAME = "ascend-patch.schema.json"
# `impl: module:attr` outside the catalog (needs allow_external_impls: true).
EXTERNAL_IMPL_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"


def _options_key(name: str) -> str:
    # One $defs entry per implementation, named after it (several may share an options model).
    return "options." + name


def config_schema() -> dict[str, Any]:
    names = catalog.builtin_names()
    impls = {name: catalog.lookup(name) for name in names}
    models = [(ConfigSpec, "validation")] + [(impl.options, "validation")
                                             for impl in impls.values()]
    refs, generated = models_json_schema(models, ref_template="#/$defs/{model}")
    defs: dict[str, Any] = generated["$defs"]
    for name, impl in impls.items():
        ref = refs[(impl.options, "validation")]["$ref"].rsplit("/", 1)[-1]
        defs[_options_key(name)] = dict(defs[ref], title=f"{name} options")
    # Option models are reachable only through their implementation's entry.
    for impl in impls.values():
        defs.pop(refs[(impl.options, "validation")]["$ref"].rsplit("/", 1)[-1], None)

    patch = defs["PatchSpec"]
    patch["properties"]["impl"] = {
        **patch["properties"]["impl"],
        "anyOf": [{"enum": names}, {"pattern": EXTERNAL_IMPL_PATTERN}],
    }
    patch["allOf"] = [
        {
            "if": {"properties": {"impl": {"const": name}}, "required": ["impl"]},
            "then": {"properties": {"options": {"$ref": f"#/$defs/{_options_key(name)}"}}},
        }
        for name in names
    ]
    # Names the loader checks with a validator, which pydantic cannot export.
    root = defs.pop("ConfigSpec")
    root["properties"]["profiles"]["propertyNames"] = {"pattern": PATCH_NAME_PATTERN}
    defs["ProfileSpec"]["properties"]["patches"]["propertyNames"] = {
        "pattern": PATCH_NAME_PATTERN}
    return {
        "$schema": DIALECT,
        **root,
        "title": "ascend-patch config (version 1)",
        "$defs": dict(sorted(defs.items())),
    }


def schema_text() -> str:
    """What `ascend-patch schema` prints and configs/ascend-patch.schema.json holds."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"

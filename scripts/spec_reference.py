"""Print the README's reference tables (every key of the config schema and of each catalog
implementation's options) from the pydantic models, so the docs cannot drift from the code.

    python scripts/spec_reference.py > /tmp/reference.md
"""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ascend_patch.core import catalog
from ascend_patch.core.spec import ConfigSpec, PatchOverride, PatchSpec, ProfileMatch, ProfileSpec


def _render(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _render(args[0])
    if origin is typing.Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_render(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_render(a) for a in args)}]"
    if tp is type(None):
        return "null"
    if tp is typing.Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _type(field) -> str:
    return _render(field.annotation)


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default is PydanticUndefined:
        return "empty"
    return "`" + json.dumps(field.default) + "`"


def table(model: type[BaseModel], heading: str) -> str:
    lines = [f"#### {heading}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {_type(field)} | {_default(field)} | {meaning} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    print(table(ConfigSpec, "Top level"))
    print(table(PatchSpec, "`patches[]`"))
    print(table(ProfileSpec, "`profiles.<name>`"))
    print(table(ProfileMatch, "`profiles.<name>.match`"))
    print(table(PatchOverride, "`profiles.<name>.patches.<patch>`"))
    for name in catalog.builtin_names():
        impl = catalog.lookup(name)
        if impl.options.model_fields:
            print(table(impl.options, f"`{name}` options"))


if __name__ == "__main__":
    main()

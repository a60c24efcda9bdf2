"""pydantic's errors as Problems (file:line:key), and a schema check that goes on past them.

A file's schema problems must not hide its catalog and option problems, nor its base's: the
parts of a document the schema refuses are taken out (`validate_pruned`) and the rest is
validated again, so the later stages see every part that is valid. Only the first round's
errors are reported; later rounds see what taking parts out left behind.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ascend_patch.core.errors import Problem, closest
from ascend_patch.core.source import Document, Loc, format_loc

Locate = Callable[[Loc], tuple[Document, Loc]]
# Enough for every kind of problem one file can nest (a key, its entry, the entry's list).
MAX_ROUNDS = 8


def describe(err: dict, model: type[BaseModel] | None = None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _keys_at(model, _clean(err["loc"])[:-1]) if model is not None else []
        near = closest(str(_clean(err["loc"])[-1]), known) if known else None
        return f"unknown key (did you mean {near!r}?)" if near else "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        return err["msg"].replace("Input should be", "must be")
    if isinstance(err.get("input"), float) and math.isnan(err["input"]):
        return "must be a number, not NaN"
    if kind == "bool_type" and isinstance(err.get("input"), str):
        # YAML 1.1 read yes/no/on/off as booleans; we read YAML 1.2, where they are strings.
        return f"must be true or false, not the string {err['input']!r}"
    return err["msg"][0].lower() + err["msg"][1:]


def _clean(loc: tuple) -> Loc:
    # pydantic appends the union member's type name to the location; drop it.
    return tuple(p for p in loc if not (isinstance(p, str) and "[" in p))


def problems_from_validation(exc: ValidationError, locate: Locate,
                             model: type[BaseModel] | None = None) -> list[Problem]:
    """One Problem per error; with `model` (the schema validated), an unknown key names the
    closest key the schema allows there."""
    problems = []
    for err in exc.errors():
        doc, full = locate(_clean(err["loc"]))
        problems.append(Problem(doc.path, doc.line_of(full), format_loc(full),
                                describe(err, model)))
    return problems


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):  # `X | None`
        for member in get_args(annotation):
            found = _model_in(member)
            if found is not None:
                return found
    return None


def _step(annotation: Any, part: str | int) -> Any:
    model = _model_in(annotation)
    if model is not None and isinstance(part, str) and part in model.model_fields:
        return model.model_fields[part].annotation
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (
        annotation,)
    for member in members:
        origin, args = get_origin(member), get_args(member)
        if origin is list and isinstance(part, int) and args:
            return args[0]
        if origin is dict and isinstance(part, str) and len(args) == 2:
            return args[1]
    return None


def _keys_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the schema allows in the mapping at `loc`."""
    annotation: Any = model
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    found = _model_in(annotation)
    return list(found.model_fields) if found is not None else []


_DROP = object()


@dataclass
class Pruned:
    """What `validate_pruned` made of a document."""

    value: BaseModel | None  # None: nothing valid could be made of it
    problems: list[Problem]
    # `name` of each list entry taken out (a patch the rest may still refer to).
    dropped_names: set[str] = field(default_factory=set)
    # list location -> the original index of each entry left, in order
    kept: dict[Loc, list[int]] = field(default_factory=dict)

    def index(self, list_loc: Loc, index: int) -> int:
        """The index in the document of entry `index` of the list at `list_loc`."""
        kept = self.kept.get(list_loc)
        return index if kept is None else kept[index]


def validate_pruned(model: type[BaseModel], doc: Document,
                    fixed: dict[Loc, Any] | None = None) -> Pruned:
    """Validate `doc.data` against `model`; on errors, report them, take out the parts they
    are in (a missing key: the entry that lacks it; `fixed` gives a value instead for keys
    that must be there) and validate again, until the rest is valid."""
    data = copy.deepcopy(doc.data)
    result = Pruned(None, [])
    for _ in range(MAX_ROUNDS):
        try:
            result.value = model.model_validate(data)
            return result
        except ValidationError as exc:
            if not result.problems:
                result.problems = problems_from_validation(exc, lambda loc: (doc, loc), model)
            changed = False
            for err in exc.errors():
                changed |= _prune(data, _clean(err["loc"]), err["type"], fixed or {}, result)
            _compact(data, (), result)
            if not changed:
                break
    return result


def _prune(data: Any, loc: Loc, kind: str, fixed: dict[Loc, Any], result: Pruned) -> bool:
    if loc in fixed:  # a top-level key that must be there
        changed = data.get(loc[0]) != fixed[loc]
        data[loc[0]] = fixed[loc]
        return changed
    if kind == "missing":
        loc = loc[:-1]
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            path.append(part)
            node = node[part]
        else:
            break
    if not path:
        return False
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    if isinstance(parent, list):
        if isinstance(parent[path[-1]], dict) and isinstance(parent[path[-1]].get("name"), str):
            result.dropped_names.add(parent[path[-1]]["name"])
        if parent[path[-1]] is _DROP:
            return False
        parent[path[-1]] = _DROP
    else:
        del parent[path[-1]]
    return True


def _compact(node: Any, loc: Loc, result: Pruned) -> None:
    """Take the entries marked _DROP out of every list, remembering the original indices."""
    if isinstance(node, dict):
        for key, value in node.items():
            _compact(value, loc + (key,), result)
    elif isinstance(node, list):
        kept = result.kept.setdefault(loc, list(range(len(node))))
        keep = [i for i, value in enumerate(node) if value is not _DROP]
        result.kept[loc] = [kept[i] for i in keep]
        node[:] = [node[i] for i in keep]
        for index, value in enumerate(node):
            _compact(value, loc + (result.kept[loc][index],), result)

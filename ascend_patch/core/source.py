"""Reading a config file safely, keeping the line of every key for error messages.

PyYAML's safe loader already refuses Python object tags, but it silently keeps the last of
duplicate keys, expands aliases without limit and forgets where a value came from. We compose
the node graph ourselves and build plain data from it, so every value maps back to a line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ascend_patch.core.errors import ConfigError

MAX_FILE_BYTES = 1 << 20
# A generous bound for a hand-written config; an alias bomb expands far past it.
MAX_NODES = 20_000

_STANDARD_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}

Loc = tuple[str | int, ...]


@dataclass
class Document:
    path: str
    data: Any
    raw: bytes
    lines: dict[Loc, int] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def line_of(self, loc: Iterable[str | int]) -> int | None:
        """Line of the deepest key of `loc` that the file spells out (1-based)."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), None)

    def error(self, loc: Iterable[str | int], message: str) -> ConfigError:
        loc = tuple(loc)
        return ConfigError.single(self.path, self.line_of(loc), format_loc(loc), message)


def format_loc(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_document(path: str | Path) -> Document:
    shown = str(path)
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ConfigError.single(shown, None, "", "file not found") from None
    except OSError as exc:
        raise ConfigError.single(shown, None, "", f"cannot read file: {exc.strerror}") from None
    if not p.is_file():
        raise ConfigError.single(shown, None, "", "not a regular file")
    if size > MAX_FILE_BYTES:
        raise ConfigError.single(
            shown, None, "", f"file is {size} bytes; configs are limited to {MAX_FILE_BYTES}"
        )
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError.single(shown, None, "", f"cannot read file: {exc.strerror}") from None
    return parse_document(raw, shown)


def parse_document(raw: bytes, shown: str) -> Document:
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError.single(
            shown, None, "", f"file is {len(raw)} bytes; configs are limited to {MAX_FILE_BYTES}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError.single(shown, None, "", f"not UTF-8 text ({exc.reason})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError.single(shown, line, "", f"invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError.single(shown, None, "", f"invalid YAML: {exc}") from None
    doc = Document(path=shown, data=None, raw=raw)
    if node is None:
        raise ConfigError.single(shown, None, "", "the file is empty")
    builder = _Builder(doc)
    doc.data = builder.build(node, ())
    doc.lines.setdefault((), node.start_mark.line + 1)
    return doc


class _Builder:
    def __init__(self, doc: Document):
        self.doc = doc
        self.nodes = 0
        self.scalars = yaml.constructor.SafeConstructor()

    def _fail(self, node: yaml.Node, loc: Loc, message: str) -> ConfigError:
        return ConfigError.single(self.doc.path, node.start_mark.line + 1, format_loc(loc), message)

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self._fail(
                node, loc, f"the document expands to more than {MAX_NODES} values "
                "(recursive or exponential aliases?)"
            )
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.scalars.construct_object(node)
            except yaml.constructor.ConstructorError as exc:
                raise self._fail(node, loc, f"tag {node.tag!r} is not allowed ({exc.problem})") from None
        if node.tag not in _STANDARD_COLLECTION_TAGS:
            raise self._fail(node, loc, f"tag {node.tag!r} is not allowed")
        if isinstance(node, yaml.SequenceNode):
            out_list = []
            for index, item in enumerate(node.value):
                self.doc.lines.setdefault(loc + (index,), item.start_mark.line + 1)
                out_list.append(self.build(item, loc + (index,)))
            return out_list
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                raise self._fail(key_node, loc, "keys must be plain strings (no merge keys)")
            key = self.scalars.construct_object(key_node)
            if not isinstance(key, str):
                raise self._fail(key_node, loc, f"key {key!r} must be a string")
            if key in out:
                raise self._fail(key_node, loc + (key,), "duplicate key")
            self.doc.lines[loc + (key,)] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, loc + (key,))
        return out

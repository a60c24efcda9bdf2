"""Reading a config file safely, keeping the line of every key for error messages.

PyYAML's own loaders silently keep the last of duplicate keys, expand aliases without limit,
recurse once per nesting level (a deeply nested file raises RecursionError), read YAML 1.1
(`0256` is octal, `yes`/`on` are booleans, `1:30` is 90, `2024-13-45` crashes the timestamp
constructor) and forget where a value came from. We build plain data from PyYAML's event
stream instead, without recursion, so that:

* scalars follow the YAML 1.2 core schema: `true`/`false`, `null`/`~`, decimal integers
  (`0256` is 256), `0o`/`0x` integers, floats, `.inf`/`.nan`; anything else (`yes`, `on`,
  `1:30`, dates) stays the string that was written;
* explicit tags are limited to `!!str`, `!!int`, `!!float`, `!!bool`, `!!null`, `!!map`,
  `!!seq`; a tagged value that does not fit its tag is a problem naming the line;
* nesting is limited (MAX_DEPTH, aliases included), aliases may not refer to the node that
  contains them, and a document expanding to more than MAX_NODES values is refused before it
  is expanded;
* control characters (NUL included) are refused with the line they are on;
* every such problem of a file is reported at once, each naming file, line and key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ascend_patch.core.errors import ConfigError, Problem

MAX_FILE_BYTES = 1 << 20
# A generous bound for a hand-written config; an alias bomb expands far past it.
MAX_NODES = 20_000
# Nested mappings and sequences, aliases included (a config needs about 6).
MAX_DEPTH = 64
# Problems reported for one file before giving up on it.
MAX_PROBLEMS = 50

Loc = tuple[str | int, ...]

_Loader = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader

_CORE = "tag:yaml.org,2002:"
_MAP_TAGS = {None, "!", _CORE + "map"}
_SEQ_TAGS = {None, "!", _CORE + "seq"}

# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution).
_NULL = re.compile(r"~|null|Null|NULL|")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT10 = re.compile(r"[-+]?[0-9]+")
_INT8 = re.compile(r"0o[0-7]+")
_INT16 = re.compile(r"0x[0-9a-fA-F]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(?:inf|Inf|INF)")
_NAN = re.compile(r"\.(?:nan|NaN|NAN)")
# Python refuses to convert longer decimal strings (sys.get_int_max_str_digits).
MAX_INT_DIGITS = 4300

# Characters YAML does not allow in a stream (c-printable, YAML 1.2 section 5.1).
_NOT_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


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
        raise ConfigError.single(shown, None, "", f"cannot read file: {_reason(exc)}") from None
    except ValueError as exc:  # an embedded NUL in the path
        raise ConfigError.single(shown, None, "", f"not a usable path: {exc}") from None
    if not p.is_file():
        raise ConfigError.single(shown, None, "", "not a regular file")
    if size > MAX_FILE_BYTES:
        raise ConfigError.single(
            shown, None, "", f"file is {size} bytes; configs are limited to {MAX_FILE_BYTES}"
        )
    try:
        with p.open("rb") as handle:
            # Read one byte past the limit: a file that grew since stat() is still refused.
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError.single(shown, None, "", f"cannot read file: {_reason(exc)}") from None
    return parse_document(raw, shown)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def parse_document(raw: bytes, shown: str, *, max_bytes: int = MAX_FILE_BYTES) -> Document:
    if len(raw) > max_bytes:
        raise ConfigError.single(
            shown, None, "", f"file is {len(raw)} bytes; configs are limited to {max_bytes}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError.single(
            shown, line, "", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}: {exc.reason})"
        ) from None
    bad = _NOT_PRINTABLE.search(text)
    if bad is not None:
        char = bad.group()
        line = text.count("\n", 0, bad.start()) + 1
        name = " (NUL)" if char == "\0" else ""
        raise ConfigError.single(
            shown, line, "", f"contains the control character U+{ord(char):04X}{name}, which "
            "YAML does not allow"
        )
    doc = Document(path=shown, data=None, raw=raw)
    _Builder(doc).run(text)
    return doc


class _Bad:
    """A value that could not be built (its problem is recorded); its key is dropped."""


_BAD = _Bad()


@dataclass
class _Frame:
    kind: str  # "map" | "seq"
    loc: Loc
    container: Any
    line: int | None
    anchor: str | None
    as_key: bool = False  # a collection used as a mapping key (reported, then dropped)
    bad: bool = False
    key: Any = None  # mappings: the key waiting for its value
    has_key: bool = False
    seen: set[str] = field(default_factory=set)  # keys so far, kept or dropped
    nodes: int = 1
    depth: int = 1


@dataclass
class _Anchored:
    value: Any
    nodes: int
    depth: int


class _Builder:
    def __init__(self, doc: Document):
        self.doc = doc
        self.problems: list[Problem] = []
        self.nodes = 0
        self.anchors: dict[str, _Anchored] = {}
        self.open_anchors: set[str] = set()
        self.stack: list[_Frame] = []
        self.documents = 0
        self.root_set = False

    # -- problems -----------------------------------------------------------------------
    def problem(self, line: int | None, loc: Loc, message: str) -> None:
        self.problems.append(Problem(self.doc.path, line, format_loc(loc), message))
        if len(self.problems) >= MAX_PROBLEMS:
            raise ConfigError(self.problems)

    def fatal(self, line: int | None, loc: Loc, message: str) -> ConfigError:
        self.problems.append(Problem(self.doc.path, line, format_loc(loc), message))
        return ConfigError(self.problems)

    # -- the event loop -----------------------------------------------------------------
    def run(self, text: str) -> None:
        try:
            for event in yaml.parse(text, Loader=_Loader):
                self.event(event)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            raise self.fatal(line, (), f"invalid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise self.fatal(None, (), f"invalid YAML: {exc}") from None
        if self.problems:
            raise ConfigError(self.problems)
        if not self.root_set:
            raise ConfigError.single(self.doc.path, None, "", "the file is empty")

    def event(self, event: yaml.Event) -> None:
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, yaml.AliasEvent):
            self.alias(event, line)
        elif isinstance(event, yaml.ScalarEvent):
            self.scalar(event, line)
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            self.start(event, line)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            self.end()
        elif isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise self.fatal(line, (), "a config file holds one YAML document; found a "
                                 "second one ('---')")

    # -- where the next value goes ------------------------------------------------------
    def _next_loc(self) -> tuple[Loc, bool]:
        """Location of the next node, and whether it is a mapping key."""
        if not self.stack:
            return (), False
        frame = self.stack[-1]
        if frame.kind == "seq":
            return frame.loc + (len(frame.container),), False
        if not frame.has_key:
            return frame.loc, True
        return frame.loc + ((frame.key,) if isinstance(frame.key, str) else ()), False

    def _count(self, nodes: int, depth: int, line: int | None, loc: Loc) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            raise self.fatal(line, loc, f"the document expands to more than {MAX_NODES} values "
                             "(recursive or exponential aliases?)")
        if len(self.stack) + depth > MAX_DEPTH:
            # The key path is as deep as the problem: show where it starts.
            raise self.fatal(line, loc[:3], f"nested more than {MAX_DEPTH} levels deep")

    def _place(self, value: Any, line: int | None, nodes: int, depth: int) -> None:
        """Put a finished value where it belongs: mapping value, list item or the root."""
        if not self.stack:
            self.doc.data = None if value is _BAD else value
            self.root_set = True
            if line is not None:
                self.doc.lines.setdefault((), line)
            return
        frame = self.stack[-1]
        frame.nodes += nodes
        frame.depth = max(frame.depth, depth + 1)
        if frame.kind == "seq":
            if line is not None:
                self.doc.lines.setdefault(frame.loc + (len(frame.container),), line)
            frame.container.append(value)
            frame.bad = frame.bad or value is _BAD
            return
        key, frame.key, frame.has_key = frame.key, None, False
        if key is not _BAD and value is not _BAD:
            frame.container[key] = value

    def _key(self, value: Any, line: int | None) -> None:
        frame = self.stack[-1]
        frame.has_key, frame.key = True, _BAD
        if value is _BAD:
            return
        if not isinstance(value, str):
            self.problem(line, frame.loc, f"key {value!r} must be a string")
        elif value in frame.seen:
            self.problem(line, frame.loc + (value,), "duplicate key")
        else:
            frame.seen.add(value)
            frame.key = value
            if line is not None:
                self.doc.lines[frame.loc + (value,)] = line

    # -- nodes ----------------------------------------------------------------------------
    def scalar(self, event: yaml.ScalarEvent, line: int | None) -> None:
        loc, is_key = self._next_loc()
        self._count(1, 0, line, loc)
        value = self.construct(event, line, loc)
        if event.anchor is not None:
            self.anchors[event.anchor] = _Anchored(value, 1, 0)
        if not is_key:
            self._place(value, line, 1, 0)
            return
        if event.tag is None and event.implicit[0] and event.value == "<<":
            self.problem(line, loc, "merge keys ('<<') are not supported; write the keys out")
            value = _BAD
        self._key(value, line)

    def alias(self, event: yaml.AliasEvent, line: int | None) -> None:
        loc, is_key = self._next_loc()
        name = event.anchor
        if name in self.open_anchors:
            raise self.fatal(line, loc, f"recursive alias *{name}: it refers to a node that "
                             "contains it")
        anchored = self.anchors.get(name)
        if anchored is None:
            self.problem(line, loc, f"undefined alias *{name}")
            anchored = _Anchored(_BAD, 1, 0)
        else:
            self._count(anchored.nodes, anchored.depth, line, loc)
        if is_key:
            self._key(anchored.value, line)
        else:
            self._place(anchored.value, line, anchored.nodes, anchored.depth)

    def start(self, event: yaml.CollectionStartEvent, line: int | None) -> None:
        loc, is_key = self._next_loc()
        self._count(1, 1, line, loc)
        is_map = isinstance(event, yaml.MappingStartEvent)
        frame = _Frame("map" if is_map else "seq", loc, {} if is_map else [], line,
                       event.anchor, as_key=is_key)
        if is_key:
            # Read for its own problems, then dropped together with its value.
            self.problem(line, loc, "keys must be plain strings, not mappings or lists")
        if event.tag not in (_MAP_TAGS if is_map else _SEQ_TAGS):
            self.problem(line, loc, f"tag {event.tag!r} is not allowed")
            frame.bad = True
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        self.stack.append(frame)

    def end(self) -> None:
        frame = self.stack.pop()
        value = _BAD if frame.bad else frame.container
        if frame.anchor is not None:
            self.open_anchors.discard(frame.anchor)
            self.anchors[frame.anchor] = _Anchored(value, frame.nodes, frame.depth)
        if frame.as_key:
            self._key(_BAD, frame.line)
        else:
            self._place(value, frame.line, frame.nodes, frame.depth)

    # -- scalars --------------------------------------------------------------------------
    def construct(self, event: yaml.ScalarEvent, line: int | None, loc: Loc) -> Any:
        tag, text = event.tag, event.value
        if tag is None and event.implicit[0]:
            kind, parse = _plain_kind(text)
        elif tag is None or tag == "!" or tag == _CORE + "str":
            return text
        else:
            kind = tag[len(_CORE):] if tag.startswith(_CORE) else ""
            parse = _PARSERS.get(kind)
            if parse is None:
                self.problem(line, loc, f"tag {tag!r} is not allowed")
                return _BAD
        if parse is None:
            return text
        try:
            return parse(text)
        except ValueError as exc:
            self.problem(line, loc, f"{text[:40]!r}{'...' if len(text) > 40 else ''} is not a "
                         f"valid !!{kind}{_detail(exc)}")
            return _BAD


def _detail(exc: ValueError) -> str:
    return f" ({exc.args[0]})" if exc.args and exc.args[0] else ""


def _parse_int(text: str) -> int:
    if _INT8.fullmatch(text):
        return int(text, 0)
    if _INT16.fullmatch(text):
        return int(text, 0)
    if _INT10.fullmatch(text):
        digits = len(text.lstrip("+-"))
        if digits > MAX_INT_DIGITS:
            raise ValueError(f"{digits} digits; at most {MAX_INT_DIGITS}")
        return int(text, 10)
    raise ValueError("")


def _parse_float(text: str) -> float:
    if _FLOAT.fullmatch(text) or _INT10.fullmatch(text):
        if len(text) > MAX_INT_DIGITS:
            raise ValueError(f"{len(text)} characters; at most {MAX_INT_DIGITS}")
        return float(text)
    if _INF.fullmatch(text):
        return float("-inf") if text.startswith("-") else float("inf")
    if _NAN.fullmatch(text):
        return float("nan")
    raise ValueError("")


def _parse_bool(text: str) -> bool:
    if text in _BOOL:
        return _BOOL[text]
    raise ValueError("write true or false")


def _parse_null(text: str) -> None:
    if _NULL.fullmatch(text):
        return
    raise ValueError("")


_PARSERS = {"int": _parse_int, "float": _parse_float, "bool": _parse_bool, "null": _parse_null}


def _plain_kind(text: str):
    """The YAML 1.2 core type of a plain (unquoted, untagged) scalar; None for a string."""
    if _NULL.fullmatch(text):
        return "null", _parse_null
    if text in _BOOL:
        return "bool", _parse_bool
    if _INT10.fullmatch(text) or _INT8.fullmatch(text) or _INT16.fullmatch(text):
        return "int", _parse_int
    if _FLOAT.fullmatch(text) or _INF.fullmatch(text) or _NAN.fullmatch(text):
        return "float", _parse_float
    return "str", None

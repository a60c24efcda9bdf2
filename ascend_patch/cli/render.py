"""How the CLI lays out what it prints, for a terminal of a given width.

Nothing here breaks a name: text wraps between words, option lists between `key=value`
items, and dotted module paths after a dot, so a target is never cut mid-identifier the way a
table cell that folds at its width would cut it. A target is shown as its short symbol
(`Class.attr`) with its module on the line below, indented and dimmed.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence

from rich.text import Text

# Left margin of a patch's fields, and of a wrapped value under its label.
_LABEL = 12
_INDENT = 2


def wrap_words(text: str, width: int, indent: int = 0, hang: int = 0) -> list[str]:
    """`text` wrapped between words, continuation lines `hang` columns further in; a word
    longer than the width keeps a line of its own."""
    return textwrap.wrap(text, width=max(width, indent + hang + 1), initial_indent=" " * indent,
                         subsequent_indent=" " * (indent + hang), break_long_words=False,
                         break_on_hyphens=False) or [" " * indent]


def wrap_items(items: Sequence[str], width: int, indent: int = 0) -> list[str]:
    """Items separated by spaces, wrapped between items (never inside one)."""
    return wrap_words(" ".join(items), width, indent) if items else [" " * indent + "-"]


def wrap_dotted(path: str, width: int, indent: int = 0) -> list[str]:
    """A dotted path wrapped after its dots; continuation lines indented two more columns."""
    parts = path.split(".")
    lines: list[str] = []
    current = " " * indent + parts[0]
    for i, part in enumerate(parts[1:], 2):
        piece = "." + part
        # Room for the dot that ends the line if another part follows.
        room = width - (i < len(parts))
        if len(current) + len(piece) > room and current.strip():
            lines.append(current + ".")
            current = " " * (indent + 2) + part
        else:
            current += piece
    lines.append(current)
    return lines


def split_target(target: str) -> tuple[str, str]:
    """(module, symbol) of `module:Qualname.attr`; a dotted path splits at its last dot."""
    if ":" in target:
        module, symbol = target.split(":", 1)
    else:
        module, _, symbol = target.rpartition(".")
    return module, symbol


def target_lines(role: str, target: str, width: int, indent: int) -> list[Text]:
    """`Symbol.attr [role]`, then its module dimmed on the next lines."""
    module, symbol = split_target(target)
    head = wrap_words(f"{symbol} [{role}]", width, indent, hang=2)
    lines = [Text(line) for line in head]
    lines += [Text(line, style="dim") for line in wrap_dotted(module, width, indent + 2)]
    return lines


def _field(label: str, lines: list[str]) -> list[Text]:
    """The label in the margin of the first of the value's lines (already indented)."""
    first = " " * _INDENT + label.ljust(_LABEL - _INDENT) + lines[0][_LABEL:]
    return [Text(first)] + [Text(line) for line in lines[1:]]


def plan_patch(row: Mapping, width: int) -> list[Text]:
    """One patch of `ascend-patch plan`: name and implementation, status, targets, options."""
    out = [Text(f"{row['name']} ({row['impl']})", style="bold")]
    out += _field("status", wrap_words(row["status"], width, _LABEL))
    targets: list[Text] = []
    for role, target in row["targets"].items():
        targets += target_lines(role, target, width, _LABEL)
    if targets:
        first = targets[0]
        targets[0] = Text(" " * _INDENT + "targets".ljust(_LABEL - _INDENT)) + first[_LABEL:]
        out += targets
    else:
        out += _field("targets", [" " * _LABEL + "-"])
    options = [f"{key}={value}" for key, value in row["options"].items()]
    out += _field("options", wrap_items(options, width, _LABEL))
    if row.get("quantized_layers"):
        out += _field("quantized", wrap_words(row["quantized_layers"], width, _LABEL))
    return out


def plan_lines(rows: Iterable[Mapping], width: int) -> list[Text]:
    """Every patch of a plan, a blank line between two."""
    out: list[Text] = []
    for row in rows:
        if out:
            out.append(Text(""))
        out += plan_patch(row, width)
    return out


def labelled(label: str, text: str, width: int, indent: int = 2) -> list[str]:
    """`label: text` wrapped between words, continuation lines under the text."""
    lines = wrap_words(text, width, indent + len(label) + 2)
    lines[0] = " " * indent + f"{label}: " + lines[0].lstrip()
    return lines

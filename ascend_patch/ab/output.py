"""How an A/B result is shown: tables that fit 80 columns, plain verdicts, legend, plot."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from ascend_patch.ab.stats import Estimate

WIDTH = 80
# Labels longer than this become letters (A, B, ...) in the tables; the legend says which.
# 8 keeps the widest table (three ratio columns of '1.234 [1.234, 1.234]') within 80 columns.
MAX_LABEL = 8


def short_labels(labels: Sequence[str]) -> list[str]:
    if all(len(label) <= MAX_LABEL for label in labels):
        return list(labels)
    return [_letter(i) for i in range(len(labels))]


def _letter(index: int) -> str:
    text = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        text = chr(ord("A") + rest) + text
    return text


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def fmt(est: Estimate | None, scale: float = 1.0, digits: int = 0) -> str:
    """'137 [131, 145]': median and its 95% interval; '137 (n=3)' when n is too small."""
    if est is None:
        return "-"
    median = _number(est.median * scale, digits)
    if est.lo is None or est.hi is None:
        return f"{median} (n={est.n})"
    return f"{median} [{_number(est.lo * scale, digits)}, {_number(est.hi * scale, digits)}]"


def digits_for(estimates: Sequence[Estimate | None], scale: float = 1.0) -> int:
    """Decimals for a column: about three significant figures of its largest value (interval
    ends included), so that '93 [83, 130]' keeps the column narrow enough for 80 columns."""
    values = [abs(v) * scale for e in estimates if e is not None
              for v in (e.median, e.lo, e.hi) if v is not None]
    top = max(values, default=0.0)
    return 0 if top >= 100 else 1 if top >= 10 else 2 if top >= 1 else 3


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    # Text, not markup: an interval "[lo, hi]" or a label with brackets must print as it is.
    out = Table(title=Text(title), box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for i, column in enumerate(columns):
        # Figures are never wrapped mid-number; the first column is the arm.
        out.add_column(Text(column), justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        out.add_row(*(Text(cell) for cell in row))
    return out


def wrap(text: str, indent: str = "  ") -> str:
    return textwrap.fill(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def say(console, text: str, indent: str = "  ") -> None:
    """Print prose wrapped at 80 columns, as it is (no markup: "[lo, hi]" is not a style)."""
    console.print(wrap(text, indent), markup=False, highlight=False, soft_wrap=True)


def ratio_phrase(ratio: Estimate, verdict: str) -> str:
    """A ratio with its verdict, for the sentences under the tables."""
    figure = fmt(ratio, 1, 3)
    if verdict in ("better", "worse"):
        return f"{verdict} ({figure})"
    if verdict == "no measurable difference":
        return f"no measurable difference ({figure})"
    return f"{figure}: {verdict}"


def dlogp(row: dict[str, Any]) -> str:
    """The mean |logprob difference|, or '-' when no position could be compared."""
    if not row.get("first_logprob_positions"):
        return "-"
    return f"{row['first_logprob_mean_abs_diff']:.4f}"


def percent(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None: matplotlib is an optional extra (the JSON
    and the table are the results, a PNG is a view)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_skipped_line(name: str) -> str:
    return f"{name} skipped: matplotlib is not installed (pip install 'ascend-patch[tools]')"


def plot(path: Path, title: str, labels: Sequence[str], ratios: dict[str, list[Estimate | None]],
         agreement: dict[str, list[float | None]], xlabel: str = "arm",
         per: str = "repeat") -> tuple[Path | None, str]:
    """Paired ratios against the reference with their intervals, and agreement, per arm.

    Returns (path, message); path is None when the plot was skipped (the message says why).
    """
    plt = pyplot()
    if plt is None:
        return None, plot_skipped_line(path.name)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    xs = list(range(len(labels)))
    count = max(len(ratios), 1)
    for j, (name, estimates) in enumerate(ratios.items()):
        offset = (j - (count - 1) / 2) * 0.15
        pts = [(x + offset, e) for x, e in zip(xs, estimates) if e is not None]
        if not pts:
            continue
        medians = [e.median for _, e in pts]
        lower = [e.median - e.lo if e.lo is not None else 0.0 for _, e in pts]
        upper = [e.hi - e.median if e.hi is not None else 0.0 for _, e in pts]
        left.errorbar([p for p, _ in pts], medians, yerr=[lower, upper], fmt="o", capsize=4,
                      label=name)
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="no difference")
    left.set_xticks(xs, labels)
    left.set_xlabel(xlabel)
    left.set_ylabel("arm vs reference (>1: arm better)")
    left.set_title(f"median of per-{per} ratios, 95% interval", fontsize=10)
    width = 0.8 / max(len(agreement), 1)
    for j, (name, values) in enumerate(agreement.items()):
        offset = (j - (len(agreement) - 1) / 2) * width
        right.bar([x + offset for x in xs], [100 * (v or 0.0) for v in values], width, label=name)
    right.set_xticks(xs, labels)
    right.set_ylim(0, 105)
    for ax in (left, right):
        ax.set_xlim(-0.6, len(labels) - 0.4)
    right.set_xlabel(xlabel)
    right.set_ylabel("agreement with reference (%)")
    right.set_title("outputs against the reference", fontsize=10)
    # Legends below their axes, never over the data.
    for ax in (left, right):
        handles, names = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                      fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path, f"wrote {path}"


def save(console, out_dir: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
         title: str, ratios: dict[str, str], **plot_options: str) -> None:
    """ab.json, and ab.png of `ratios` (legend -> row key) and the agreement of every row
    against the first (the reference); says what was written."""
    json_path = out_dir / "ab.json"
    json_path.write_text(json.dumps(summary, indent=2))
    labels = short_labels([r["label"] for r in rows])
    _, message = plot(
        out_dir / "ab.png", f"{title}: against {labels[0]}", labels[1:],
        {legend: [r[key] for r in rows[1:]] for legend, key in ratios.items()},
        {"exact match": [r["exact_match_rate"] for r in rows[1:]],
         "token agreement": [r["token_agreement"] for r in rows[1:]]}, **plot_options)
    console.print(f"wrote {json_path}", markup=False)
    console.print(message, markup=False)


def as_json(value: Any) -> Any:
    if isinstance(value, Estimate):
        return value.as_json()
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return value

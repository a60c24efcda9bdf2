"""`moe.capacity`'s series on vLLM's /metrics (written through core/metrics.py).

Labels: `patch` (the config's patch name), `layer` (vLLM's layer name), `dp_rank`, and
`process`, the writing process's role and ranks (`worker-dp1-tp0-ep1`, the name of its
report). Per layer and DP rank:

    ascend_patch_moe_calls_total                      MoE calls planned
    ascend_patch_moe_calls_with_drops_total           ... of which dropped at least one row
    ascend_patch_moe_rows_routed_total                (token, expert) rows of this DP rank's
    ascend_patch_moe_rows_dropped_total               tokens: routed / dropped (taken off
                                                      their bin; overflow: reroute included)
    ascend_patch_moe_rows_rerouted_total              ... of which rerouted (overflow: reroute)
    ascend_patch_moe_bin_load_{max,mean}_{before,after}_rows_total
                                                      sums over calls of the max / mean bin
                                                      load over the whole EP group (their
                                                      rates' ratio is the load-weighted
                                                      max/mean imbalance, as in the report)
    ascend_patch_moe_capacity_rows                    gauge: the cap C of the last call
    ascend_patch_moe_last_bin_load_{max,mean}_{before,after}_rows
                                                      gauges: the last call's bin loads
    ascend_patch_moe_all_to_all_bytes_total           bytes this process sent to other EP
                                                      ranks (dispatch + combine)

vllm-ascend's FUSED_MC2 steps (telemetry/overflow.py), per layer and receiving EP rank (label
`ep_rank` instead of `dp_rank`; each process writes its own rank's, so nothing is counted
twice):

    ascend_patch_moe_fused_mc2_calls_total            fused MC2 calls counted
    ascend_patch_moe_fused_mc2_rows_received_total    (token, expert) rows routed to this
                                                      rank's experts from the whole EP group
    ascend_patch_moe_fused_mc2_rows_over_capacity_total
                                                      ... of which past mega_moe_max_tokens:
                                                      the rows dispatch_ffn_combine truncates
    ascend_patch_moe_fused_mc2_max_output_rows        gauge: mega_moe_max_tokens in force

Rows are this DP rank's own, so `sum by (layer)` over dp_rank is the EP group's total (the
report's rows_routed / rows_dropped, which are global). Bin loads, the cap and the calls are
the same on every DP rank (one plan for the whole group). The ranks that share a DP rank's
tokens (its TP ranks) plan identically: only the first of them writes these, or a counter
summed over processes would count them twice; every process writes its own all-to-all bytes,
which are summed. Gauges use multiprocess_mode "mostrecent": one process writes each labelled
gauge, and if it is replaced the newest value wins instead of a stale one per pid.

`process` costs few series: one process writes each labelled series, so the rows, calls and
gauges stay one set per (layer, DP rank) (written by the DP rank's first TP rank; under
sequence-parallel MoE by each of its TP ranks, whose rows are their own), and only the bytes
become one per (layer, worker) instead of per (layer, DP rank). The label holds ranks, not a
pid: a restarted worker continues its series instead of adding some.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GAUGE_MODE = "mostrecent"

_COUNTERS = {
    "calls": "MoE calls planned by moe.capacity",
    "calls_with_drops": "MoE calls that dropped at least one (token, expert) row",
    "rows_routed": "(token, expert) rows routed from this DP rank's tokens",
    "rows_dropped": "(token, expert) rows dropped from this DP rank's tokens",
    "bin_load_max_before_rows": "sum over calls of the most loaded bin's rows before dropping "
                                "(EP group)",
    "bin_load_max_after_rows": "sum over calls of the most loaded bin's rows after dropping "
                               "(EP group)",
    "bin_load_mean_before_rows": "sum over calls of the mean bin load before dropping "
                                 "(EP group)",
    "bin_load_mean_after_rows": "sum over calls of the mean bin load after dropping (EP group)",
}
# Only with overflow: reroute (a drop-only patch exports no series that stays 0).
_REROUTED = ("rows_rerouted", "of the dropped rows, those rerouted to an expert with room "
             "(overflow: reroute)")
_GAUGES = {
    "capacity_rows": "per-bin capacity C of the last MoE call (EP group)",
    "last_bin_load_max_before_rows": "most loaded bin's rows before dropping, last MoE call",
    "last_bin_load_max_after_rows": "most loaded bin's rows after dropping, last MoE call",
    "last_bin_load_mean_before_rows": "mean bin load before dropping, last MoE call",
    "last_bin_load_mean_after_rows": "mean bin load after dropping, last MoE call",
}
BYTES = "all_to_all_bytes"
_BYTES_HELP = "bytes sent to other EP ranks by the all-to-all dispatch and combine"


def name(short: str) -> str:
    return "ascend_patch_moe_" + short


@dataclass
class LayerSeries:
    """The series of one (patch, layer, DP rank) in this process. `planned` is False on the
    ranks that share a DP rank's tokens with an earlier one: they only add bytes."""

    counters: dict[str, Any]
    gauges: dict[str, Any]
    bytes_sent: Any
    planned: bool
    dp_rank: int = 0
    process: str = ""

    def record(self, *, routed: int, dropped: int, capacity: int, max_before: int,
               max_after: int, mean_before: float, mean_after: float,
               rerouted: int = 0) -> None:
        if not self.planned:
            return
        c, g = self.counters, self.gauges
        c["calls"].inc(1)
        if dropped:
            c["calls_with_drops"].inc(1)
        c["rows_routed"].inc(routed)
        c["rows_dropped"].inc(dropped)
        if rerouted and "rows_rerouted" in c:
            c["rows_rerouted"].inc(rerouted)
        for key, value in (("max_before", max_before), ("max_after", max_after),
                           ("mean_before", mean_before), ("mean_after", mean_after)):
            c[f"bin_load_{key}_rows"].inc(value)
            g[f"last_bin_load_{key}_rows"].set(value)
        g["capacity_rows"].set(capacity)

    def add_bytes(self, nbytes: int) -> None:
        if nbytes:
            self.bytes_sent.inc(nbytes)


def layer_series(writer: Any, patch: str, layer: str, dp_rank: int,
                 planned: bool, process: str | None = None,
                 rerouting: bool = False) -> LayerSeries:
    if process is None:
        from ascend_patch.core.metrics import process_label

        process = process_label()
    labels = {"patch": patch, "layer": layer, "dp_rank": str(dp_rank), "process": process}
    counters, gauges = {}, {}
    if planned:
        counters = {k: writer.counter(name(k), doc, labels) for k, doc in _COUNTERS.items()}
        if rerouting:
            counters[_REROUTED[0]] = writer.counter(name(_REROUTED[0]), _REROUTED[1], labels)
        gauges = {k: writer.gauge(name(k), doc, labels, GAUGE_MODE) for k, doc in _GAUGES.items()}
    return LayerSeries(counters, gauges, writer.counter(name(BYTES), _BYTES_HELP, labels),
                       planned, dp_rank, process)


_OVERFLOW_COUNTERS = {
    "fused_mc2_calls": "vllm-ascend FUSED_MC2 calls counted",
    "fused_mc2_rows_received": "(token, expert) rows routed to this EP rank's experts from the "
                               "whole EP group on FUSED_MC2 calls",
    "fused_mc2_rows_over_capacity": "rows past mega_moe_max_tokens on this EP rank: "
                                    "dispatch_ffn_combine truncates them uncomputed",
}
_OVERFLOW_GAUGE = ("fused_mc2_max_output_rows",
                   "mega_moe_max_tokens, dispatch_ffn_combine's rows per receiving rank")


@dataclass
class OverflowSeries:
    """The FUSED_MC2 series of one (patch, layer, EP rank) in this process."""

    counters: dict[str, Any]
    limit: Any

    def record(self, *, received: int, over: int, max_output_rows: int) -> None:
        self.counters["fused_mc2_calls"].inc(1)
        self.counters["fused_mc2_rows_received"].inc(received)
        self.counters["fused_mc2_rows_over_capacity"].inc(over)
        self.limit.set(max_output_rows)


def overflow_series(writer: Any, patch: str, layer: str, ep_rank: int,
                    process: str | None = None) -> OverflowSeries:
    if process is None:
        from ascend_patch.core.metrics import process_label

        process = process_label()
    labels = {"patch": patch, "layer": layer, "ep_rank": str(ep_rank), "process": process}
    counters = {k: writer.counter(name(k), doc, labels) for k, doc in _OVERFLOW_COUNTERS.items()}
    short, doc = _OVERFLOW_GAUGE
    return OverflowSeries(counters, writer.gauge(name(short), doc, labels, GAUGE_MODE))

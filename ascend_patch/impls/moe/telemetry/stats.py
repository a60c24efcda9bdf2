"""Per-process, per-layer drop counters of `moe.capacity`, kept in `ctx.stats`.

Shape of `ctx.stats` (JSON-friendly: str keys, ints and floats only):

    {
      "calls": 12,                      # MoE calls planned in this process, all layers
      "rows_routed": 4096,              # (token, expert) rows the router produced
      "rows_dropped": 409,
      "drop_fraction": 0.0999,
      "layers_taken_over": ["model.layers.1.mlp.experts", ...],
      "layers_not_taken_over": {"<layer>": "<reason>"},
      "dispatch_paths": {"<layer>": {"path": "all_to_all" | "allgather", "why": "..."}},
      "quantization": {"<layer>": "int8 W8A8: ..."},   # quantized layers taken over only
      "all_to_all": {"calls": .., "rows_sent": .., "rows_sent_remote": ..,
                     "rows_received": .., "rows_not_sent_dropped": ..,
                     "hidden_rows_sent": .., "hidden_rows_sent_remote": ..,
                     "hidden_rows_received": .., "hidden_rows_returned_remote": ..,
                     "bytes_sent_remote": .., "dispatch_bytes_remote": ..,
                     "combine_bytes_remote": ..},   # only when a layer uses all_to_all
                                        # (rows: (token, expert) rows; hidden rows: one
                                        # per (token, rank) pair; see DispatchCounters)
      "config_checked_over_ranks": 2,   # EP group size of the config check at load
      "warmup": {"calls": .., "rows_routed": .., "rows_dropped": .., "all_to_all": {..}},
                                        # vLLM's start-up warm-up (dummy data), counted
                                        # here only: never in the counters above, the
                                        # layers or /metrics (see `warming_up`)
      "metrics": {"<layer>": {"dp_rank": 0, "writes_rows": true}},  # its /metrics labels
                                        # (metrics.py), when metrics are on
      "layers": {
        "<layer name>": {
          "calls": 6, "calls_with_drops": 3,
          "rows_routed": 2048, "rows_dropped": 204, "drop_fraction": 0.0996,
          "rows_rerouted": 150,           # overflow: reroute only: of the dropped rows,
                                          # this rank's rerouted to an expert with room
          "capacity_last": 180, "budget_last": 204,
          "bins": 2,                      # EP ranks (or simulated ranks, or experts)
          "max_bin_load_before_sum": ..., "max_bin_load_after_sum": ...,
          "mean_bin_load_before_sum": ..., "mean_bin_load_after_sum": ...,
          "max_over_mean_before": 1.31, "max_over_mean_after": 1.12,
          "max_bin_load_before_peak": 400, "max_bin_load_after_peak": 300,
          "quant": "W8A8_DYNAMIC"         # vllm-ascend only: the layer's MoE scheme
        }
      }
    }

Counts are global over the EP group (what `plan_drops` reports): with TP-only EP every rank
reports the same numbers. The sums over calls let a reader average; max_over_mean is
sum(max bin load) / sum(mean bin load), the load-weighted imbalance that sets step time.

A plan's counters are device tensors (planner/capacity.py: reading one would stall the
device's queue on every MoE call). `record` keeps one small int64 vector per call on the
device and counts the calls on the host; `fold` reads the pending vectors back in one copy
and adds them to the counters above and to /metrics. It runs at the log interval, before
every report is written or read (`PatchContext.read_stats`), at the end of the warm-up and
at least every FOLD_EVERY calls (which bounds the memory held and how stale /metrics gets);
on the CPU, where reading back stalls nothing, after every call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("ascend_patch.moe.capacity")

# Pending per-call vectors are read back at least this often (one host read per fold).
FOLD_EVERY = 256
# Devices where reading back stalls nothing: their counters fold after every call, so /metrics
# and the report are exact per call (outside a torch.compile trace).
FOLD_AT_ONCE_ON = frozenset({"cpu"})
# What each call's vector holds (int64, on the plan's device).
_VECTOR = ("routed", "dropped", "max_before", "max_after", "sum_before", "sum_after",
           "capacity", "budget", "local_routed", "local_dropped", "rerouted")


class CapacityStats:
    """Owns the counters of one patch in one process; `record` is called once per MoE call."""

    def __init__(self, stats: dict[str, Any], log_interval: int, flush: Any = None):
        self._stats = stats
        self._log_interval = int(log_interval)
        self._flush = flush
        self._flush_failed = False
        # Layer -> metrics.LayerSeries of the layers exported to /metrics.
        self._series: dict[str, Any] = {}
        # Layer -> quantization scheme, where the platform adapter names one.
        self._quant: dict[str, str] = {}
        # Nesting depth of `warming_up` (vLLM's start-up warm-up runs while > 0).
        self._warming = 0
        # Calls recorded but not folded yet: (layer or None for the warm-up, whether the
        # plan rerouted, int64 vector on the device in _VECTOR's order).
        self._pending: list[tuple[str | None, bool, Any]] = []
        # Layer -> whether its counters fold after every call (FOLD_AT_ONCE_ON).
        self._fold_now: dict[str, bool] = {}
        stats.setdefault("calls", 0)
        stats.setdefault("rows_routed", 0)
        stats.setdefault("rows_dropped", 0)
        stats.setdefault("drop_fraction", 0.0)
        stats.setdefault("layers_taken_over", [])
        stats.setdefault("layers_not_taken_over", {})
        stats.setdefault("layers", {})

    # -- layer set-up -------------------------------------------------------------------

    def layer_taken_over(self, layer_name: str) -> None:
        taken = self._stats["layers_taken_over"]
        if layer_name not in taken:
            taken.append(layer_name)

    def layer_quant(self, layer_name: str, scheme: str) -> None:
        """Name the layer's quantization scheme in its report row ("quant")."""
        self._quant[layer_name] = scheme
        row = self._stats["layers"].get(layer_name)
        if row is not None:
            row["quant"] = scheme

    def layer_not_taken_over(self, layer_name: str, reason: str) -> None:
        self._stats["layers_not_taken_over"][layer_name] = reason

    def layer_quantization(self, layer_name: str, scheme: str) -> None:
        """What a quantized taken-over layer computes (unquantized layers have no entry)."""
        self._stats.setdefault("quantization", {})[layer_name] = scheme

    def dispatch_path(self, layer_name: str, path: str, why: str) -> None:
        """Which dispatch a taken-over layer uses ("all_to_all" or vLLM's "allgather")."""
        self._stats.setdefault("dispatch_paths", {})[layer_name] = {"path": path, "why": why}

    def dispatch_counters(self) -> Any:
        """The process's all-to-all traffic counters (shared by every layer)."""
        counters = getattr(self, "_dispatch_counters", None)
        if counters is None:
            counters = self._dispatch_counters = DispatchCounters()
            self._stats["all_to_all"] = counters.as_dict()
        return counters

    def export_layer(self, layer_name: str, series: Any) -> None:
        """Feed `layer_name`'s counters to /metrics too (a metrics.LayerSeries)."""
        self._series[layer_name] = series
        # The labels in the report, so a reader can match a worker to its series.
        self._stats.setdefault("metrics", {})[layer_name] = {
            "dp_rank": series.dp_rank, "process": series.process,
            "writes_rows": series.planned}

    def dispatch_recorded(self, layer_name: str | None = None, nbytes: int = 0) -> None:
        """Copy the traffic counters into the stats (called after every combine, with the
        layer and the bytes the call sent to other ranks).

        With the all-to-all the report is flushed here, at the log interval, and not by
        `record` (before the call's dispatch ran): every report then has drop and traffic
        counters of the same calls (and every rank of a DP group runs the same number of MoE
        calls, so their reports line up too)."""
        if self._warming:
            return  # warming_up moves the warm-up's traffic apart when it ends
        self._stats["all_to_all"] = self._dispatch_counters.as_dict()
        series = self._series.get(layer_name) if layer_name is not None else None
        if series is not None:
            series.add_bytes(nbytes)
        if self._log_interval and self._stats["calls"] % self._log_interval == 0:
            self._flush_report()

    def fold(self) -> None:
        """Read the pending calls' counters back (one device-to-host copy) and add them to
        the report's counters and the /metrics series, in call order."""
        # Take the first n entries in place: a call recorded meanwhile (a report may be read
        # from another thread) lands after them and waits for the next fold. No lock: the
        # step runs under torch.compile, which traces list appends but not locks.
        count = len(self._pending)
        pending = self._pending[:count]
        del self._pending[:count]
        if not pending:
            return
        import torch

        device = pending[0][2].device
        rows = torch.stack([vector.to(device) for _, _, vector in pending]).tolist()
        for (layer_name, rerouting, _), row in zip(pending, rows, strict=True):
            values = dict(zip(_VECTOR, row, strict=True))
            if layer_name is None:
                warm = self._warmup()
                warm["rows_routed"] += values["routed"]
                warm["rows_dropped"] += values["dropped"]
            else:
                self._fold_call(layer_name, rerouting, values)

    def config_checked(self, group_size: int) -> None:
        self._stats["config_checked_over_ranks"] = int(group_size)

    # -- vLLM's start-up warm-up --------------------------------------------------------

    @contextmanager
    def warming_up(self) -> Iterator[None]:
        """MoE calls inside this are vLLM's start-up warm-up (the memory profile and the
        compile warm-up run the model on dummy data before the engine reports ready): they
        are counted under "warmup" only, and the serving counters, the layers' rows, the
        all-to-all traffic and /metrics stay as they were."""
        counters = getattr(self, "_dispatch_counters", None)
        before = dataclasses.replace(counters, extra=dict(counters.extra)) if (
            counters is not None and not self._warming) else None
        self._warming += 1
        try:
            yield
        finally:
            self._warming -= 1
            if before is not None:
                self._set_traffic_apart(counters, before)
            if not self._warming:
                self.fold()  # once, at the end of the warm-up

    def _set_traffic_apart(self, counters: DispatchCounters, before: DispatchCounters) -> None:
        warm = self._warmup().setdefault("all_to_all", {})
        for name, value in before.__dict__.items():
            if isinstance(value, int):
                warm[name] = warm.get(name, 0) + getattr(counters, name) - value
                setattr(counters, name, value)
        self._stats["all_to_all"] = counters.as_dict()

    def _warmup(self) -> dict[str, Any]:
        return self._stats.setdefault("warmup", {"calls": 0, "rows_routed": 0,
                                                 "rows_dropped": 0})

    def _record_warmup(self, plan: Any) -> None:
        self._warmup()["calls"] += 1
        self._add_pending(None, False, plan)

    def _fold_at_once(self, layer_name: str) -> bool:
        """Whether this call folds now: decided at the layer's first eager call (its plans
        stay on one device). Never inside a torch.compile trace, which so leaves this state
        alone (no guard on it, no recompile when the next layer adds its entry)."""
        import torch

        if torch.compiler.is_compiling():
            return False
        at_once = self._fold_now.get(layer_name)
        if at_once is None:
            device = self._pending[-1][2].device  # this call's vector
            at_once = self._fold_now[layer_name] = device.type in FOLD_AT_ONCE_ON
        return at_once

    def _add_pending(self, layer_name: str | None, rerouting: bool, plan: Any) -> int:
        self._pending.append((layer_name, rerouting, _vector(plan)))
        return len(self._pending)

    # -- per call -----------------------------------------------------------------------

    def record(self, layer_name: str, plan: Any) -> None:
        """Add one `DropPlan` (capacity.py) to the counters of `layer_name`: the calls now,
        the rows and loads at the next `fold` (no host read here)."""
        if self._warming:
            self._record_warmup(plan)
            return
        bins = int(plan.bin_load_before.numel())  # a shape: no host read
        layer = self._stats["layers"].get(layer_name)
        if layer is None:
            layer = self._stats["layers"][layer_name] = {
                "calls": 0,
                "calls_with_drops": 0,
                "rows_routed": 0,
                "rows_dropped": 0,
                "drop_fraction": 0.0,
                "capacity_last": 0,
                "budget_last": 0,
                "bins": bins,
                "max_bin_load_before_sum": 0,
                "max_bin_load_after_sum": 0,
                "mean_bin_load_before_sum": 0.0,
                "mean_bin_load_after_sum": 0.0,
                "max_over_mean_before": 0.0,
                "max_over_mean_after": 0.0,
                "max_bin_load_before_peak": 0,
                "max_bin_load_after_peak": 0,
            }
            if layer_name in self._quant:
                layer["quant"] = self._quant[layer_name]
        layer["calls"] += 1
        layer["bins"] = bins
        stats = self._stats
        stats["calls"] += 1
        pending = self._add_pending(layer_name, getattr(plan, "topk_ids", None) is not None,
                                    plan)

        if self._log_interval and stats["calls"] % self._log_interval == 0:
            # With the all-to-all the report is written after this call's combine
            # (dispatch_recorded) only: a process stopped between the two then leaves the
            # previous interval's report, whose drop and traffic counters agree.
            self.log(flush=getattr(self, "_dispatch_counters", None) is None)
        elif pending >= FOLD_EVERY or self._fold_at_once(layer_name):
            self.fold()

    def _fold_call(self, layer_name: str, rerouting: bool, values: dict[str, int]) -> None:
        layer = self._stats["layers"][layer_name]
        bins = layer["bins"]
        max_before, max_after = values["max_before"], values["max_after"]
        mean_before = float(values["sum_before"]) / bins if bins else 0.0
        mean_after = float(values["sum_after"]) / bins if bins else 0.0
        routed, dropped, rerouted = values["routed"], values["dropped"], values["rerouted"]
        layer["calls_with_drops"] += int(dropped > 0)
        layer["rows_routed"] += routed
        layer["rows_dropped"] += dropped
        if rerouting:
            layer["rows_rerouted"] = layer.get("rows_rerouted", 0) + rerouted
        layer["drop_fraction"] = _ratio(layer["rows_dropped"], layer["rows_routed"])
        layer["capacity_last"] = values["capacity"]
        layer["budget_last"] = values["budget"]
        layer["max_bin_load_before_sum"] += max_before
        layer["max_bin_load_after_sum"] += max_after
        layer["mean_bin_load_before_sum"] += mean_before
        layer["mean_bin_load_after_sum"] += mean_after
        layer["max_over_mean_before"] = _ratio(
            layer["max_bin_load_before_sum"], layer["mean_bin_load_before_sum"]
        )
        layer["max_over_mean_after"] = _ratio(
            layer["max_bin_load_after_sum"], layer["mean_bin_load_after_sum"]
        )
        layer["max_bin_load_before_peak"] = max(layer["max_bin_load_before_peak"], max_before)
        layer["max_bin_load_after_peak"] = max(layer["max_bin_load_after_peak"], max_after)

        series = self._series.get(layer_name)
        if series is not None:
            series.record(routed=values["local_routed"], dropped=values["local_dropped"],
                          capacity=values["capacity"], max_before=max_before,
                          max_after=max_after, mean_before=mean_before,
                          mean_after=mean_after, rerouted=rerouted)

        stats = self._stats
        stats["rows_routed"] += routed
        stats["rows_dropped"] += dropped
        stats["drop_fraction"] = _ratio(stats["rows_dropped"], stats["rows_routed"])

    def log(self, flush: bool = True) -> None:
        self.fold()
        stats = self._stats
        logger.info(
            "moe.capacity: %d calls, %d/%d rows dropped (%.4f); per layer: %s",
            stats["calls"],
            stats["rows_dropped"],
            stats["rows_routed"],
            stats["drop_fraction"],
            ", ".join(
                f"{name} drop={layer['drop_fraction']:.4f} C={layer['capacity_last']} "
                f"max/mean {layer['max_over_mean_before']:.2f}->"
                f"{layer['max_over_mean_after']:.2f}"
                for name, layer in stats["layers"].items()
            ),
        )
        if flush:
            self._flush_report()

    def _flush_report(self) -> None:
        self.fold()
        if self._flush is not None and not self._flush_failed:
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - a report failure must not break a forward
                self._flush_failed = True
                logger.warning("moe.capacity: could not write the process report: %s", exc)


def _vector(plan: Any) -> Any:
    """int64 [len(_VECTOR)] on the plan's device: one call's counters, without a host read
    (a plan made by hand with host ints gives them as tensors on its keep's device)."""
    import torch

    counts, before, after = plan.counts, plan.bin_load_before, plan.bin_load_after
    device = plan.keep.device
    empty = before.numel() == 0
    parts = [
        counts.routed_rows, counts.dropped_rows,
        before.new_zeros(()) if empty else before.max(),
        after.new_zeros(()) if empty else after.max(),
        before.sum(), after.sum(), counts.capacity, counts.budget,
        counts.local_routed_rows, counts.local_dropped_rows,
        _as_tensor(getattr(plan, "local_rerouted_rows", 0), counts.routed_rows),
    ]
    return torch.stack([part.to(device, torch.int64).reshape(()) for part in parts])


def _as_tensor(value: Any, like: Any) -> Any:
    return value if hasattr(value, "reshape") else like.new_full((), int(value))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


@dataclass
class DispatchCounters:
    """Per-process traffic counters (JSON-friendly), kept in the patch's stats.

    "rows" are kept (token, expert) rows (one 12-byte record each on the wire), "hidden
    rows" the hidden states sent (one per (token, destination rank) pair with a kept row
    there) and returned by the combine (one per pair received)."""

    calls: int = 0
    rows_sent: int = 0  # kept rows handed to the dispatch all-to-all (self included)
    rows_sent_remote: int = 0  # ... of them to other ranks
    rows_received: int = 0  # rows this rank's experts computed (self included)
    rows_not_sent_dropped: int = 0  # rows of this rank's slice dropped before sending
    hidden_rows_sent: int = 0  # (token, rank) hidden rows dispatched (self included)
    hidden_rows_sent_remote: int = 0  # ... of them to other ranks
    hidden_rows_received: int = 0  # pairs received (self included) = rows combine returns
    hidden_rows_returned_remote: int = 0  # combine rows sent back to other ranks
    bytes_sent_remote: int = 0  # dispatch + combine payload to other ranks
    # hidden_rows_sent_remote * H * itemsize + 12 * rows_sent_remote:
    dispatch_bytes_remote: int = 0
    combine_bytes_remote: int = 0  # hidden_rows_returned_remote * H * itemsize
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"}
        data.update(self.extra)
        return data

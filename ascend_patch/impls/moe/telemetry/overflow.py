"""FUSED_MC2's silent truncation, counted: rows past `mega_moe_max_tokens` per receiving EP rank.

vllm-ascend's FUSED_MC2 comm method (enable_fused_mc2: 1) runs the whole MoE in one kernel,
`dispatch_ffn_combine`, with a receive buffer of `max_output_size = mega_moe_max_tokens` rows
per rank (ascend_config.py:300-313, default 65536). What the kernel counts against it, read in
csrc/mc2/dispatch_ffn_combine/op_kernel/dispatch_ffn_combine_kernel.hpp (vllm-ascend
0.23.0.post1):

* a row is one routed (token, expert) pair: `moe_init_routing_quant_v2` expands the tokens to
  N x k rows and counts them per expert (:802); tokens whose `x_active_mask` entry is false
  get the id `expertNum` for all k rows and are sent nowhere (ApplyXActiveMask, :360-398,
  :391);
* receiving rank r holds its local experts g = 0..E/EP-1; `cumsumMM` sums, per local expert,
  the rows every source rank sends (GetCumsumForMMAIV, :402-432); the receive buffer is laid
  out expert-major, source rank within an expert (rowStart, :846);
* every stage clamps at `maxOutputSize` on that running sum (dispatch copy :847-851, GMM1
  :456-460, SwiGLU :873-886, GMM2 :563-567, combine V1 :998-1002, V2 :1038-1042): rows at
  positions >= max_output_size are neither copied, computed nor combined. Nothing reports it.

So the rows rank r loses are max(0, R_r - max_output_size), R_r being every row routed to one of
r's experts from all EP ranks (tokens x k over the EP group, restricted to r's experts: a token
with two of its k experts on r counts twice); the lost ones are the last local experts' rows
(highest local index first) and, within the expert that crosses the limit, the later source
ranks'. What the combine reads for them is what the buffer held (not written by this call).

Torch only: no vLLM, no vllm-ascend. `adapters/ascend_fused_mc2.py` feeds it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("ascend_patch.moe.capacity")


def local_rows_per_expert(
    topk_ids: torch.Tensor, active: torch.Tensor | None, num_experts: int
) -> torch.Tensor:
    """int64 [num_experts]: this rank's rows per physical expert as the kernel sends them.

    Rows of inactive tokens, and ids outside [0, num_experts) (which the kernel would not
    place on any rank), count nowhere. The kernel reads the mask of its first N tokens only
    (ApplyXActiveMask): a longer mask (padded for another TP slice) is cut to them."""
    ids = topk_ids.long()
    if active is not None:
        inactive = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        mask = active.reshape(-1)[: ids.shape[0]].bool()
        inactive[: mask.numel()] = ~mask
        ids = ids.masked_fill(inactive.reshape(-1, 1), num_experts)
    ids = ids.masked_fill((ids < 0) | (ids > num_experts), num_experts)
    return torch.bincount(ids.flatten(), minlength=num_experts + 1)[:num_experts]


def received_rows(gathered: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """int64 [ep_size]: the rows each EP rank receives, from every rank's per-expert counts
    (all-gathered, [S * E] or [S, E]); experts are owned contiguously, E / ep_size per rank
    (the kernel's expertPerRank x EP)."""
    per_expert = gathered.reshape(-1, num_experts).sum(dim=0)
    return per_expert.reshape(ep_size, -1).sum(dim=1)


class OverflowRecorder:
    """Per-layer counters of FUSED_MC2 truncation in `stats["fused_mc2"]`, their /metrics
    series (this process's EP rank), and one warning line per `log_interval` fused MC2 calls
    that truncated anything (0: one warning at the first truncation only)."""

    def __init__(self, stats: dict[str, Any], log_interval: int, flush: Any = None,
                 series: Any = None) -> None:
        self._log_interval = int(log_interval)
        self._flush = flush
        # layer -> metrics.OverflowSeries, made on the layer's first call (None: metrics off).
        self._series_for = series
        self._series: dict[str, Any] = {}
        self._warned_once = False
        # What the current interval truncated: layer -> [rows over, per rank].
        self._interval: dict[str, list[int]] = {}
        self._stats = stats.setdefault("fused_mc2", {
            "calls": 0, "calls_over_capacity": 0, "rows_over_capacity": 0,
            "max_output_rows": 0, "layers": {},
        })

    def record(self, layer_name: str, *, rank: int, max_output_rows: int,
               received: list[int]) -> None:
        """One fused MC2 call of `layer_name`: `received[r]` rows routed to EP rank r."""
        over = [max(0, int(r) - int(max_output_rows)) for r in received]
        stats = self._stats
        layer = stats["layers"].get(layer_name)
        if layer is None or len(layer["rows_over_capacity_by_rank"]) != len(received):
            layer = stats["layers"][layer_name] = {
                "calls": 0, "calls_over_capacity": 0,
                "rows_over_capacity_by_rank": [0] * len(received),
                "rows_received_by_rank": [0] * len(received),
                "rows_received_peak_by_rank": [0] * len(received),
                "rows_over_capacity_last_by_rank": [0] * len(received),
            }
        truncated = sum(over)
        layer["calls"] += 1
        layer["calls_over_capacity"] += int(truncated > 0)
        for r, (got, lost) in enumerate(zip(received, over)):
            layer["rows_over_capacity_by_rank"][r] += lost
            layer["rows_received_by_rank"][r] += int(got)
            layer["rows_received_peak_by_rank"][r] = max(
                layer["rows_received_peak_by_rank"][r], int(got))
        layer["rows_over_capacity_last_by_rank"] = over
        stats["calls"] += 1
        stats["calls_over_capacity"] += int(truncated > 0)
        stats["rows_over_capacity"] += truncated
        stats["max_output_rows"] = int(max_output_rows)
        self._export(layer_name, rank, max_output_rows, received, over)
        if truncated:
            totals = self._interval.setdefault(layer_name, [0] * len(over))
            for r, lost in enumerate(over):
                totals[r] += lost
        self._maybe_warn(max_output_rows)

    def _export(self, layer_name: str, rank: int, max_output_rows: int, received: list[int],
                over: list[int]) -> None:
        if self._series_for is None:
            return
        series = self._series.get(layer_name)
        if series is None:
            series = self._series[layer_name] = self._series_for(layer_name, rank)
        if 0 <= rank < len(received):
            series.record(received=int(received[rank]), over=int(over[rank]),
                          max_output_rows=int(max_output_rows))

    def _maybe_warn(self, max_output_rows: int) -> None:
        calls = self._stats["calls"]
        due = (calls % self._log_interval == 0) if self._log_interval else (
            not self._warned_once and bool(self._interval))
        if not due:
            return
        if self._interval:
            self._warned_once = True
            per_layer = "; ".join(
                f"{name} " + " ".join(f"ep{r}={n}" for r, n in enumerate(ranks) if n)
                for name, ranks in self._interval.items())
            span = (f"the last {self._log_interval} fused MC2 calls" if self._log_interval
                    else "this fused MC2 call")
            logger.warning(
                "moe.capacity: FUSED_MC2 truncated %d (token, expert) rows in %s past "
                "mega_moe_max_tokens=%d per receiving EP rank (dispatch_ffn_combine drops "
                "them uncomputed, silently): %s; totals in the report under fused_mc2",
                sum(sum(r) for r in self._interval.values()), span, max_output_rows, per_layer)
            self._interval = {}
        if self._flush is not None and self._log_interval:
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - a report failure must not break a forward
                logger.warning("moe.capacity: could not write the process report: %s", exc)
                self._flush = None

"""`ascend-patch ab --layer`: the MoE layer alone on synthetic DeepSeek-V3-shaped routing.

For each skew (target per-rank max/mean at the simulated EP size), each drop ratio r and
each policy:

* probs / position: `plan_drops` (granularity rank, the patch's own planner);
* seed: vllm-ascend PR #1067's fixed per-(source, destination) capacity, dropped by
  position, sized to drop exactly as many rows as probs did;

it reports the rows dropped against the budget floor(r * rows), the bottleneck-rank load
ratio (max rank load before / after) against the analytic limit max_load / water level
(the least cap C with sum over ranks of max(0, load - C) <= the budget), the measured compute time of the most loaded simulated rank
before / after (what `backend: auto` computes on the rows that rank receives: vLLM's CPU
kernel where this stack has it, else the torch backend, lab/experts.py; interleaved
repetitions, medians), and the relative error ||y_r - y_0|| / ||y_0|| of the routed-expert
output of the whole layer. Every time ratio is measured in one run against the r = 0 arm of the same run.

The layer benchmarks (scripts/bench_moe_layer.py, bench_vs_native.py, bench_dispatch.py) build
on the same helpers. It imports torch, so it is lab code: `ascend-patch ab` imports it only
when --layer is given.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

POLICIES = ("probs", "position", "seed")


@dataclass
class LayerSetup:
    tokens: int = 4096
    experts: int = 256
    top_k: int = 8
    ep_size: int = 16
    hidden: int = 1024
    intermediate: int = 256
    dtype: str = "bfloat16"
    seed: int = 0
    reps: int = 9
    threads: int = 1
    keep_top1: bool = True
    skews: Sequence[float | str] = ("balanced", "moderate", "r1")
    ratios: Sequence[float] = (0.0, 0.01, 0.02, 0.05, 0.1)
    policies: Sequence[str] = POLICIES
    time_ranks: bool = True
    # False: time the torch backend even where vLLM's CPU kernel is installed (what the unit
    # tier checks, which must not import vLLM).
    native_kernel: bool = True


# ---------------------------------------------------------------- timing helpers


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1, alternate: bool = False
) -> dict[str, dict[str, float]]:
    """Run every fn once per round, `reps` rounds (after `warmup`), and return per fn the
    median, min and max seconds. Interleaving spreads the machine's load changes evenly
    over the arms, which matters on a shared 2-core host; `alternate` runs every other round
    in reverse order, so that no arm always follows the same one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(reps):
        order = list(fns.items())
        for name, fn in (order[::-1] if alternate and round_ % 2 else order):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {
        name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "n": len(s),
               "samples_s": s}
        for name, s in samples.items()
    }


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, including the load (`uptime`) at the time."""
    import platform
    import subprocess

    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except Exception:  # noqa: BLE001 - informative only
        uptime = ""
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": load_average(), "uptime": uptime}


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def save_result(result: dict[str, Any], out: str | Path, name: str) -> Path:
    """A benchmark's last step: its JSON written, the machine's load beside the path (a loaded
    machine's figures are not comparable)."""
    path = write_json(Path(out) / name, result)
    print(f"machine: {result['machine']['uptime']}\nwrote {path}")
    return path


# ---------------------------------------------------------------- the layer


def make_layer(setup: LayerSetup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I] in setup.dtype, seeded."""
    dtype = getattr(torch, setup.dtype)
    gen = torch.Generator().manual_seed(setup.seed + 1)
    x = torch.randn(setup.tokens, setup.hidden, generator=gen).to(dtype)
    w13 = (torch.randn(setup.experts, 2 * setup.intermediate, setup.hidden, generator=gen)
           / math.sqrt(setup.hidden)).to(dtype)
    w2 = (torch.randn(setup.experts, setup.hidden, setup.intermediate, generator=gen)
          / math.sqrt(setup.intermediate)).to(dtype)
    return x, w13, w2


def rank_problem(x, w13, w2, weights, ids, keep, rank: int, experts_per_rank: int,
                 native: bool = True):
    """What EP rank `rank` computes: the tokens with a kept row on it, its local experts."""
    from ascend_patch.lab.experts import experts

    local_rows = (torch.div(ids, experts_per_rank, rounding_mode="floor") == rank) & keep
    tokens = torch.nonzero(local_rows.any(dim=1)).squeeze(1)
    num_experts = w13.shape[0]
    expert_map = torch.full((num_experts,), -1, dtype=torch.long)
    local = torch.arange(rank * experts_per_rank, (rank + 1) * experts_per_rank)
    expert_map[local] = torch.arange(experts_per_rank)
    moe, _ = experts(w13[local].contiguous(), w2[local].contiguous(), native=native)
    args = (x[tokens].contiguous(), weights[tokens].contiguous(), ids[tokens].contiguous())
    rank_keep = local_rows[tokens].contiguous()
    rows = int(rank_keep.sum())

    def run():
        return moe(*args, keep=rank_keep, expert_map=expert_map)

    return run, rows


def relative_error(y: torch.Tensor, y0: torch.Tensor) -> float:
    y, y0 = y.double(), y0.double()
    norm = float(torch.linalg.vector_norm(y0))
    return float(torch.linalg.vector_norm(y - y0)) / norm if norm else 0.0


@dataclass
class Cell:
    skew: str
    skew_target: float
    skew_achieved: float
    ratio: float
    policy: str
    rows: int
    budget: int
    rows_dropped: int
    max_load_before: int
    max_load_after: int
    load_ratio: float
    ideal: float  # analytic limit without protection (reported)
    ideal_protected: float  # with keep_top1's protected rows
    rel_error: float
    bottleneck_rank_before: int
    bottleneck_rank_after: int
    time_before_s: float | None = None
    time_after_s: float | None = None
    time_ratio: float | None = None
    achieved_fraction: float | None = None  # time_ratio / ideal
    gain_fraction: float | None = None  # (time_ratio - 1) / (ideal - 1)
    extra: dict[str, Any] = field(default_factory=dict)


def _policy_keeps(weights, ids, ratio, setup: LayerSetup):
    """{policy: (keep [T,k], weights [T,k], dropped, budget, rank load after)}."""
    from ascend_patch.impls.moe.options import CapacityOptions
    from ascend_patch.impls.moe.planner.capacity import drop_budget, plan_drops
    from ascend_patch.lab.routing_sim import rank_loads, seed_fixed_capacity_keep

    out = {}
    routed = ids.numel()
    budget = drop_budget(ratio, routed)
    for policy in ("probs", "position"):
        options = CapacityOptions(
            drop_token_ratio=ratio, granularity="rank", drop_policy=policy,
            keep_top1=setup.keep_top1, renormalize=False, min_tokens=0,
            simulate_ep_size=setup.ep_size)
        plan = plan_drops(weights, ids, num_experts=setup.experts, ep_size=setup.ep_size,
                          options=options)
        load_after = rank_loads(ids[plan.keep], setup.experts, setup.ep_size)
        assert torch.equal(load_after, plan.bin_load_after)
        out[policy] = (plan.keep, plan.weights, plan.dropped_rows, plan.budget, load_after,
                       plan.capacity)
    if "seed" in setup.policies:
        drops = out["probs"][2]  # the same number of dropped rows as the planner
        keep, _ = seed_fixed_capacity_keep(ids, num_experts=setup.experts,
                                           ep_size=setup.ep_size, num_drops=drops)
        load_after = rank_loads(ids[keep], setup.experts, setup.ep_size)
        out["seed"] = (keep, weights.masked_fill(~keep, 0), int((~keep).sum()), budget,
                       load_after, None)
    return {p: v for p, v in out.items() if p in setup.policies}


def layer_ab(setup: LayerSetup, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """All cells of the layer A/B; see the module docstring."""
    from ascend_patch.impls.moe.planner.analytic import analytic_limit, protected_rank_load
    from ascend_patch.lab.experts import experts
    from ascend_patch.lab.routing_sim import (
        SKEWS,
        deepseek_routing,
        rank_loads,
        weight_profile,
    )

    threads_before = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        x, w13, w2 = make_layer(setup)
        moe_forward, computed_by = experts(w13, w2, native=setup.native_kernel)
        experts_per_rank = setup.experts // setup.ep_size
        ratios = sorted({0.0, *map(float, setup.ratios)})
        cells: list[Cell] = []
        routings = {}
        started = time.perf_counter()
        for skew in setup.skews:
            name = skew if isinstance(skew, str) else f"{float(skew):g}"
            target = SKEWS[skew] if isinstance(skew, str) else float(skew)
            if progress:
                progress(f"skew {name}: routing")
            routing = deepseek_routing(setup.tokens, skew, ep_size=setup.ep_size,
                                       num_experts=setup.experts, top_k=setup.top_k,
                                       seed=setup.seed)
            weights, ids = routing.topk_weights, routing.topk_ids
            routings[name] = {"target": target, "achieved": routing.max_over_mean,
                              "scale": routing.scale, **weight_profile(weights)}
            load = rank_loads(ids, setup.experts, setup.ep_size)
            protected = protected_rank_load(weights, ids, setup.experts, setup.ep_size)
            hot_rank = int(torch.argmax(load))
            y0 = moe_forward(x, weights, ids)
            all_rows = torch.ones_like(ids, dtype=torch.bool)
            timed: dict[str, Callable[[], Any]] = {}
            base_fn, _ = rank_problem(x, w13, w2, weights, ids, all_rows, hot_rank,
                                      experts_per_rank, setup.native_kernel)
            timed["base"] = base_fn
            skew_cells: list[Cell] = []
            for ratio in ratios:
                limit = analytic_limit(load, ratio, protected)
                keeps = ({p: (all_rows, weights, 0, 0, load, None) for p in setup.policies}
                         if ratio == 0 else _policy_keeps(weights, ids, ratio, setup))
                for policy, (keep, kept_weights, dropped, budget, load_after, capacity) in keeps.items():
                    if progress:
                        progress(f"skew {name}: r={ratio:g} {policy}")
                    y = y0 if ratio == 0 else moe_forward(x, kept_weights, ids, keep=keep)
                    max_after = int(load_after.max())
                    # The rank that now finishes last; on ties the one that was hottest.
                    at_max = torch.nonzero(load_after == max_after).squeeze(1)
                    after_rank = int(at_max[torch.argmax(load[at_max])])
                    cell = Cell(
                        skew=name, skew_target=target, skew_achieved=routing.max_over_mean,
                        ratio=ratio, policy=policy, rows=ids.numel(), budget=budget,
                        rows_dropped=dropped, max_load_before=int(load.max()),
                        max_load_after=max_after, load_ratio=int(load.max()) / max_after,
                        ideal=limit.ideal_speedup, ideal_protected=limit.ideal_speedup_protected,
                        rel_error=relative_error(y, y0), bottleneck_rank_before=hot_rank,
                        bottleneck_rank_after=after_rank,
                        extra={"water_level": limit.level,
                               "water_level_protected": limit.level_protected,
                               "planner_capacity": capacity,
                               # rows over the planner's cap (protected rows never drop)
                               "drops_at_capacity": None if capacity is None else int(
                                   (load - load.minimum((protected if setup.keep_top1 else
                                                         torch.zeros_like(protected))
                                                        .clamp(min=capacity))).sum())},
                    )
                    if setup.time_ranks and ratio > 0:
                        fn, rows = rank_problem(x, w13, w2, kept_weights, ids, keep, after_rank,
                                                experts_per_rank, setup.native_kernel)
                        assert rows == max_after
                        timed[f"{ratio}/{policy}"] = fn
                    skew_cells.append(cell)
            if setup.time_ranks:
                if progress:
                    progress(f"skew {name}: timing {len(timed)} arms x {setup.reps}")
                medians = interleaved_medians(timed, setup.reps)
                base = medians["base"]["median_s"]
                for cell in skew_cells:
                    after = base if cell.ratio == 0 else medians[f"{cell.ratio}/{cell.policy}"]["median_s"]
                    cell.time_before_s, cell.time_after_s = base, after
                    cell.time_ratio = base / after
                    cell.achieved_fraction = cell.time_ratio / cell.ideal
                    cell.gain_fraction = ((cell.time_ratio - 1) / (cell.ideal - 1)
                                          if cell.ideal > 1 else None)
            cells.extend(skew_cells)
        return {
            "setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(setup).items()},
            "torch_threads": setup.threads,
            "experts": computed_by,
            "routing": routings,
            "cells": [asdict(c) for c in cells],
            "wall_s": time.perf_counter() - started,
            "load_average": load_average(),
            "notes": (
                "ideal = max_load / water_level(load, 0, floor(r*rows)) (the least cap C with "
                "sum(max(0, load - C)) <= floor(r*rows), no protection); ideal_protected uses keep_top1's protected rows. time_ratio = median "
                "time of the hottest rank at r=0 / median time of the hottest rank after dropping "
                "(torch backend, interleaved reps). achieved_fraction = time_ratio / ideal; "
                "gain_fraction = (time_ratio - 1) / (ideal - 1)."),
        }
    finally:
        torch.set_num_threads(threads_before)


# ---------------------------------------------------------------- checks and output


def check_cells(result: dict[str, Any], keep_top1: bool) -> list[str]:
    """Honesty checks on the numbers; returns the violations (empty = all good)."""
    problems = []
    for c in result["cells"]:
        where = f"{c['skew']} r={c['ratio']:g} {c['policy']}"
        if c["ratio"] == 0:
            if c["rows_dropped"] or c["rel_error"] != 0 or c["load_ratio"] != 1:
                problems.append(f"{where}: r=0 arm dropped rows or has error/ratio != 1")
            if c["time_ratio"] is not None and c["time_ratio"] != 1:
                problems.append(f"{where}: r=0 time ratio {c['time_ratio']} != 1")
            continue
        if c["rows_dropped"] > c["budget"]:
            problems.append(f"{where}: dropped {c['rows_dropped']} > budget {c['budget']}")
        if c["policy"] != "seed":
            # The planner caps every rank at one integer capacity C, the water level: it drops
            # drops(C) <= budget rows and drops(C - 1) > budget (floor(r * rows) exactly only
            # when the budget falls on a reachable count). Check that it is that C and that
            # every row over it went.
            level = c["extra"]["water_level_protected" if keep_top1 else "water_level"]
            if c["extra"]["planner_capacity"] != level:
                problems.append(f"{where}: capacity {c['extra']['planner_capacity']} != water "
                                f"level {level}")
            if c["rows_dropped"] != c["extra"]["drops_at_capacity"]:
                problems.append(f"{where}: dropped {c['rows_dropped']} != rows over the cap "
                                f"{c['extra']['drops_at_capacity']}")
        if c["load_ratio"] > c["ideal"] + 1e-9:
            problems.append(f"{where}: load ratio {c['load_ratio']:.4f} > ideal {c['ideal']:.4f}")
    return problems


def print_table(result: dict[str, Any], console=None, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False, soft_wrap=True, width=200)
    setup = result["setup"]
    table = Table(title=title or (
        f"MoE layer A/B: T={setup['tokens']} E={setup['experts']} top-{setup['top_k']} "
        f"EP{setup['ep_size']} H={setup['hidden']} I={setup['intermediate']} {setup['dtype']}, "
        f"{setup['threads']} thread(s), {setup['reps']} reps, load {result['load_average']}"))
    for col in ("skew (max/mean)", "r", "policy", "budget", "dropped", "load ratio",
                "ideal", "time ratio", "achieved", "gain frac", "rel err"):
        table.add_column(col, justify="right")
    for c in result["cells"]:
        fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)
        table.add_row(
            f"{c['skew']} ({c['skew_achieved']:.2f})", f"{c['ratio']:g}", c["policy"],
            str(c["budget"]), str(c["rows_dropped"]), fmt(c["load_ratio"]), fmt(c["ideal"]),
            fmt(c["time_ratio"]), fmt(c["achieved_fraction"]), fmt(c["gain_fraction"], "{:.2f}"),
            fmt(c["rel_error"], "{:.4f}"))
    console.print(table)


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's item-1 targets, evaluated on the cells."""
    cells = result["cells"]
    frac = [c for c in cells if c["policy"] == "probs" and c["ratio"] >= 0.02
            and c["skew_target"] > 1.0 and c["achieved_fraction"] is not None]
    frac_fail = [f"{c['skew']} r={c['ratio']:g}: {c['achieved_fraction']:.3f}"
                 for c in frac if c["achieved_fraction"] < 0.9]
    err = {}
    for c in cells:
        if c["ratio"] > 0:
            err.setdefault((c["skew"], c["ratio"]), {})[c["policy"]] = c["rel_error"]
    err_fail = [f"{s} r={r:g}: probs {v['probs']:.4f} vs position {v['position']:.4f}"
                for (s, r), v in err.items() if "probs" in v and "position" in v
                and v["probs"] > 0.5 * v["position"]]
    return {
        "achieved_fraction_ge_0.9_for_r_ge_0.02_skewed": {
            "met": bool(frac) and not frac_fail, "cells": len(frac), "failures": frac_fail},
        "probs_error_le_half_position": {"met": not err_fail, "cells": len(err),
                                         "failures": err_fail},
    }


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """The speed-up and error charts; None without matplotlib (an optional extra)."""
    from ascend_patch.ab.output import pyplot

    plt = pyplot()
    if plt is None:
        return None
    cells = result["cells"]
    skews = list(dict.fromkeys(c["skew"] for c in cells))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, skew in enumerate(skews):
        color = f"C{i}"
        probs = [c for c in cells if c["skew"] == skew and c["policy"] == "probs"]
        r = [c["ratio"] for c in probs]
        ax1.plot(r, [c["ideal"] for c in probs], "--", color=color, label=f"{skew} ideal")
        if probs and probs[0]["time_ratio"] is not None:
            ax1.plot(r, [c["time_ratio"] for c in probs], "o-", color=color,
                     label=f"{skew} measured (probs)")
        seed = [c for c in cells if c["skew"] == skew and c["policy"] == "seed"]
        if seed and seed[0]["time_ratio"] is not None:
            ax1.plot([c["ratio"] for c in seed], [c["time_ratio"] for c in seed], "x:",
                     color=color, label=f"{skew} measured (seed fixed cap)")
    ax1.set_xlabel("drop_token_ratio r")
    ax1.set_ylabel("bottleneck-rank speed-up vs r=0")
    ax1.legend(fontsize=7)
    ax1.set_title("bottleneck rank: measured vs analytic")
    skew = skews[-1]
    for j, policy in enumerate(dict.fromkeys(c["policy"] for c in cells)):
        pts = [c for c in cells if c["skew"] == skew and c["policy"] == policy]
        ax2.plot([c["ratio"] for c in pts], [c["rel_error"] for c in pts], "o-", color=f"C{j}",
                 label=policy)
    ax2.set_xlabel("drop_token_ratio r")
    ax2.set_ylabel("||y_r - y_0|| / ||y_0||")
    ax2.set_title(f"routed-expert output error ({skew})")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_skews(items: Sequence[str]) -> list[float | str]:
    """--skews: names of routing_sim's skews or max/mean loads; ValueError says which is wrong."""
    from ascend_patch.lab.routing_sim import SKEWS

    skews: list[float | str] = []
    for item in items:
        if item in SKEWS:
            skews.append(item)
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(
                f"{item!r} is neither a number nor one of {', '.join(SKEWS)}") from None
        if not (math.isfinite(value) and value >= 1.0):
            raise ValueError(f"{item!r}: a max/mean load is a number >= 1")
        skews.append(value)
    return skews


def parse_policies(items: Sequence[str]) -> list[str]:
    unknown = [p for p in items if p not in POLICIES]
    if unknown or not items:
        raise ValueError(f"{', '.join(map(repr, unknown))}: policies are {', '.join(POLICIES)}")
    return list(items)


def args_problem(args) -> str | None:
    """What is wrong with `ascend-patch ab --layer`'s arguments (the parser only split the
    lists: their vocabulary is this module's and routing_sim's, which import torch)."""
    from ascend_patch.lab.routing_sim import NUM_GROUPS, TOPK_GROUPS

    try:
        skews = parse_skews(args.skews)
    except ValueError as exc:
        return f"argument --skews: {exc}"
    try:
        parse_policies(args.policies)
    except ValueError as exc:
        return f"argument --policies: {exc}"
    if args.experts % args.ep_size:
        return (f"argument --experts: {args.experts} experts do not split evenly over "
                f"--ep-size {args.ep_size}")
    groups = NUM_GROUPS if args.experts % NUM_GROUPS == 0 else 1
    reachable = min(TOPK_GROUPS, groups) * (args.experts // groups)
    if args.top_k > reachable:
        return (f"argument --top-k: {args.top_k} is more than the {reachable} experts the "
                f"grouped router can choose among {args.experts}")
    for skew in skews:
        if not isinstance(skew, str) and skew > args.ep_size:
            return (f"argument --skews: {skew:g} is above {args.ep_size}, the largest "
                    f"max/mean load over --ep-size {args.ep_size} ranks")
    return None


def setup_from_args(args) -> LayerSetup:
    """The study `ascend-patch ab --layer` asked for, its arguments checked by args_problem."""
    return LayerSetup(
        tokens=args.tokens, experts=args.experts, top_k=args.top_k, ep_size=args.ep_size,
        hidden=args.hidden, intermediate=args.intermediate, dtype=args.dtype, seed=args.seed,
        reps=args.reps, threads=args.threads, keep_top1=not args.no_keep_top1,
        skews=parse_skews(args.skews), ratios=args.ratios, policies=parse_policies(args.policies),
        time_ranks=not args.no_timing)


def run_layer_ab(args) -> int:
    from rich.console import Console

    from ascend_patch.ab.output import plot_skipped_line

    console = Console(highlight=False, soft_wrap=True, width=200)
    setup = setup_from_args(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = layer_ab(setup, progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    except ValueError as exc:  # a skew the simulated router cannot reach
        console.print(f"ascend-patch ab --layer: error: argument --skews: {exc}", markup=False)
        return 2
    result["checks"] = check_cells(result, setup.keep_top1)
    result["targets"] = targets(result)
    print_table(result, console)
    json_path = out_dir / "ab-layer.json"
    json_path.write_text(json.dumps(result, indent=2))
    png = plot(result, out_dir / "ab-layer.png")
    for name, t in result["targets"].items():
        console.print(f"target {name}: {'met' if t['met'] else 'NOT met'} "
                      f"({t['cells']} cells){'; ' + '; '.join(t['failures']) if t['failures'] else ''}")
    if result["checks"]:
        console.print("honesty checks FAILED:\n  " + "\n  ".join(result["checks"]))
    console.print(f"wrote {json_path}" + (f" and {png}" if png else ""), markup=False)
    if png is None:
        console.print(plot_skipped_line("ab-layer.png"), markup=False)
    return 1 if result["checks"] else 0

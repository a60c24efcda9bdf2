"""Issue #22 item 3: the drop step's time per MoE call, beside the experts' compute.

    flock /tmp/heavy.lock .venvs/vllm-0.32/bin/python scripts/bench_planner.py \
        [--reps 9] [--threads 1] [--baseline 8addf18] [--out bench-results] [--json]

One process, two scales: the seed's prefill (28,672 tokens x top-8, 256 experts, EP16
simulated) and a decode batch (64 tokens), DeepSeek-V3-shaped routing at R1-level skew
(lab/routing_sim.py), drop_token_ratio 0.1, min_tokens 0 (so the decode batch plans its
drops too; "decode*" is the decode batch at the default min_tokens 256, which drops
nothing), the product's other defaults. For each scale:

* the drop step (DropStep: plan, counters, output) of this tree and of the planner at
  `--baseline` (the commit before the device-side planner; its capacity.py, drop_step.py and
  telemetry/stats.py loaded from git), interleaved, medians of `--reps`; both produce the
  same output (checked);
* the ops per call that would synchronise an accelerator (lab/sync_count.py), per op name;
* the experts' compute on the bottleneck EP rank (the torch backend, `moe_forward`, on the
  rows that rank receives at r = 0 and at the ratio: lab/layer.py's `rank_problem`, at the
  layer benchmark's H 1024, I 256, bf16; vLLM's CPU fused MoE needs AVX-512 and is not
  used) and the drop step's time as a share of it.

Threads default to 1 (the machine is shared; figures at 1 thread are stable).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from ascend_patch.impls.moe.drop_step import DropStep
from ascend_patch.impls.moe.options import CapacityOptions
from ascend_patch.impls.moe.telemetry.stats import CapacityStats
from ascend_patch.lab.layer import (
    LayerSetup,
    interleaved_medians,
    machine_info,
    make_layer,
    rank_problem,
    save_result,
)
from ascend_patch.lab.routing_sim import deepseek_routing, rank_loads
from ascend_patch.lab.sync_count import SyncCounter

ROOT = Path(__file__).resolve().parent.parent
EXPERTS, TOP_K, EP_SIZE = 256, 8, 16
# What the baseline's modules import from the tree under their own name.
_BASELINE_MODULES = {
    "ascend_patch/impls/moe/planner/capacity.py": "ascend_patch.impls.moe.planner.capacity",
    "ascend_patch/impls/moe/telemetry/stats.py": "ascend_patch.impls.moe.telemetry.stats",
    "ascend_patch/impls/moe/drop_step.py": "ascend_patch.impls.moe.drop_step",
}


def baseline_modules(rev: str) -> dict[str, types.ModuleType]:
    """The planner, counters and drop step at `rev`, as modules named `_baseline_*`
    (imports between them rewritten to each other; everything else from this tree)."""
    renamed = {name: "_baseline_" + name.rsplit(".", 1)[1] for name in _BASELINE_MODULES.values()}
    modules = {}
    for path, name in _BASELINE_MODULES.items():
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        for original, new in renamed.items():
            text = text.replace(f"from {original} import", f"from {new} import")
        module = types.ModuleType(renamed[name])
        sys.modules[module.__name__] = module  # dataclasses look their module up
        # Our own git history, not outside input.
        exec(compile(text, f"{rev}:{path}", "exec"), module.__dict__)  # noqa: S102
        modules[name.rsplit(".", 1)[1]] = module
    return modules


def make_steps(options: CapacityOptions, baseline: dict[str, types.ModuleType] | None):
    """{"this": step, "baseline": step}: each with its own counters, as in the product."""
    steps = {}
    stats = CapacityStats({}, log_interval=0)
    steps["this"] = DropStep(num_experts=EXPERTS, ep_size=1, options=options,
                             on_plan=lambda plan: stats.record("L", plan))
    if baseline is not None:
        old_stats = baseline["stats"].CapacityStats({}, log_interval=0)
        steps["baseline"] = baseline["drop_step"].DropStep(
            num_experts=EXPERTS, ep_size=1, options=options,
            on_plan=lambda plan: old_stats.record("L", plan))
    return steps


def sync_counts(step, weights, ids) -> dict[str, object]:
    with SyncCounter() as counter:
        step(weights, ids)
    return {"syncs": len(counter.syncs), "by_op": dict(collections.Counter(counter.syncs)),
            "aten_ops": counter.ops}


def measure_scale(name: str, tokens: int, args, baseline, layer,
                  min_tokens: int = 0) -> dict[str, object]:
    routing = deepseek_routing(tokens, "r1", ep_size=EP_SIZE, seed=args.seed)
    weights, ids = routing.topk_weights, routing.topk_ids
    options = CapacityOptions(drop_token_ratio=args.ratio, simulate_ep_size=EP_SIZE,
                              min_tokens=min_tokens)
    steps = make_steps(options, baseline)
    outputs = {label: step(weights, ids) for label, step in steps.items()}
    if "baseline" in outputs:
        same = all(torch.equal(a, b) for a, b in zip(outputs["this"], outputs["baseline"],
                                                      strict=True))
        if not same:
            raise SystemExit(f"{name}: this tree's drop step differs from the baseline's")
    syncs = {label: sync_counts(step, weights, ids) for label, step in steps.items()}
    reps = args.reps if tokens > 1024 else args.reps * 10
    timed = interleaved_medians({label: (lambda s=step: s(weights, ids))
                                 for label, step in steps.items()}, reps)

    # The experts on the bottleneck rank: at r = 0 (all its rows) and after the drop step.
    x, w13, w2 = layer
    x = x[:tokens] if x.shape[0] >= tokens else x.repeat(-(-tokens // x.shape[0]), 1)[:tokens]
    per_rank = EXPERTS // EP_SIZE
    hot = int(rank_loads(ids, EXPERTS, EP_SIZE).argmax())
    plan = steps["this"].plan(weights, ids)
    after = plan.bin_load_after
    hot_after = int(torch.argmax(after))
    all_rows = torch.ones_like(ids, dtype=torch.bool)
    full, rows_full = rank_problem(x, w13, w2, weights, ids, all_rows, hot, per_rank)
    kept, rows_kept = rank_problem(x, w13, w2, plan.weights, ids, plan.keep, hot_after,
                                   per_rank)
    experts = interleaved_medians({"r0": full, "ratio": kept}, max(3, args.reps // 3))
    step_s = timed["this"]["median_s"]
    result = {
        "scale": name, "tokens": tokens, "rows": tokens * TOP_K, "min_tokens": min_tokens,
        "skew_max_over_mean": routing.max_over_mean,
        "rows_dropped": plan.dropped_rows, "budget": plan.budget, "capacity": plan.capacity,
        "step": {label: {**t, "median_ms": t["median_s"] * 1e3} for label, t in timed.items()},
        "syncs_per_call": syncs,
        "experts_bottleneck_rank": {
            "backend": "torch (ascend_patch moe_forward)",
            "rows_r0": rows_full, "rows_after": rows_kept,
            "median_ms_r0": experts["r0"]["median_s"] * 1e3,
            "median_ms_after": experts["ratio"]["median_s"] * 1e3},
        "step_over_experts_r0": step_s / experts["r0"]["median_s"],
        "step_over_experts_after": step_s / experts["ratio"]["median_s"],
    }
    if "baseline" in timed:
        result["this_over_baseline"] = step_s / timed["baseline"]["median_s"]
    return result


def isa() -> dict[str, object]:
    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")
    except OSError:
        pass
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"model": model, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512f": " avx512f" in flags, "amx": " amx_tile" in flags}


def print_table(result: dict[str, object]) -> None:
    cpu = result["cpu"]
    print(f"CPU: {cpu['model']} ({cpu['torch_capability']}), {result['threads']} thread(s); "
          f"baseline {result['baseline'] or 'none'}")
    print(f"{'scale':<8} {'tokens':>6} {'step ms':>9} {'base ms':>9} {'this/base':>9} "
          f"{'syncs base->this':>17} {'experts ms r0/after':>20} {'step/experts':>12}")
    for row in result["scales"]:
        base = row["step"].get("baseline")
        syncs = row["syncs_per_call"]
        experts = row["experts_bottleneck_rank"]
        print(f"{row['scale']:<8} {row['tokens']:>6} {row['step']['this']['median_ms']:>9.2f} "
              f"{base['median_ms'] if base else float('nan'):>9.2f} "
              f"{row.get('this_over_baseline', float('nan')):>9.3f} "
              f"{syncs.get('baseline', {}).get('syncs', '-')!s:>8} -> "
              f"{syncs['this']['syncs']!s:<6} "
              f"{experts['median_ms_r0']:>9.1f} / {experts['median_ms_after']:<8.1f} "
              f"{row['step_over_experts_after']:>12.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=28_672, help="prefill tokens")
    parser.add_argument("--decode", type=int, default=64, help="decode batch tokens")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=9,
                        help="repeats at the prefill scale (x10 at the decode batch)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", default="8addf18",
                        help="git revision whose planner is the baseline ('' for none)")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = None
    if args.baseline:
        try:
            baseline = baseline_modules(args.baseline)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"no baseline: git show {args.baseline} failed ({exc}); this tree only")
            args.baseline = ""
    setup = LayerSetup(tokens=max(args.tokens, args.decode), experts=EXPERTS, seed=args.seed)
    layer = make_layer(setup)
    result = {
        "setup": {"experts": EXPERTS, "top_k": TOP_K, "ep_size": EP_SIZE, "ratio": args.ratio,
                  "skew": "r1", "hidden": setup.hidden, "intermediate": setup.intermediate,
                  "dtype": setup.dtype, "reps": args.reps},
        "threads": args.threads, "baseline": args.baseline, "cpu": isa(),
        "scales": [measure_scale("prefill", args.tokens, args, baseline, layer),
                   measure_scale("decode", args.decode, args, baseline, layer),
                   # The product's default min_tokens (256): a decode batch drops nothing.
                   measure_scale("decode*", args.decode, args, baseline, layer,
                                 min_tokens=CapacityOptions().min_tokens)],
        "machine": machine_info(),
    }
    print_table(result)
    save_result(result, args.out, "planner.json")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Issue item 2: our torch backend against vLLM's own CPU fused MoE, same weights and routing.

    .venvs/vllm-0.32/bin/python scripts/bench_vs_native.py [--tokens 4096] [--reps 7] [--threads 1]

Native = `vllm._custom_ops.cpu_fused_moe` on weights prepacked by `cpu_prepack_moe_weight`
(isa "amx" where the CPU has AMX, else "vec"), exactly what CPUUnquantizedExperts
(vllm/model_executor/layers/fused_moe/experts/cpu_moe.py) does. Ours =
`ascend_patch.impls.moe.experts.torch_backend.moe_forward` on the standard
[E, 2I, H] / [E, H, I] weights.

1. whole layer, r = 0 (all rows, no EP): time ratio ours/native and max |diff|;
2. whole layer under R1-level skew at r = 0.05 and 0.1 (ours skips the dropped rows; native
   computes all of them: it has no dropping);
3. the bottleneck rank of a simulated EP16 under R1-level skew: native on every row that rank
   receives (it cannot drop) against ours at r = 0, 0.05 and 0.1. The native kernel ignores
   expert_map, so the rank's rows are given to it as one row per (token, local expert) with
   top-1 routing on the rank's 16 experts, and its outputs are summed per token (index_add_,
   timed); ours runs moe_forward with expert_map and keep on the received tokens.

Every ratio is medians of interleaved repetitions in one process; threads default to 1 (the
machine is shared: two OpenMP threads stall whenever another process takes a core).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from ascend_patch.lab.layer import (
    LayerSetup,
    interleaved_medians,
    machine_info,
    make_layer,
    rank_problem,
    relative_error,
    save_result,
)


def native_isa() -> str:
    return "amx" if torch.cpu._is_amx_tile_supported() else "vec"


def cpu_ops_module():
    """Where the line keeps the CPU MoE wrappers: vllm._cpu_ops from 0.34 on (cpu_fused_moe
    and cpu_prepack_moe_weight left vllm._custom_ops there), vllm._custom_ops before."""
    import importlib
    import importlib.util

    name = "vllm._cpu_ops" if importlib.util.find_spec("vllm._cpu_ops") else "vllm._custom_ops"
    return importlib.import_module(name)


def native_moe(x, w13, w2, isa):
    """(callable(topk_weights, topk_ids) -> out) on prepacked copies of the weights."""
    ops = cpu_ops_module()

    p13 = ops.cpu_prepack_moe_weight(w13, isa)
    p2 = ops.cpu_prepack_moe_weight(w2, isa)

    def run(xx, weights, ids):
        out = torch.empty_like(xx)
        # The registered op, not its Python wrapper: the op's arguments are the same on the
        # 0.23 and 0.32 lines, the wrapper's are not (0.23 allocates and returns the output).
        torch.ops._C.cpu_fused_moe(out, xx, p13, p2, None, None, weights, ids.to(torch.int32),
                                   False, "silu", isa)
        return out

    return run


def native_rank(x, w13, w2, weights, ids, rank, experts_per_rank, isa):
    """Native kernel on every row EP rank `rank` receives, as top-1 rows + per-token sum."""
    local_rows = torch.div(ids, experts_per_rank, rounding_mode="floor") == rank
    token, slot = torch.nonzero(local_rows, as_tuple=True)
    local = slice(rank * experts_per_rank, (rank + 1) * experts_per_rank)
    kernel = native_moe(x, w13[local].contiguous(), w2[local].contiguous(), isa)
    row_ids = (ids[token, slot] - rank * experts_per_rank).unsqueeze(1).to(torch.int32)
    row_w = weights[token, slot].unsqueeze(1).float().contiguous()
    tokens_recv, inverse = torch.unique(token, return_inverse=True)
    x_recv = x[tokens_recv].contiguous()

    def run():
        rows = kernel(x_recv.index_select(0, inverse), row_w, row_ids)
        out = torch.zeros(tokens_recv.numel(), x.shape[1], dtype=torch.float32)
        out.index_add_(0, inverse, rows.float())
        return out.to(x.dtype)

    return run, int(token.numel()), tokens_recv


def bench(tokens=4096, hidden=1024, intermediate=256, reps=7, threads=1, seed=0,
          ratios=(0.05, 0.1), skew="r1", ep_size=16) -> dict:
    from ascend_patch.impls.moe.experts.torch_backend import moe_forward
    from ascend_patch.impls.moe.options import CapacityOptions
    from ascend_patch.impls.moe.planner.capacity import plan_drops
    from ascend_patch.lab.routing_sim import deepseek_routing, rank_loads

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        setup = LayerSetup(tokens=tokens, hidden=hidden, intermediate=intermediate, seed=seed)
        x, w13, w2 = make_layer(setup)
        isa = native_isa()
        native = native_moe(x, w13, w2, isa)
        result = {"setup": {"tokens": tokens, "experts": 256, "top_k": 8, "hidden": hidden,
                            "intermediate": intermediate, "dtype": "bfloat16", "isa": isa,
                            "threads": threads, "reps": reps, "ep_size": ep_size}}

        # 1. whole layer, r = 0, balanced and skewed routing
        layer = {}
        for name in ("balanced", skew):
            r = deepseek_routing(tokens, name, ep_size=ep_size, seed=seed)
            w, ids = r.topk_weights, r.topk_ids
            y_nat, y_ours = native(x, w, ids), moe_forward(x, w13, w2, w, ids)
            fns = {"native": lambda w=w, ids=ids: native(x, w, ids),
                   "ours": lambda w=w, ids=ids: moe_forward(x, w13, w2, w, ids)}
            plans = {}
            if name == skew:
                for ratio in ratios:
                    plan = plan_drops(w, ids, num_experts=256, ep_size=ep_size, options=CapacityOptions(
                        drop_token_ratio=ratio, min_tokens=0, simulate_ep_size=ep_size))
                    plans[ratio] = plan
                    fns[f"ours r={ratio:g}"] = (lambda p=plan, ids=ids:
                                               moe_forward(x, w13, w2, p.weights, ids, keep=p.keep))
            med = interleaved_medians(fns, reps)
            entry = {
                "skew_achieved": r.max_over_mean,
                "native_s": med["native"]["median_s"], "ours_s": med["ours"]["median_s"],
                "ours_over_native": med["ours"]["median_s"] / med["native"]["median_s"],
                "native_min_s": med["native"]["min_s"], "ours_min_s": med["ours"]["min_s"],
                "ours_over_native_min": med["ours"]["min_s"] / med["native"]["min_s"],
                "max_abs_diff": float((y_nat.float() - y_ours.float()).abs().max()),
                "max_abs_output": float(y_nat.float().abs().max()),
                "rel_diff": relative_error(y_ours, y_nat),
            }
            for ratio in plans:
                t = med[f"ours r={ratio:g}"]["median_s"]
                entry[f"ours_r{ratio:g}_s"] = t
                entry[f"ours_r{ratio:g}_over_native"] = t / med["native"]["median_s"]
            layer[name] = entry
        result["whole_layer"] = layer

        # 3. bottleneck rank under skew
        r = deepseek_routing(tokens, skew, ep_size=ep_size, seed=seed)
        w, ids = r.topk_weights, r.topk_ids
        epr = 256 // ep_size
        load = rank_loads(ids, 256, ep_size)
        hot = int(load.argmax())
        nat_fn, nat_rows, tokens_recv = native_rank(x, w13, w2, w, ids, hot, epr, isa)
        all_rows = torch.ones_like(ids, dtype=torch.bool)
        ours0, rows0 = rank_problem(x, w13, w2, w, ids, all_rows, hot, epr)
        assert rows0 == nat_rows
        fns = {"native": nat_fn, "ours r=0": ours0}
        rank_rows = {"native": nat_rows, "ours r=0": rows0}
        for ratio in ratios:
            plan = plan_drops(w, ids, num_experts=256, ep_size=ep_size, options=CapacityOptions(
                drop_token_ratio=ratio, min_tokens=0, simulate_ep_size=ep_size))
            after = plan.bin_load_after
            at_max = torch.nonzero(after == after.max()).squeeze(1)
            rank_after = int(at_max[torch.argmax(load[at_max])])
            fn, rows = rank_problem(x, w13, w2, plan.weights, ids, plan.keep, rank_after, epr)
            fns[f"ours r={ratio:g}"] = fn
            rank_rows[f"ours r={ratio:g}"] = rows
        # agreement of the two r=0 rank computations
        y_nat_rank = nat_fn().float()
        y_ours_rank = ours0().float()
        med = interleaved_medians(fns, reps)
        base = med["native"]["median_s"]
        result["bottleneck_rank"] = {
            "skew": skew, "skew_achieved": r.max_over_mean, "rank": hot,
            "tokens_received": int(tokens_recv.numel()),
            "max_abs_diff_r0": float((y_nat_rank - y_ours_rank).abs().max()),
            "arms": {name: {"rows": rank_rows[name], "median_s": m["median_s"],
                            "over_native": m["median_s"] / base}
                     for name, m in med.items()},
        }
        result["targets"] = {
            "ours_over_native_le_1.05_at_r0": {
                "met": layer["balanced"]["ours_over_native"] <= 1.05,
                "value": layer["balanced"]["ours_over_native"]},
            "r0.05_r1_skew_faster_than_native_on_bottleneck_rank": {
                "met": result["bottleneck_rank"]["arms"]["ours r=0.05"]["over_native"] < 1.0
                if "ours r=0.05" in result["bottleneck_rank"]["arms"] else None,
                "value": result["bottleneck_rank"]["arms"].get("ours r=0.05", {}).get("over_native")},
        }
        result["machine"] = machine_info()
        return result
    finally:
        torch.set_num_threads(before)


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=200)
    s = result["setup"]
    t = Table(title=f"whole layer: ours (torch backend) vs vLLM cpu_fused_moe ({s['isa']}), "
                    f"T={s['tokens']} E=256 top-8 H={s['hidden']} I={s['intermediate']} bf16, "
                    f"{s['threads']} thread(s), {s['reps']} reps; load {result['machine']['load_average']}")
    for col in ("routing", "native ms", "ours ms", "ours/native", "(mins)", "max|diff|", "max|y|",
                "rel diff", "ours r=0.05 / native", "ours r=0.1 / native"):
        t.add_column(col, justify="right")
    for name, e in result["whole_layer"].items():
        t.add_row(f"{name} ({e['skew_achieved']:.2f})", f"{1e3 * e['native_s']:.1f}",
                  f"{1e3 * e['ours_s']:.1f}", f"{e['ours_over_native']:.3f}",
                  f"{e['ours_over_native_min']:.3f}",
                  f"{e['max_abs_diff']:.4f}", f"{e['max_abs_output']:.3f}", f"{e['rel_diff']:.2e}",
                  f"{e['ours_r0.05_over_native']:.3f}" if "ours_r0.05_over_native" in e else "-",
                  f"{e['ours_r0.1_over_native']:.3f}" if "ours_r0.1_over_native" in e else "-")
    console.print(t)
    b = result["bottleneck_rank"]
    t = Table(title=f"bottleneck rank (EP{s['ep_size']}, {b['skew']} skew {b['skew_achieved']:.2f}, "
                    f"rank {b['rank']}, {b['tokens_received']} tokens received); "
                    f"max|diff| ours vs native at r=0: {b['max_abs_diff_r0']:.4f}")
    for col in ("arm", "rows computed", "median ms", "time / native"):
        t.add_column(col, justify="right")
    for name, a in b["arms"].items():
        t.add_row(name, str(a["rows"]), f"{1e3 * a['median_s']:.2f}", f"{a['over_native']:.3f}")
    console.print(t)
    for name, v in result["targets"].items():
        console.print(f"target {name}: {'met' if v['met'] else 'NOT met'} (value {v['value']:.3f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    result = bench(a.tokens, a.hidden, a.intermediate, a.reps, a.threads, a.seed)
    print_tables(result)
    save_result(result, a.out, "vs_native.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Our CPU experts against vLLM's own CPU fused MoE, same weights and routing, per thread count.

    .venvs/vllm-0.32/bin/python scripts/bench_vs_native.py [--tokens 4096] [--reps 7] \
        [--threads 1,all]

Native = `torch.ops._C.cpu_fused_moe` on weights prepacked by `cpu_prepack_moe_weight` at
vLLM's isa ("amx" where the CPU has AMX tiles, else "vec"), what CPUUnquantizedExperts
(vllm/model_executor/layers/fused_moe/experts/cpu_moe.py) runs, on every row. Ours = what
`moe.capacity` computes with `backend: auto` on vLLM 0.32's CPU backend
(adapters/vllm_cpu_experts.py): the same kernel on the same prepacked weights, handed only
the kept rows of local experts (`experts/vllm_cpu_kernel.moe_forward`; the adapter reaches the
kernel through vLLM's `apply`, which makes this very call).

Per thread count (1, then every CPU this process may use; each in this one process):
1. whole layer, r = 0, balanced and R1-level skewed routing: ours / native time and max |diff|
   (0 expected: at r = 0 ours is one call on the routing as given);
2. whole layer under the skew at r = 0.05 and 0.1 (ours skips the dropped rows; native, which
   cannot drop, computes all of them);
3. the bottleneck rank of a simulated EP16 under the skew: native on every row that rank
   receives against ours at r = 0, 0.05 and 0.1. The native kernel ignores expert_map, so the
   rank's rows are given to it as one row per (token, local expert) with top-1 routing on the
   rank's 16 experts, and its outputs are summed per token (index_add_, timed); ours runs
   with expert_map on the tokens the rank receives.

Every figure is a median of `reps` interleaved repetitions (every other round in reverse
order, so that neither arm always runs after the other); "paired" is the median over rounds
of the two arms' ratio within the round (the targets use it: a load change between rounds
cancels). Each is printed beside the ISA torch found
(and whether the CPU has AVX-512 and AMX) and the native kernel's `isa` argument.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from ascend_patch.lab.experts import cpu_ops_module, native_isa, native_kernel  # noqa: F401
from ascend_patch.lab.layer import (
    LayerSetup,
    interleaved_medians,
    machine_info,
    make_layer,
    relative_error,
    save_result,
)


def cpu_isa() -> dict:
    """What this CPU offers the kernels: torch's dispatch capability, the flags that decide
    vLLM's isa, the model name."""
    flags, model = set(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"torch_capability": torch.backends.cpu.get_cpu_capability(),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx": bool(torch.cpu._is_amx_tile_supported()),
            "native_isa_argument": native_isa(), "cpu_model": model}


def isa_label(isa: dict) -> str:
    extras = [name for name in ("avx512f", "avx512_bf16", "amx") if isa[name]]
    flags = " + " + ", ".join(extras) if extras else ", no AVX-512/AMX"
    return (f"{isa['torch_capability']}{flags}"
            f"; kernel isa={isa['native_isa_argument']}")


def native_rank(x, kernel, weights, ids, rank, experts_per_rank):
    """Native kernel (on the rank's experts) on every row EP rank `rank` receives, as top-1
    rows + per-token sum."""
    local_rows = torch.div(ids, experts_per_rank, rounding_mode="floor") == rank
    token, slot = torch.nonzero(local_rows, as_tuple=True)
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


def ours_rank(x, kernel, weights, ids, keep, rank, experts_per_rank, num_experts):
    """Ours on EP rank `rank`: the tokens with a kept row there, global ids, expert_map."""
    from ascend_patch.impls.moe.experts.vllm_cpu_kernel import moe_forward

    local_rows = (torch.div(ids, experts_per_rank, rounding_mode="floor") == rank) & keep
    tokens = torch.nonzero(local_rows.any(dim=1)).squeeze(1)
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[rank * experts_per_rank:(rank + 1) * experts_per_rank] = torch.arange(
        experts_per_rank, dtype=torch.int32)
    x_recv, w_recv = x[tokens].contiguous(), weights[tokens].contiguous()
    # What the dispatch hands the experts: dropped rows as id -1.
    ids_recv = ids[tokens].masked_fill(~keep[tokens], -1).contiguous()

    def run():
        return moe_forward(kernel, x_recv, w_recv, ids_recv, expert_map=expert_map,
                           num_local_experts=experts_per_rank)

    return run, int(local_rows.sum())


def _plan(weights, ids, ratio, ep_size):
    from ascend_patch.impls.moe.options import CapacityOptions
    from ascend_patch.impls.moe.planner.capacity import plan_drops

    return plan_drops(weights, ids, num_experts=256, ep_size=ep_size, options=CapacityOptions(
        drop_token_ratio=ratio, min_tokens=0, simulate_ep_size=ep_size))


def _whole_layer(x, kernel, routings, plans, reps, torch_weights=None):
    from ascend_patch.impls.moe.experts.vllm_cpu_kernel import moe_forward

    layer = {}
    for name, r in routings.items():
        w, ids = r.topk_weights, r.topk_ids
        fns = {"native": lambda w=w, ids=ids: kernel(x, w, ids),
               "ours": lambda w=w, ids=ids: moe_forward(kernel, x, w, ids, num_local_experts=256)}
        if torch_weights is not None:  # backend: torch (vLLM 0.23's CPU line), r = 0
            from ascend_patch.impls.moe.experts import torch_backend

            fns["torch backend"] = (lambda w=w, ids=ids: torch_backend.moe_forward(
                x, *torch_weights, w, ids))
        for ratio, plan in plans.get(name, {}).items():
            fns[f"ours r={ratio:g}"] = (lambda p=plan, ids=ids: moe_forward(
                kernel, x, p.weights, ids.masked_fill(~p.keep, -1), num_local_experts=256))
        y_nat, y_ours = fns["native"]().float(), fns["ours"]().float()
        med = interleaved_medians(fns, reps, alternate=True)
        base = med["native"]["median_s"]
        entry = {"skew_achieved": r.max_over_mean, "native_s": base,
                 "ours_s": med["ours"]["median_s"],
                 "ours_over_native": med["ours"]["median_s"] / base,
                 "ours_over_native_paired": paired_ratio(med["ours"], med["native"]),
                 "ours_over_native_min": med["ours"]["min_s"] / med["native"]["min_s"],
                 "max_abs_diff": float((y_nat - y_ours).abs().max()),
                 "max_abs_output": float(y_nat.abs().max()),
                 "rel_diff": relative_error(y_ours, y_nat)}
        if "torch backend" in med:
            entry["torch_backend_over_native"] = med["torch backend"]["median_s"] / base
        for ratio in plans.get(name, {}):
            entry[f"ours_r{ratio:g}_s"] = med[f"ours r={ratio:g}"]["median_s"]
            entry[f"ours_r{ratio:g}_over_native"] = med[f"ours r={ratio:g}"]["median_s"] / base
        layer[name] = entry
    return layer


def paired_ratio(arm: dict, baseline: dict) -> float:
    """Median over rounds of arm / baseline within the round: the two ran back to back, so
    a load change between rounds cancels out."""
    import statistics

    return statistics.median(a / b for a, b in zip(arm["samples_s"], baseline["samples_s"]))


def _bottleneck(x, w13, w2, isa, r, plans, ep_size, reps):
    w, ids = r.topk_weights, r.topk_ids
    from ascend_patch.lab.routing_sim import rank_loads

    epr = 256 // ep_size
    load = rank_loads(ids, 256, ep_size)
    hot = int(load.argmax())
    kernels = {}

    def rank_kernel(rank):
        if rank not in kernels:
            local = slice(rank * epr, (rank + 1) * epr)
            kernels[rank] = native_kernel(w13[local].contiguous(), w2[local].contiguous(), isa)
        return kernels[rank]

    nat_fn, nat_rows, tokens_recv = native_rank(x, rank_kernel(hot), w, ids, hot, epr)
    all_rows = torch.ones_like(ids, dtype=torch.bool)
    ours0, rows0 = ours_rank(x, rank_kernel(hot), w, ids, all_rows, hot, epr, 256)
    assert rows0 == nat_rows
    fns = {"native": nat_fn, "ours r=0": ours0}
    rows = {"native": nat_rows, "ours r=0": rows0}
    ranks = {"native": hot, "ours r=0": hot}
    for ratio, plan in plans.items():
        after = plan.bin_load_after
        at_max = torch.nonzero(after == after.max()).squeeze(1)
        rank_after = int(at_max[torch.argmax(load[at_max])])
        name = f"ours r={ratio:g}"
        fns[name], rows[name] = ours_rank(x, rank_kernel(rank_after), plan.weights, ids,
                                          plan.keep, rank_after, epr, 256)
        ranks[name] = rank_after
    max_abs_diff_r0 = float((nat_fn().float() - ours0().float()).abs().max())
    med = interleaved_medians(fns, reps, alternate=True)
    base = med["native"]["median_s"]
    return {"skew_achieved": r.max_over_mean, "rank": hot,
            "tokens_received": int(tokens_recv.numel()), "max_abs_diff_r0": max_abs_diff_r0,
            "arms": {name: {"rows": rows[name], "rank": ranks[name], "median_s": m["median_s"],
                            "over_native": m["median_s"] / base,
                            "over_native_paired": paired_ratio(m, med["native"])}
                     for name, m in med.items()}}


def thread_counts(spec: str) -> list[int]:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = []
    for part in spec.split(","):
        n = available if part.strip() == "all" else int(part)
        if n not in counts:
            counts.append(n)
    return counts


def bench(tokens=4096, hidden=1024, intermediate=256, reps=7, threads=(1,), seed=0,
          ratios=(0.05, 0.1), skew="r1", ep_size=16, torch_backend=False) -> dict:
    from ascend_patch.lab.routing_sim import deepseek_routing

    before = torch.get_num_threads()
    setup = LayerSetup(tokens=tokens, hidden=hidden, intermediate=intermediate, seed=seed)
    x, w13, w2 = make_layer(setup)
    isa = cpu_isa()
    kernel = native_kernel(w13, w2, isa["native_isa_argument"])
    routings = {name: deepseek_routing(tokens, name, ep_size=ep_size, seed=seed)
                for name in ("balanced", skew)}
    r = routings[skew]
    plans = {ratio: _plan(r.topk_weights, r.topk_ids, ratio, ep_size) for ratio in ratios}
    result = {"setup": {"tokens": tokens, "experts": 256, "top_k": 8, "hidden": hidden,
                        "intermediate": intermediate, "dtype": "bfloat16", "reps": reps,
                        "ep_size": ep_size, "skew": skew, "threads": list(threads)},
              "isa": isa, "per_threads": {}}
    try:
        for n in threads:
            torch.set_num_threads(n)
            result["per_threads"][str(n)] = {
                "whole_layer": _whole_layer(x, kernel, routings, {skew: plans}, reps,
                                            (w13, w2) if torch_backend else None),
                "bottleneck_rank": _bottleneck(x, w13, w2, isa["native_isa_argument"], r, plans,
                                               ep_size, reps),
                "isa": isa_label(isa)}
    finally:
        torch.set_num_threads(before)
    result["targets"] = {}
    for n, run in result["per_threads"].items():
        at_r0 = max(e["ours_over_native_paired"] for e in run["whole_layer"].values())
        result["targets"][f"ours_over_native_le_1_at_r0_{n}_threads"] = {
            "met": at_r0 <= 1.0, "value": at_r0}
        arm = run["bottleneck_rank"]["arms"].get("ours r=0.05")
        if arm is not None:
            result["targets"][f"r0.05_faster_than_native_on_bottleneck_rank_{n}_threads"] = {
                "met": arm["over_native_paired"] < 1.0, "value": arm["over_native_paired"]}
    result["machine"] = machine_info()
    return result


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=220)
    s = result["setup"]
    console.print(f"CPU: {result['isa']['cpu_model']}; ISA: {isa_label(result['isa'])}; "
                  f"T={s['tokens']} E=256 top-8 H={s['hidden']} I={s['intermediate']} bf16, "
                  f"{s['reps']} reps; load {result['machine']['load_average']}")
    for n, run in result["per_threads"].items():
        t = Table(title=f"whole layer, {n} thread(s): ours (backend auto = vLLM's kernel on "
                        f"kept rows) vs vLLM cpu_fused_moe on every row")
        for col in ("ISA", "routing", "native ms", "ours ms", "ours/native r=0", "(paired)",
                    "(mins)",
                    "max|diff|", "ours r=0.05 / native", "ours r=0.1 / native",
                    "torch backend r=0 / native"):
            t.add_column(col, justify="right")
        for name, e in run["whole_layer"].items():
            t.add_row(run["isa"], f"{name} ({e['skew_achieved']:.2f})",
                      f"{1e3 * e['native_s']:.1f}", f"{1e3 * e['ours_s']:.1f}",
                      f"{e['ours_over_native']:.3f}", f"{e['ours_over_native_paired']:.3f}",
                      f"{e['ours_over_native_min']:.3f}",
                      f"{e['max_abs_diff']:.4f}",
                      f"{e['ours_r0.05_over_native']:.3f}"
                      if "ours_r0.05_over_native" in e else "-",
                      f"{e['ours_r0.1_over_native']:.3f}" if "ours_r0.1_over_native" in e else "-",
                      f"{e['torch_backend_over_native']:.3f}"
                      if "torch_backend_over_native" in e else "-")
        console.print(t)
        b = run["bottleneck_rank"]
        t = Table(title=f"bottleneck rank, {n} thread(s) (EP{s['ep_size']}, {s['skew']} skew "
                        f"{b['skew_achieved']:.2f}, rank {b['rank']}, {b['tokens_received']} "
                        f"tokens received); max|diff| ours vs native at r=0: "
                        f"{b['max_abs_diff_r0']:.4f}")
        for col in ("ISA", "arm", "rank", "rows computed", "median ms", "time / native",
                    "(paired)"):
            t.add_column(col, justify="right")
        for name, a in b["arms"].items():
            t.add_row(run["isa"], name, str(a["rank"]), str(a["rows"]),
                      f"{1e3 * a['median_s']:.2f}", f"{a['over_native']:.3f}",
                      f"{a['over_native_paired']:.3f}")
        console.print(t)
    for name, v in result["targets"].items():
        console.print(f"target {name}: {'met' if v['met'] else 'NOT met'} (value {v['value']:.3f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", default="1,all",
                   help="comma-separated thread counts, 'all' = every CPU of this process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-backend", action="store_true",
                   help="also time backend: torch at r = 0 (what vLLM 0.23's CPU line runs)")
    p.add_argument("--out", default="bench-results")
    a = p.parse_args(argv)
    result = bench(a.tokens, a.hidden, a.intermediate, a.reps, thread_counts(a.threads), a.seed,
                   torch_backend=a.torch_backend)
    print_tables(result)
    save_result(result, a.out, "vs_native.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

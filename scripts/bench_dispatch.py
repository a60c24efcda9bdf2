"""Issue item 3: expert-parallel dispatch across 2 gloo processes under skewed routing.

    .venvs/vllm-0.32/bin/python scripts/bench_dispatch.py [--tokens 2048] [--skew 1.5] [--reps 21]

Two CPU processes (gloo, one torch thread each) form an EP2 group; each holds half of the
tokens and half of the 256 experts (DeepSeek-V3 routing shape from routing_sim, calibrated
to the given per-rank max/mean at EP2, where 2.0 is the most possible). Per step, timed from
a barrier to the end of the combine, the slowest rank's time (max over ranks):

* a2a:       the product's dispatch, `ascend_patch.impls.moe.transport.all_to_all_dispatch.dispatch`
             (token-once: each token's hidden state once per rank owning one of its kept
             rows, plus a 12-byte record per row: f32 weight, i32 expert id, i32 index of
             the hidden row; all_to_all_uneven of bytes), expert compute on the received
             rows (torch backend, expert_map, as CapacityExperts calls it; each (token,
             rank) pair's rows summed in f32), then the product's `combine` (one row per
             pair back with the mirrored splits, f32 sum per token): dropless;
* a2a-drop:  `plan_drops` (granularity rank, ratio r, the EP group's counts all-gathered;
             inside the timed step, as in the product) writes id -1 into the dropped rows,
             then the same dispatch / compute / combine: dropped rows are never sent;
* ag-rs:     vLLM's naive path: all-gather every rank's tokens and routing, each rank computes
             its experts on all tokens, reduce-scatter of the partial outputs.

Reports the step-time ratios against the dropless a2a, the bytes each rank sends to the
other per step (a2a arms: the product's DispatchCounters, dispatch + combine; ag-rs: counted
from the tensor sizes), the rows each rank computes, the output agreement with the dropless
a2a, and, for the a2a arms, the token-once bytes counted from the routing alone (pairs and
rows per destination: an independent check of the counters, which it must equal).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dispatch(tokens=2048, skew=1.5, ratios=(0.05, 0.1), reps=21, hidden=1024,
                 intermediate=256, seed=0, timeout=600.0) -> dict:
    """Launch the 2 worker processes; returns rank 0's JSON result."""
    port = _free_port()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-dispatch-{os.getpid()}-{port}.json"
    procs = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_PATCH_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = ["--tokens", str(tokens), "--skew", str(skew), "--ratios", ",".join(map(str, ratios)),
            "--reps", str(reps), "--hidden", str(hidden), "--intermediate", str(intermediate),
            "--seed", str(seed), "--port", str(port), "--result", str(out)]
    for rank in range(2):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(rank), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    logs = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError("dispatch benchmark timed out")
    if any(p.returncode for p in procs) or not out.exists():
        raise RuntimeError("dispatch workers failed:\n" + "\n".join(l[-3000:] for l in logs))
    result = json.loads(out.read_text())
    out.unlink()
    return result


# ------------------------------------------------------------------ worker side


A2A_NAME = ("ascend_patch.impls.moe.transport.all_to_all_dispatch.dispatch/combine "
            "(all_to_all_uneven, gloo all_to_all_single)")
# Per-row metadata of the token-once dispatch: f32 weight, i32 expert id and i32 index of
# the row's token among the hidden states sent to that rank.
TOKEN_ONCE_ROW_META_BYTES = 12


def token_once_pairs(ids_kept, owners, world: int) -> dict:
    """Per destination rank d: the (token, d) pairs with a kept row on d, and those rows."""
    import torch

    kept = ids_kept >= 0
    dest = torch.where(kept, owners[ids_kept.clamp(min=0).long()],
                       torch.full_like(ids_kept, -1, dtype=torch.long))
    return {"pairs_to": [int((dest == d).any(dim=1).sum()) for d in range(world)],
            "rows_to": [int((dest == d).sum()) for d in range(world)]}


def token_once_model(per_rank: list[dict], hidden_bytes: int) -> list[dict]:
    """Bytes each rank sends to the other ranks with the token-once format (a token's hidden
    state once per destination rank, its kept rows there as 12-byte records, one summed
    hidden row per (token, rank) back), counted from the routing alone, the way
    DispatchCounters counts (dispatch of this rank's tokens + combine of received ones)."""
    out = []
    for r, mine in enumerate(per_rank):
        others = [d for d in range(len(per_rank)) if d != r]
        pairs = sum(mine["pairs_to"][d] for d in others)
        rows = sum(mine["rows_to"][d] for d in others)
        pairs_in = sum(per_rank[s]["pairs_to"][r] for s in others)
        dispatch_b = pairs * hidden_bytes + rows * TOKEN_ONCE_ROW_META_BYTES
        combine_b = pairs_in * hidden_bytes
        out.append({"token_rank_pairs_remote": pairs, "rows_remote": rows,
                    "dispatch_bytes": dispatch_b, "combine_bytes": combine_b,
                    "bytes": dispatch_b + combine_b})
    return out


def worker(rank: int, a) -> None:
    import statistics

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = 2
    from ascend_patch.impls.moe.experts.torch_backend import moe_forward
    from ascend_patch.impls.moe.options import CapacityOptions
    from ascend_patch.impls.moe.planner.capacity import plan_drops
    from ascend_patch.impls.moe.transport.all_to_all_dispatch import (
        DispatchCounters,
        combine,
        dispatch,
        expert_owners,
    )
    from ascend_patch.lab.layer import LayerSetup, make_layer
    from ascend_patch.lab.routing_sim import calibrate_skew, rank_loads

    experts = 256
    epr = experts // world
    setup = LayerSetup(tokens=a.tokens, hidden=a.hidden, intermediate=a.intermediate, seed=a.seed)
    x_all, w13, w2 = make_layer(setup)  # same seed on both ranks: same weights and tokens
    routing = calibrate_skew(a.tokens, a.skew, ep_size=world, seed=a.seed)
    w_all, ids_all = routing.topk_weights, routing.topk_ids
    local_tokens = slice(rank * a.tokens // world, (rank + 1) * a.tokens // world)
    x, w, ids = x_all[local_tokens].contiguous(), w_all[local_tokens].contiguous(), ids_all[local_tokens].contiguous()
    owners = expert_owners(experts, world)  # linear: rank r holds [r*E/R, (r+1)*E/R)
    local = (owners == rank).nonzero().squeeze(1)
    assert local.tolist() == list(range(rank * epr, (rank + 1) * epr))
    w13_l, w2_l = w13[local].contiguous(), w2[local].contiguous()
    expert_map = torch.full((experts,), -1, dtype=torch.long)
    expert_map[local] = torch.arange(epr)
    hidden = a.hidden
    element = x.element_size()

    def gather_counts(counts):
        out = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(out, counts)
        return torch.stack(out)

    def a2a_step(weights, ids_kept, stats):
        """The product's path: dispatch -> experts on the received rows -> combine."""
        counters = DispatchCounters()
        t0 = time.perf_counter()
        recv_x, recv_w, recv_ids, state = dispatch(x, weights, ids_kept, group=None,
                                                   owners=owners, counters=counters)
        t1 = time.perf_counter()
        # As CapacityExperts (custom_ops.experts_impl) runs the received rows.
        keep = recv_ids >= 0
        y = moe_forward(recv_x, w13_l, w2_l, recv_w, recv_ids.clamp(min=0), keep,
                        expert_map)
        t2 = time.perf_counter()
        out = torch.empty_like(x)
        combine(y, state, group=None, output=out, counters=counters)
        t3 = time.perf_counter()
        c = counters.as_dict()
        stats["bytes_sent"] = c["bytes_sent_remote"]
        stats["counters"] = c
        stats["rows_computed"] = int(keep.sum())
        stats.setdefault("dispatch_s", []).append(t1 - t0)
        stats.setdefault("compute_s", []).append(t2 - t1)
        stats.setdefault("combine_s", []).append(t3 - t2)
        if "token_once" not in stats:  # same rows every rep
            stats["token_once"] = token_once_pairs(ids_kept, owners, world)
        return out

    def a2a_drop_step(ratio, stats):
        t0 = time.perf_counter()
        plan = plan_drops(w, ids, num_experts=experts, ep_size=world, options=CapacityOptions(
            drop_token_ratio=ratio, min_tokens=0), all_gather_counts=gather_counts, rank=rank,
            num_tokens_global=a.tokens)
        # What the glue's planner hands to prepare(): dropped rows as id -1.
        weights = plan.weights.to(w.dtype)
        ids_kept = ids.masked_fill(~plan.keep, -1)
        stats.setdefault("plan_s", []).append(time.perf_counter() - t0)
        stats["rows_dropped_global"] = plan.dropped_rows
        stats["budget"] = plan.budget
        stats["load_after"] = plan.bin_load_after.tolist()
        return a2a_step(weights, ids_kept, stats)

    def ag_rs_step(stats):
        t0 = time.perf_counter()
        xs = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(xs, x)
        meta = torch.cat([ids.float(), w], dim=1)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta)
        x_g = torch.cat(xs)
        meta_g = torch.cat(metas)
        k = ids.shape[1]
        t1 = time.perf_counter()
        y = moe_forward(x_g, w13_l, w2_l, meta_g[:, k:], meta_g[:, :k].long(),
                        expert_map=expert_map)
        t2 = time.perf_counter()
        out = torch.empty_like(x)
        dist.reduce_scatter(out, list(y.chunk(world)))
        t3 = time.perf_counter()
        stats.setdefault("dispatch_s", []).append(t1 - t0)
        stats.setdefault("compute_s", []).append(t2 - t1)
        stats.setdefault("combine_s", []).append(t3 - t2)
        stats["bytes_sent"] = (x.numel() * element + meta.numel() * 4) * (world - 1) + \
            (y.numel() // world) * element * (world - 1)
        stats["rows_computed"] = int((expert_map[meta_g[:, :k].long()] >= 0).sum())
        return out

    arms = {"a2a": lambda s: a2a_step(w, ids, s), "ag-rs": ag_rs_step}
    for ratio in a.ratios:
        arms[f"a2a-drop r={ratio:g}"] = lambda s, r=ratio: a2a_drop_step(r, s)
    stats = {name: {} for name in arms}
    outputs = {name: fn(stats[name]) for name, fn in arms.items()}  # warm-up + outputs
    times = {name: [] for name in arms}
    for _ in range(a.reps):
        for name, fn in arms.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn(stats[name])
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(float(elapsed))
    # agreement with the dropless a2a, gathered to rank 0
    errors = {}
    for name, y in outputs.items():
        d = torch.tensor([float(torch.linalg.vector_norm(y.double() - outputs["a2a"].double())) ** 2,
                          float(torch.linalg.vector_norm(outputs["a2a"].double())) ** 2,
                          float((y.float() - outputs["a2a"].float()).abs().max())], dtype=torch.float64)
        dist.all_reduce(d[:2])
        m = d[2:].clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        errors[name] = {"rel_error": float((d[0] / d[1]).sqrt()) if d[1] > 0 else 0.0,
                        "max_abs_diff": float(m)}
    for st in stats.values():  # per-rank median phase times over the timed reps
        for key in ("plan_s", "dispatch_s", "compute_s", "combine_s"):
            if key in st:
                st[key] = statistics.median(st[key][1:])  # [0] is the warm-up
    per_rank_stats = [None] * world
    dist.all_gather_object(per_rank_stats, stats)
    if rank == 0:
        med = {n: statistics.median(t) for n, t in times.items()}
        base = med["a2a"]

        def per_rank(n, key):
            return [s[n].get(key) for s in per_rank_stats]

        result = {
            "setup": {"tokens": a.tokens, "experts": experts, "top_k": 8, "hidden": hidden,
                      "intermediate": a.intermediate, "world": world, "reps": a.reps,
                      "threads_per_rank": 1, "skew_target": a.skew,
                      "skew_achieved": routing.max_over_mean,
                      "rank_loads": rank_loads(ids_all, experts, world).tolist()},
            "all_to_all": A2A_NAME,
            "reduce_scatter": "torch.distributed.reduce_scatter (gloo)",
            "bytes_source": {"a2a": "DispatchCounters.bytes_sent_remote (dispatch + combine)",
                             "ag-rs": "tensor sizes (all-gather x + routing, reduce-scatter)"},
            "arms": {n: {"median_step_s": med[n], "min_step_s": min(times[n]),
                         "speedup_vs_a2a": base / med[n],
                         "bytes_sent_per_rank": per_rank(n, "bytes_sent"),
                         "rows_computed_per_rank": per_rank(n, "rows_computed"),
                         "plan_s_per_rank": per_rank(n, "plan_s"),
                         "dispatch_s_per_rank": per_rank(n, "dispatch_s"),
                         "compute_s_per_rank": per_rank(n, "compute_s"),
                         "combine_s_per_rank": per_rank(n, "combine_s"),
                         **({"counters_per_rank": per_rank(n, "counters"),
                             "token_once_model_per_rank": token_once_model(
                                 per_rank(n, "token_once"), hidden * element)}
                            if n != "ag-rs" else {}),
                         **{k: v for k, v in per_rank_stats[0][n].items()
                            if k in ("rows_dropped_global", "budget", "load_after")},
                         **errors[n]}
                     for n in arms},
        }
        Path(a.result).write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result["setup"]
    t = Table(title=f"EP2 dispatch, 2 gloo processes x 1 thread: T={s['tokens']} E=256 top-8 "
                    f"H={s['hidden']} I={s['intermediate']} bf16, skew {s['skew_achieved']:.2f} "
                    f"(rank loads {s['rank_loads']}), {s['reps']} reps; a2a arms = the product's "
                    "all_to_all_dispatch.dispatch/combine")
    for col in ("path", "step ms (median)", "speed-up vs a2a", "dispatch ms / rank",
                "compute ms / rank", "combine ms / rank", "hot-rank compute speed-up",
                "MB sent / rank", "MB token-once from routing / rank", "rows computed / rank",
                "rows dropped", "rel err vs a2a"):
        t.add_column(col, justify="right")
    base = result["arms"]["a2a"]
    hot = max(range(len(base["rows_computed_per_rank"])), key=lambda i: base["rows_computed_per_rank"][i])

    def ms(values):
        return " / ".join("-" if v is None else f"{1e3 * v:.1f}" for v in values)

    for name, arm in result["arms"].items():
        comp = arm["compute_s_per_rank"]
        once = arm.get("token_once_model_per_rank")
        t.add_row(name, f"{1e3 * arm['median_step_s']:.1f}", f"{arm['speedup_vs_a2a']:.3f}",
                  ms(arm["dispatch_s_per_rank"]), ms(comp), ms(arm["combine_s_per_rank"]),
                  f"{base['compute_s_per_rank'][hot] / comp[hot]:.3f}",
                  " / ".join(f"{b / 1e6:.2f}" for b in arm["bytes_sent_per_rank"]),
                  "-" if once is None else " / ".join(f"{o['bytes'] / 1e6:.2f}" for o in once),
                  " / ".join(str(r) for r in arm["rows_computed_per_rank"]),
                  str(arm.get("rows_dropped_global", 0)), f"{arm['rel_error']:.4f}")
    t.caption = ("MB sent: a2a arms from the product's DispatchCounters (dispatch + combine, to "
                 "the other rank); ag-rs from tensor sizes. dispatch ms of a2a-drop excludes "
                 "plan_drops (plan_s_per_rank in the JSON); ag-rs: all-gather / reduce-scatter.")
    Console(highlight=False, width=200).print(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens over both ranks")
    p.add_argument("--skew", type=float, default=1.5, help="target rank max/mean at EP2 (<= 2)")
    p.add_argument("--ratios", default="0.05,0.1")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.ratios = [float(r) for r in str(a.ratios).split(",") if r]
    if a.worker is not None:
        worker(a.worker, a)
        return 0
    from ascend_patch.lab.layer import machine_info, save_result

    result = run_dispatch(a.tokens, a.skew, a.ratios, a.reps, a.hidden, a.intermediate, a.seed)
    result["machine"] = machine_info()
    print_table(result)
    save_result(result, a.out, "dispatch.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

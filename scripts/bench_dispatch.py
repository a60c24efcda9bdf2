"""Issue item 3: expert-parallel dispatch across 2 gloo processes under skewed routing.

    .venv/bin/python scripts/bench_dispatch.py [--tokens 2048] [--skew 1.5] [--reps 7]

Two CPU processes (gloo, one torch thread each) form an EP2 group; each holds half of the
tokens and half of the 256 experts (DeepSeek-V3 routing shape from routing_sim, calibrated
to the given per-rank max/mean at EP2, where 2.0 is the most possible). Per step, timed from
a barrier to the end of the combine, the slowest rank's time (max over ranks):

* a2a:       all-to-all dispatch of each token once to every rank holding one of its experts
             (hidden rows + its routing), expert compute (torch backend, expert_map), all-to-all
             of the results back, weighted sum per token: dropless;
* a2a-drop:  the same after `plan_drops` (granularity rank, ratio r, the EP group's counts
             all-gathered) removed rows: a token is sent to a rank only if a kept row is there;
* ag-rs:     vLLM's naive path: all-gather every rank's tokens and routing, each rank computes
             its experts on all tokens, reduce-scatter of the partial outputs.

Reports the step-time ratios against the dropless a2a, the bytes each rank sends per step,
and the output agreement. The all-to-all is `ascend_patch.impls.distributed.all_to_all.
all_to_all_uneven` when it imports and passes a self-check, else torch's
all_to_all_single (the JSON says which).
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


def _a2a_impl():
    """(function, name): the project's all_to_all_uneven if usable, else all_to_all_single."""
    import torch
    import torch.distributed as dist

    try:
        from ascend_patch.impls.distributed.all_to_all import all_to_all_uneven

        # Self-check on a tiny uneven exchange: rank r sends [0, 3 + r) split [1, 2 + r].
        rank = dist.get_rank()
        send = torch.arange(3 + rank, dtype=torch.float32).unsqueeze(1)
        recv, recv_splits = all_to_all_uneven(send, [1, 2 + rank])
        expected = ([1, 1], [0.0, 0.0]) if rank == 0 else ([2, 3], [1.0, 2.0, 0.0, 1.0, 2.0])
        if [int(v) for v in recv_splits] == expected[0] and recv.squeeze(1).tolist() == expected[1]:
            return all_to_all_uneven, "ascend_patch.impls.distributed.all_to_all.all_to_all_uneven"
        print(f"all_to_all_uneven self-check failed on rank {rank}: {recv_splits} "
              f"{recv.squeeze(1).tolist()}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - fall back below, and say why
        print(f"all_to_all_uneven unusable: {type(exc).__name__}: {exc}", file=sys.stderr)

    def fallback(send, send_splits, group=None):
        counts = torch.tensor(send_splits, dtype=torch.int64)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts)
        recv_splits = recv_counts.tolist()
        recv = send.new_empty((sum(recv_splits),) + tuple(send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_splits, list(send_splits))
        return recv, recv_splits

    return fallback, "torch.distributed.all_to_all_single"


def worker(rank: int, a) -> None:
    import statistics

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    world = 2
    from ascend_patch.cli.ab_layer import LayerSetup, make_layer, relative_error
    from ascend_patch.impls.moe.backends.torch_backend import moe_forward
    from ascend_patch.impls.moe.capacity import plan_drops
    from ascend_patch.impls.moe.options import CapacityOptions
    from ascend_patch.impls.moe.routing_sim import calibrate_skew, rank_loads

    a2a, a2a_name = _a2a_impl()
    experts = 256
    epr = experts // world
    setup = LayerSetup(tokens=a.tokens, hidden=a.hidden, intermediate=a.intermediate, seed=a.seed)
    x_all, w13, w2 = make_layer(setup)  # same seed on both ranks: same weights and tokens
    routing = calibrate_skew(a.tokens, a.skew, ep_size=world, seed=a.seed)
    w_all, ids_all = routing.topk_weights, routing.topk_ids
    local_tokens = slice(rank * a.tokens // world, (rank + 1) * a.tokens // world)
    x, w, ids = x_all[local_tokens].contiguous(), w_all[local_tokens].contiguous(), ids_all[local_tokens].contiguous()
    local = slice(rank * epr, (rank + 1) * epr)
    w13_l, w2_l = w13[local].contiguous(), w2[local].contiguous()
    expert_map = torch.full((experts,), -1, dtype=torch.long)
    expert_map[local] = torch.arange(epr)
    hidden = a.hidden
    element = x.element_size()

    def gather_counts(counts):
        out = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(out, counts)
        return torch.stack(out)

    def a2a_step(keep, weights, stats):
        dest = torch.div(ids, epr, rounding_mode="floor")
        send_tok, send_ids, send_w, splits = [], [], [], []
        for d in range(world):
            on_d = (dest == d) & keep
            tok = torch.nonzero(on_d.any(dim=1)).squeeze(1)
            send_tok.append(tok)
            send_ids.append(torch.where(on_d[tok], ids[tok], torch.full_like(ids[tok], -1)))
            send_w.append(torch.where(on_d[tok], weights[tok], torch.zeros_like(weights[tok])))
            splits.append(int(tok.numel()))
        tok_cat = torch.cat(send_tok)
        t0 = time.perf_counter()
        x_recv, recv_splits = a2a(x.index_select(0, tok_cat), splits)
        meta = torch.cat([torch.cat(send_ids).float(), torch.cat(send_w)], dim=1)  # [n, 2k]
        meta_recv, _ = a2a(meta, splits)
        k = ids.shape[1]
        ids_recv = meta_recv[:, :k].long()
        w_recv = meta_recv[:, k:]
        keep_recv = ids_recv >= 0
        t1 = time.perf_counter()
        y = moe_forward(x_recv, w13_l, w2_l, w_recv, ids_recv.clamp(min=0), keep=keep_recv,
                        expert_map=expert_map)
        t2 = time.perf_counter()
        y_back, _ = a2a(y, recv_splits)
        out = torch.zeros(x.shape[0], hidden, dtype=torch.float32)
        out.index_add_(0, tok_cat, y_back.float())
        sent_rows = sum(s for d, s in enumerate(splits) if d != rank)
        back_rows = sum(s for i, s in enumerate(recv_splits) if i != rank)
        stats["bytes_sent"] = (sent_rows * (hidden * element + meta.shape[1] * 4)
                               + back_rows * hidden * element)
        stats["rows_computed"] = int(keep_recv.sum())
        stats.setdefault("compute_s", []).append(t2 - t1)
        stats.setdefault("dispatch_s", []).append(t1 - t0)
        return out.to(x.dtype)

    def a2a_drop_step(ratio, stats):
        plan = plan_drops(w, ids, num_experts=experts, ep_size=world, options=CapacityOptions(
            drop_token_ratio=ratio, min_tokens=0), all_gather_counts=gather_counts, rank=rank,
            num_tokens_global=a.tokens)
        stats["rows_dropped_global"] = plan.dropped_rows
        stats["budget"] = plan.budget
        stats["load_after"] = plan.bin_load_after.tolist()
        return a2a_step(plan.keep, plan.weights, stats)

    def ag_rs_step(stats):
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
        stats.setdefault("compute_s", []).append(time.perf_counter() - t1)
        out = torch.empty_like(x)
        dist.reduce_scatter(out, list(y.chunk(world)))
        stats["bytes_sent"] = (x.numel() * element + meta.numel() * 4) * (world - 1) + \
            (y.numel() // world) * element * (world - 1)
        stats["rows_computed"] = int((expert_map[meta_g[:, :k].long()] >= 0).sum())
        return out

    arms = {"a2a": lambda s: a2a_step(torch.ones_like(ids, dtype=torch.bool), w, s),
            "ag-rs": ag_rs_step}
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
    del relative_error
    for st in stats.values():  # per-rank median compute time over the timed reps
        for key in ("compute_s", "dispatch_s"):
            if key in st:
                st[key] = statistics.median(st[key][1:])  # [0] is the warm-up
    per_rank_stats = [None] * world
    dist.all_gather_object(per_rank_stats, stats)
    if rank == 0:
        med = {n: statistics.median(t) for n, t in times.items()}
        base = med["a2a"]
        result = {
            "setup": {"tokens": a.tokens, "experts": experts, "top_k": 8, "hidden": hidden,
                      "intermediate": a.intermediate, "world": world, "reps": a.reps,
                      "threads_per_rank": 1, "skew_target": a.skew,
                      "skew_achieved": routing.max_over_mean,
                      "rank_loads": rank_loads(ids_all, experts, world).tolist()},
            "all_to_all": a2a_name,
            "reduce_scatter": "torch.distributed.reduce_scatter (gloo)",
            "arms": {n: {"median_step_s": med[n], "min_step_s": min(times[n]),
                         "speedup_vs_a2a": base / med[n],
                         "bytes_sent_per_rank": [s[n].get("bytes_sent") for s in per_rank_stats],
                         "rows_computed_per_rank": [s[n].get("rows_computed") for s in per_rank_stats],
                         "compute_s_per_rank": [s[n].get("compute_s") for s in per_rank_stats],
                         "dispatch_s_per_rank": [s[n].get("dispatch_s") for s in per_rank_stats],
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
                    f"(rank loads {s['rank_loads']}), {s['reps']} reps; a2a = {result['all_to_all']}")
    for col in ("path", "step ms (median)", "speed-up vs a2a", "compute ms / rank",
                "hot-rank compute speed-up", "MB sent / rank", "rows computed / rank",
                "rows dropped", "rel err vs a2a"):
        t.add_column(col, justify="right")
    base = result["arms"]["a2a"]
    hot = max(range(len(base["rows_computed_per_rank"])), key=lambda i: base["rows_computed_per_rank"][i])
    for name, arm in result["arms"].items():
        comp = arm["compute_s_per_rank"]
        t.add_row(name, f"{1e3 * arm['median_step_s']:.1f}", f"{arm['speedup_vs_a2a']:.3f}",
                  " / ".join(f"{1e3 * c:.1f}" for c in comp),
                  f"{base['compute_s_per_rank'][hot] / comp[hot]:.3f}",
                  " / ".join(f"{b / 1e6:.2f}" for b in arm["bytes_sent_per_rank"]),
                  " / ".join(str(r) for r in arm["rows_computed_per_rank"]),
                  str(arm.get("rows_dropped_global", 0)), f"{arm['rel_error']:.4f}")
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
    from ascend_patch.cli.ab_layer import machine_info, write_json

    result = run_dispatch(a.tokens, a.skew, a.ratios, a.reps, a.hidden, a.intermediate, a.seed)
    result["machine"] = machine_info()
    print_table(result)
    path = write_json(Path(a.out) / "dispatch.json", result)
    print(f"machine: {result['machine']['uptime']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

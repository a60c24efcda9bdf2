"""Real torch.distributed gloo groups for tests: one spawned process per rank, bounded in time.

`run_ranks(target, world_size, *args, timeout_s=..., gloo_timeout_s=...)` starts the ranks;
each joins the default gloo group (one torch thread, a free local TCP port) and calls
`target(rank, world_size, send, *args)`, where `send(name, payload)` hands a picklable result
to the parent. The target leaves the group itself (`dist.destroy_process_group()`) when the
ranks are still in step. It must be a top-level function of an importable module: spawn
pickles it by name.

The parent returns `{name: {rank: payload}}` once every rank has returned from its target.
It fails the test with the rank's traceback when a target raises, and with the exit codes
when a rank dies, or has not returned or exited `timeout_s` after the start: a collective
that hangs (a rank skipping it) fails the test instead of blocking the run. Ranks still
alive then are killed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(target, rank, world_size, port, gloo_timeout_s, args, results) -> None:
    def send(name: str, payload: Any) -> None:
        # Plain pickle bytes: through the queue's own pickler torch shares a tensor's storage
        # by file descriptor, which the parent can no longer fetch once this rank has exited
        # ("FileNotFoundError" in resource_sharer, seen under load).
        results.put((rank, name, pickle.dumps(payload)))

    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=gloo_timeout_s),
        )
        target(rank, world_size, send, *args)
        send("done", None)
    except BaseException:  # noqa: BLE001 - any failure goes to the parent, never a hang
        send("error", traceback.format_exc())


def run_ranks(
    target: Callable[..., None],
    world_size: int,
    *args: Any,
    timeout_s: float,
    gloo_timeout_s: float,
) -> dict[str, dict[int, Any]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(target, rank, world_size, port, gloo_timeout_s, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    collected: dict[str, dict[int, Any]] = {}
    done: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        _start_with_one_omp_thread(procs)
        while len(done) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, name, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if any(proc.exitcode not in (None, 0) for proc in procs):
                    break  # a rank died without a word: its peers may wait forever
                continue
            payload = pickle.loads(payload)
            if name == "error":
                pytest.fail(f"rank {rank} failed:\n{payload}")
            if name == "done":
                done.add(rank)
            else:
                collected.setdefault(name, {})[rank] = payload
        missing = [rank for rank in range(world_size) if rank not in done]
        if missing:
            codes = {rank: proc.exitcode for rank, proc in enumerate(procs)}
            pytest.fail(f"ranks {missing} gave no result within {timeout_s}s (exit codes {codes})")
        for proc in procs:
            proc.join(timeout=max(1.0, deadline - time.monotonic()))
        codes = {rank: proc.exitcode for rank, proc in enumerate(procs)}
        assert set(codes.values()) == {0}, f"ranks exited with {codes}"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    return collected


def _start_with_one_omp_thread(procs) -> None:
    """Start the ranks with OMP_NUM_THREADS=1 unless it is set; the parent keeps its own."""
    unset = "OMP_NUM_THREADS" not in os.environ
    if unset:
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for proc in procs:
            proc.start()
    finally:
        if unset:
            del os.environ["OMP_NUM_THREADS"]

"""Beyond one launch: vLLM's own multi-node data parallel, and DP x TP with expert parallel.

Two "nodes" on 127.0.0.1 (vLLM's launcher, as on two hosts): a head with the API server and
DP rank 0 (`--data-parallel-size 2 --data-parallel-size-local 1 --data-parallel-address
--data-parallel-rpc-port`), and a `--headless` launch with DP rank 1
(`--data-parallel-start-rank 1`). Each launch is its own first process: it reads the config
itself, so the digest pinning inside a launch cannot compare the two; the check across the
EP group at model load must.

Slow (several minutes each on the 2-core CI box, more under load): marked `slow`, deselected
by default (pyproject addopts), run with `-m slow`.
"""

from __future__ import annotations

import re
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from ascend_patch.core.config import load_config
from ascend_patch.core.report import read_reports
from ascend_patch.harness.procs import vllm_env
from ascend_patch.harness.server import ManagedServer, ServerError, free_port
from tests.e2e.test_expert_parallel_server import (
    MOE_LAYER,
    ask_concurrently,
    check_answer,
    metric_values,
    running,
    worker_reports,
)
from tests.vllm_harness import patch_in

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "cpu-dp-ep.yaml"
STARTUP_TIMEOUT_S = 420
# A launch whose peer refused the config must be gone by then (no hang).
FAIL_TIMEOUT_S = 420


def launch_env(tmp_path: Path, name: str, cores: str, **extra: str) -> dict[str, str]:
    env = vllm_env(
        workers=1, ASCEND_PATCH_CONFIG=str(CONFIG),
        ASCEND_PATCH_REPORT_DIR=str(tmp_path / f"reports-{name}"),
        ASCEND_PATCH_REPORT_INTERVAL="0", **extra)
    # Two launches on one 2-core host: one core each (on real nodes, each has its own).
    env.update(VLLM_CPU_OMP_THREADS_BIND=cores, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    return env


def two_launches(tiny_model: Path, tmp_path: Path, head_env: dict[str, str],
                 node_env: dict[str, str], *, enforce_eager: bool = True,
                 ) -> tuple[ManagedServer, ManagedServer]:
    common = ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
              "--data-parallel-address", "127.0.0.1",
              "--data-parallel-rpc-port", str(free_port()), "--enable-expert-parallel"]
    head = ManagedServer(tiny_model, args=common, env=head_env, log_path=tmp_path / "head.log",
                         startup_timeout=STARTUP_TIMEOUT_S, enforce_eager=enforce_eager)
    node = ManagedServer(tiny_model, args=[*common, "--data-parallel-start-rank", "1"],
                         env=node_env, log_path=tmp_path / "node.log",
                         enforce_eager=enforce_eager, headless=True)
    return head, node


def test_two_launches_serve_with_the_same_config(tiny_model, tmp_path):
    head, node = two_launches(tiny_model, tmp_path, launch_env(tmp_path, "head", "0"),
                              launch_env(tmp_path, "node", "1"))
    with ExitStack() as stack:
        stack.callback(node.stop)
        node.start()
        began = time.monotonic()
        with running(head):
            ready = time.monotonic() - began
            answers, exposition = ask_concurrently(head)
    for answer in answers:
        check_answer(answer)
    digest = load_config(CONFIG).digest
    stats = {}
    for name, dp_rank, first in (("head", 0, "api_server"), ("node", 1, "headless")):
        # One host here: vLLM counts one node, so no node rank in the names.
        reports, workers = worker_reports(
            tmp_path / f"reports-{name}", {first, f"engine_core-dp{dp_rank}",
                                           f"worker-dp{dp_rank}-tp0-ep{dp_rank}"})
        assert {r["digest"] for r in reports} == {digest}
        (worker,) = workers
        moe = patch_in(worker, "moe-capacity")
        assert moe["status"] == "applied", moe
        s = moe["stats"]
        assert s["dispatch_paths"][MOE_LAYER] == {
            "path": "all_to_all", "why": "all_to_all: DP=2, EP=2"}
        assert s["config_checked_over_ranks"] == 2
        assert s["metrics"][MOE_LAYER]["dp_rank"] == dp_rank
        stats[dp_rank] = s
    # One EP group across the two launches: the same global drops, each launch's rows held
    # back adding up to them.
    assert stats[0]["rows_dropped"] == stats[1]["rows_dropped"] > 0
    assert stats[0]["rows_dropped"] == sum(
        s["all_to_all"]["rows_not_sent_dropped"] for s in stats.values())
    # The head's /metrics holds its own launch's processes (DP rank 0); the headless node has
    # no API server, so its series stay on that node.
    dropped = metric_values(exposition, "ascend_patch_moe_rows_dropped_total")
    assert {dict(k)["dp_rank"]: v for k, v in dropped.items()} == {
        "0": float(stats[0]["all_to_all"]["rows_not_sent_dropped"])}
    print(f"\n[2 launches] ready after {ready:.0f} s; dropped {stats[0]['rows_dropped']} of "
          f"{stats[0]['rows_routed']} rows")


def test_different_drop_ratios_on_two_launches_fail_both_without_a_hang(tiny_model, tmp_path):
    """Eager mode, where vLLM's CPU worker runs no forward at start-up: the ranks compare
    their configs when the first MoE layer's weights are processed, so the head never
    answers /health as healthy (it used to until the first request)."""
    head, node = two_launches(
        tiny_model, tmp_path, launch_env(tmp_path, "head", "0"),
        launch_env(tmp_path, "node", "1",
                   ASCEND_PATCH_OVERRIDE='{moe-capacity: {drop_token_ratio: 0.05}}'),
        enforce_eager=True)
    began = time.monotonic()
    with ExitStack() as stack:
        stack.callback(node.stop)
        stack.callback(head.stop)
        node.start()
        with pytest.raises(ServerError) as refused:
            head.start()  # must fail, within its deadline, not hang
        node_code = node.wait(timeout=max(FAIL_TIMEOUT_S - (time.monotonic() - began), 1))
    took = time.monotonic() - began
    assert "during start-up" in str(refused.value), str(refused.value)[-3000:]
    # The headless node stopped too (vLLM's headless launcher exits 0 once its engines are
    # gone, whatever killed them: the log says why).
    assert node_code is not None, node.log_tail()
    assert took < FAIL_TIMEOUT_S
    message = (
        "ascend_patch config differs across the 2 ranks of this group (this is rank {rank} of "
        "the group): option drop_token_ratio is 0.1 on ranks [0], 0.05 on ranks [1]. Every "
        "rank stops here rather than serve with mixed configs: start every launch with the "
        "same config file, ASCEND_PATCH_OVERRIDE and ASCEND_PATCH_DISABLE")
    for launch, rank in ((head, 0), (node, 1)):
        log = launch.log_path.read_text(errors="replace")
        assert message.format(rank=rank) in log, log[-4000:]
    node_log = node.log_path.read_text(errors="replace")
    assert re.search(r"\[serve\.py:\d+\] Shutting down\.", node_log), node_log[-3000:]
    print(f"\n[2 launches, 0.1 vs 0.05] both failed after {took:.0f} s")


def test_dp2_tp2_expert_parallel_four_workers(tiny_model, tmp_path):
    """DP=2 x TP=2 with EP in one launch: EP group of 4. vLLM runs the MoE sequence-parallel
    here (each DP rank's tokens split over its TP ranks before the MoE): every worker is a
    token source of its own for the plan and the all-to-all."""
    env = vllm_env(workers=4, ASCEND_PATCH_CONFIG=str(CONFIG),
                   ASCEND_PATCH_REPORT_DIR=str(tmp_path / "reports"),
                   ASCEND_PATCH_REPORT_INTERVAL="0")
    # Four workers on two cores: two per core.
    env.update(VLLM_CPU_OMP_THREADS_BIND="0|1|0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    server = ManagedServer(
        tiny_model, args=["--data-parallel-size", "2", "--tensor-parallel-size", "2",
                          "--enable-expert-parallel"],
        env=env, log_path=tmp_path / "server.log", startup_timeout=STARTUP_TIMEOUT_S,
        enforce_eager=True)
    began = time.monotonic()
    with running(server):
        ready = time.monotonic() - began
        answers, exposition = ask_concurrently(server)
    for answer in answers:
        check_answer(answer)
    reports = read_reports(tmp_path / "reports")
    workers = [r for r in reports if r["role"] == "worker"]
    assert sorted(r["label"] for r in workers) == [
        f"worker-dp{dp}-tp{tp}-ep{2 * dp + tp}" for dp in (0, 1) for tp in (0, 1)]
    stats = [patch_in(w, "moe-capacity")["stats"] for w in workers]
    for s in stats:
        assert s["dispatch_paths"][MOE_LAYER] == {
            "path": "all_to_all", "why": "all_to_all: DP=2, EP=4"}
        assert s["config_checked_over_ranks"] == 4
    # Every rank planned the same global drops, held back its own share, and writes its own
    # rows to /metrics (summed per DP rank there).
    assert len({s["rows_dropped"] for s in stats}) == 1 and stats[0]["rows_dropped"] > 0
    assert sum(s["all_to_all"]["rows_not_sent_dropped"] for s in stats) == stats[0]["rows_dropped"]
    assert sorted((s["metrics"][MOE_LAYER]["dp_rank"], s["metrics"][MOE_LAYER]["writes_rows"])
                  for s in stats) == [(0, True), (0, True), (1, True), (1, True)]
    dropped = metric_values(exposition, "ascend_patch_moe_rows_dropped_total")
    held_back = {str(r): float(sum(s["all_to_all"]["rows_not_sent_dropped"] for s in stats
                                   if s["metrics"][MOE_LAYER]["dp_rank"] == r)) for r in (0, 1)}
    assert {dict(k)["dp_rank"]: v for k, v in dropped.items()} == held_back
    print(f"\n[dp2 x tp2 + ep] ready after {ready:.0f} s; dropped {stats[0]['rows_dropped']} "
          f"of {stats[0]['rows_routed']} rows")

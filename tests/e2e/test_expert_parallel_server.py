"""Expert parallelism on CPU through the real OpenAI API server with the shipped configs.

Stock vLLM 0.32 (CPU build) cannot serve either setting: TP=2 + EP segfaults in the CPU
fused-MoE kernel, DP=2 + EP raises NotImplementedError in all_gatherv. Each test starts
`python -m vllm.entrypoints.openai.api_server` (ManagedServer: own process group, bounded
start-up with the log in the error, group killed on exit even when the test fails) with
ASCEND_PATCH_CONFIG and ASCEND_PATCH_REPORT_DIR, sends HTTP completions and checks what every
vLLM process reports. Reports are flushed every `log_interval` (8) MoE calls, and vLLM's
multiprocessing workers exit without running atexit, so the checks use counts that every
flushed report has (drops happen in the prefill, the first calls).
"""

from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from ascend_patch.core.config import load_config
from ascend_patch.core.report import read_reports
from ascend_patch.harness.procs import vllm_env
from ascend_patch.harness.server import ManagedServer, ServerError
from tests.stack import LINE
from tests.vllm_harness import patch_in

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
MOE_LAYER = "model.layers.1.mlp.experts"  # the tiny DeepseekV3's one MoE layer
MAX_TOKENS = 8
# Start-up takes 45-80 s on the idle 2-core box (two workers), up to ~3 minutes under load
# (vLLM 0.23 starts slower); a server that is not up by then is broken, and the test fails
# with its log instead of waiting for pytest's timeout.
STARTUP_TIMEOUT_S = 300
# vLLM's default mode compiles the model in every worker first (Dynamo + inductor's C++).
COMPILED_STARTUP_TIMEOUT_S = 480


def long_prompt(seed: int, words: int = 300) -> str:
    """~300 tokens (one WordLevel token per word): above min_tokens (128) of both configs."""
    return " ".join(f"w{(7 * seed + j) % 500}" for j in range(words))


def serve(tiny_model: Path, tmp_path: Path, config: Path, args: list[str], *,
          enforce_eager: bool, startup_timeout: float = STARTUP_TIMEOUT_S) -> ManagedServer:
    env = vllm_env(
        workers=2,
        ASCEND_PATCH_CONFIG=str(config),
        ASCEND_PATCH_REPORT_DIR=str(tmp_path / "reports"),
        # Cross-rank checks need every rank's report written after the same MoE call: only
        # the log_interval flushes (which DP ranks reach in lockstep), not wall-clock rewrites.
        ASCEND_PATCH_REPORT_INTERVAL="0",
        # Where the first process creates its metrics directory (checked to be gone after).
        TMPDIR=str(tmp_path / "tmp"),
    )
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return ManagedServer(
        tiny_model, args=args, env=env, log_path=tmp_path / "server.log",
        startup_timeout=startup_timeout, enforce_eager=enforce_eager,
    )


@contextmanager
def running(server: ManagedServer):
    """The server as a context manager (its process group is killed on the way out, pass or
    fail). A server that dies or misses the start-up deadline, or answers an HTTP error,
    fails the test with its log."""
    try:
        with server:
            try:
                yield server
            except ServerError as exc:
                pytest.fail(f"{exc}\nlog {server.log_path}:\n{server.log_tail()}", pytrace=False)
    except ServerError as exc:  # from start(), which has killed the group already
        pytest.fail(str(exc), pytrace=False)


def live_members(pgid: int) -> list[int]:
    """Pids of the group that are not zombies (killed children reparented to init may stay
    <defunct> until init reaps them: they hold no CPU, memory or port)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def assert_group_gone(pgid: int) -> None:
    """No live process of the server's group (API server, engine cores, workers) is left."""
    deadline = time.monotonic() + 10  # SIGKILLed processes take a moment to die
    while live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_members(pgid) == []


def check_answer(answer: dict) -> None:
    assert answer["usage"]["completion_tokens"] == MAX_TOKENS, answer
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length", answer
    # One vocabulary word per token, except that the tiny model's random weights give a
    # nearly uniform next-token distribution (every logprob about -ln 512), where exact ties
    # can go to <s> or </s> (ids 1, 2): they decode to nothing. Seen on vLLM 0.23 with TP=2.
    words = choice["text"].split()
    assert 0 < len(words) <= MAX_TOKENS, answer
    assert all(re.fullmatch(r"w\d+|<unk>", word) for word in words), answer


def worker_reports(report_dir: Path, expected_labels: set[str]) -> tuple[list[dict], list[dict]]:
    """Every process's report, each named by its role and ranks (one per label: vLLM names
    the workers of every DP rank VllmWorker-0), in a file `<label>-<pid>.json`."""
    every = read_reports(report_dir)
    # vLLM inspects the model class in a subprocess when its model-info cache (in ~/.cache)
    # has no entry yet: on a fresh machine one report more, named for what it is.
    inspectors = [r for r in every if r["role"] == "model_inspector"]
    assert [r["label"] for r in inspectors] in ([], ["model_inspector"])
    reports = [r for r in every if r["role"] != "model_inspector"]
    labels = sorted(r["label"] for r in reports)
    assert labels == sorted(expected_labels), labels
    assert sorted(p.name for p in report_dir.glob("*.json")) == sorted(
        f"{r['label']}-{r['pid']}.json" for r in every)
    workers = [r for r in reports if r["role"] == "worker"]
    for worker in workers:
        assert worker["label"] == (f"worker-dp{worker['dp_rank']}-tp{worker['tp_rank']}-"
                                   f"ep{worker['ep_rank']}")
    return reports, workers


def test_tp2_expert_parallel_serves_with_cpu_ep_config(tiny_model, tmp_path):
    config = REPO / "configs" / "cpu-ep.yaml"
    # Eager: this setting's compiled mode is the DP test's path minus the all-to-all, and
    # compiling costs CI minutes.
    server = serve(tiny_model, tmp_path, config,
                   ["--tensor-parallel-size", "2", "--enable-expert-parallel"],
                   enforce_eager=True)
    began = time.monotonic()
    with running(server):
        ready = time.monotonic() - began
        pgid = server.proc.pid
        long_answer = server.complete(long_prompt(0), max_tokens=MAX_TOKENS)
        short_answer = server.complete("w1 w2 w3", max_tokens=MAX_TOKENS)
    assert_group_gone(pgid)
    check_answer(long_answer)
    check_answer(short_answer)
    assert long_answer["usage"]["prompt_tokens"] >= 300

    reports, workers = worker_reports(
        tmp_path / "reports",
        {"api_server", "engine_core", "worker-dp0-tp0-ep0", "worker-dp0-tp1-ep1"})
    assert sorted(r["process"] for r in reports) == [
        "EngineCore", "MainProcess", "VllmWorker-0", "VllmWorker-1"]
    assert {r["digest"] for r in reports} == {load_config(config).digest}
    stats = []
    for worker in workers:
        moe = patch_in(worker, "moe-capacity")
        assert moe["status"] == "applied", moe
        s = moe["stats"]
        assert s["layers_taken_over"] == [MOE_LAYER]
        assert s["layers_not_taken_over"] == {}
        # TP-only EP: every rank holds the same tokens, so vLLM's path (local experts +
        # TP all-reduce) stays; no all-to-all counters.
        assert s["dispatch_paths"][MOE_LAYER]["path"] == "allgather"
        assert "all_to_all" not in s
        assert s["config_checked_over_ranks"] == 2
        stats.append(s)
    # Counts are global over the EP group, and both TP ranks planned the same tokens.
    assert stats[0]["rows_routed"] == stats[1]["rows_routed"] > 0
    assert stats[0]["rows_dropped"] == stats[1]["rows_dropped"] > 0
    # Every call drops at most floor(r * its rows). (vLLM 0.23's CPU worker also runs a
    # dummy profiling batch through the MoE at start-up, which drops and is counted.)
    layer = stats[0]["layers"][MOE_LAYER]
    assert layer["rows_dropped"] <= 0.1 * layer["rows_routed"]
    print(f"\n[tp2-ep] ready after {ready:.0f} s; tokens {long_answer['choices'][0]['text']!r}; "
          f"rows routed {stats[0]['rows_routed']}, dropped {stats[0]['rows_dropped']}")


def ask_concurrently(server: ManagedServer, count: int = 4) -> tuple[list[dict], str]:
    """`count` long prompts at once (the API server spreads them over the DP engines), then
    the server's /metrics: (answers, exposition)."""
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(
            lambda i: server.complete(long_prompt(i), max_tokens=MAX_TOKENS), range(count)))
    return answers, scrape(server)


def scrape(server: ManagedServer) -> str:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


def metric_values(exposition: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label pairs: value} of one sample name in Prometheus' text format."""
    values = {}
    for line in exposition.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            pairs = tuple(sorted(tuple(kv.split("=", 1)) for kv in labels.split(",")))
            values[tuple((k, v.strip('"')) for k, v in pairs)] = float(value)
    return values


@pytest.mark.smoke
def test_dp2_expert_parallel_serves_with_all_to_all_dispatch(tiny_model, tmp_path):
    """In vLLM's default (compiled) mode; /metrics carries the drop counters."""
    config = REPO / "configs" / "cpu-dp-ep.yaml"
    server = serve(tiny_model, tmp_path, config,
                   ["--data-parallel-size", "2", "--enable-expert-parallel"],
                   enforce_eager=False, startup_timeout=COMPILED_STARTUP_TIMEOUT_S)
    began = time.monotonic()
    with running(server):
        ready = time.monotonic() - began
        pgid = server.proc.pid
        answers, exposition = ask_concurrently(server)
    assert_group_gone(pgid)
    log = server.log_path.read_text(errors="replace")
    # vLLM's default mode: its CPU worker warms up for compilation (enforce_eager skips it).
    assert "--enforce-eager" not in server.cmd
    assert "Warming up model for the compilation..." in log, log[-3000:]
    for answer in answers:
        check_answer(answer)

    reports, workers = worker_reports(
        tmp_path / "reports",
        {"api_server", "engine_core-dp0", "engine_core-dp1", "worker-dp0-tp0-ep0",
         "worker-dp1-tp0-ep1"})
    # What vLLM calls them: both workers are VllmWorker-0 (one per DP rank's executor).
    assert sorted(r["process"] for r in reports) == [
        "EngineCore_DP0", "EngineCore_DP1", "MainProcess", "VllmWorker-0", "VllmWorker-0"]
    assert {r["digest"] for r in reports} == {load_config(config).digest}
    moe_stats = []
    for worker in workers:
        collectives = patch_in(worker, "cpu-collectives")
        assert collectives["status"] == "applied", collectives
        # The all-to-all replaced vLLM's all-gather dispatch / reduce-scatter combine.
        assert "all_gatherv.calls" not in collectives["stats"], collectives["stats"]
        assert "reduce_scatterv.calls" not in collectives["stats"], collectives["stats"]
        moe = patch_in(worker, "moe-capacity")
        assert moe["status"] == "applied", moe
        s = moe["stats"]
        assert s["layers_taken_over"] == [MOE_LAYER]
        assert s["dispatch_paths"][MOE_LAYER] == {
            "path": "all_to_all", "why": "all_to_all: DP=2, EP=2"}
        assert s["config_checked_over_ranks"] == 2
        a2a = s["all_to_all"]
        # The report is flushed right after a combine: one dispatch per planned call.
        assert a2a["calls"] == s["calls"] > 0
        # Both DP ranks had real work: at least one 300-token prompt's rows each.
        assert a2a["rows_sent"] + a2a["rows_not_sent_dropped"] >= 2 * 300, a2a
        moe_stats.append(s)
    first, second = moe_stats
    # Drop counts are global over the EP group: both ranks agree, and they are exactly the
    # rows the two ranks held back before sending.
    assert first["rows_dropped"] == second["rows_dropped"] > 0
    assert first["rows_dropped"] == sum(s["all_to_all"]["rows_not_sent_dropped"] for s in moe_stats)
    # Every row one rank sent to the other arrived there.
    sent_remote = [s["all_to_all"]["rows_sent_remote"] for s in moe_stats]
    received = [s["all_to_all"]["rows_received"] for s in moe_stats]
    self_rows = [s["all_to_all"]["rows_sent"] - r for s, r in zip(moe_stats, sent_remote)]
    assert received == [self_rows[0] + sent_remote[1], self_rows[1] + sent_remote[0]]
    assert sum(sent_remote) > 0
    total_bytes = sum(s["all_to_all"]["bytes_sent_remote"] for s in moe_stats)
    assert total_bytes > 0

    # /metrics (scraped from the API server while it ran): the workers' counters, per DP
    # rank. Drops happen only in prefill-sized calls, all reported before the last flush;
    # rows dropped per DP rank are the rows it held back, and together the report's total.
    dropped = metric_values(exposition, "ascend_patch_moe_rows_dropped_total")
    assert sorted(dropped) == [
        (("dp_rank", str(r)), ("layer", MOE_LAYER), ("patch", "moe-capacity"),
         ("process", f"worker-dp{r}-tp0-ep{r}")) for r in (0, 1)]
    # The series name the process whose report has them.
    assert sorted(s["metrics"][MOE_LAYER]["process"] for s in moe_stats) == sorted(
        w["label"] for w in workers)
    by_rank = {dict(k)["dp_rank"]: v for k, v in dropped.items()}
    assert sorted(s["metrics"][MOE_LAYER]["dp_rank"] for s in moe_stats) == [0, 1]
    held_back = {str(s["metrics"][MOE_LAYER]["dp_rank"]): s["all_to_all"]["rows_not_sent_dropped"]
                 for s in moe_stats}
    assert by_rank == {r: float(v) for r, v in held_back.items()}, (by_rank, held_back)
    assert sum(by_rank.values()) == first["rows_dropped"]
    # Bytes keep counting after the last report flush (decode calls): at least the report's.
    sent = {dict(k)["dp_rank"]: v for k, v in
            metric_values(exposition, "ascend_patch_moe_all_to_all_bytes_total").items()}
    assert sent.keys() == {"0", "1"}
    capacity = metric_values(exposition, "ascend_patch_moe_capacity_rows")
    assert len(capacity) == 2 and all(v > 0 for v in capacity.values())
    assert "# TYPE ascend_patch_moe_capacity_rows gauge" in exposition
    # vLLM's own metrics are still there, and the directory our first process made is gone.
    assert "vllm:num_requests_running" in exposition
    assert "vllm:generation_tokens_total" in exposition
    main = next(r for r in reports if r["role"] == "api_server")
    assert main["metrics"]["created_here"] is True
    assert Path(main["metrics"]["dir"]).parent == tmp_path / "tmp"
    assert not Path(main["metrics"]["dir"]).exists()
    print(f"\n[dp2-ep] ready after {ready:.0f} s; tokens "
          f"{[a['choices'][0]['text'] for a in answers]}; rows routed {first['rows_routed']}, "
          f"dropped {first['rows_dropped']}; all-to-all per rank "
          f"{[s['all_to_all'] for s in moe_stats]}")


LAZY_FAILURE = """
version: 1
patches:
  - name: swiglu
    impl: ops.silu_and_mul
    target: vllm.model_executor.layers.activation:SiluAndMul.forward_cpu
"""


def test_server_whose_worker_rejects_a_patch_fails_fast_with_its_log(tiny_model, tmp_path):
    """The failure path every test above relies on, from the farthest process: a patch whose
    target module only the worker imports (lazily, with the model) is checked there, at that
    import; its signature does not fit, so the worker stops start-up, and with it the engine
    and the API server. The test fails within the deadline, with the loader's message in
    the server log, and leaves no process behind."""
    config = tmp_path / "lazy.yaml"
    config.write_text(LAZY_FAILURE.lstrip())
    env = vllm_env(ASCEND_PATCH_CONFIG=str(config))
    server = ManagedServer(tiny_model, env=env, log_path=tmp_path / "server.log",
                           startup_timeout=STARTUP_TIMEOUT_S, enforce_eager=True)
    began = time.monotonic()
    # A server that starts anyway makes pytest.raises fail ("DID NOT RAISE").
    with pytest.raises(pytest.fail.Exception) as failure, running(server):
        pass
    assert time.monotonic() - began < STARTUP_TIMEOUT_S
    assert "vLLM server exited with code" in str(failure.value)
    assert server.proc is None  # stopped by start() itself
    # 0.32 defines SiluAndMul.forward_cpu; 0.23 inherits CustomOp.forward_cpu(*args, **kwargs).
    live = {"0.32": "(self, x)", "0.23": "(self, *args, **kwargs)"}[LINE]
    log = server.log_path.read_text(errors="replace")
    # Raised in the worker, at its import of the target's module, with the loader's message.
    assert (
        f"ascend-patch [VllmWorker-0 pid {{}}]: swiglu (ops.silu_and_mul) failed on import of "
        f"vllm.model_executor.layers.activation: {config}:3: patch 'swiglu': target "
        f"vllm.model_executor.layers.activation:SiluAndMul.forward_cpu has signature {live}, "
        f"but ops.silu_and_mul expects (x)"
    ) in re.sub(r"\[VllmWorker-0 pid \d+\]", "[VllmWorker-0 pid {}]", log), log[-4000:]

"""ascend_patch_* metrics: prometheus_client's multiprocess files, aggregated where /metrics is
served, whether or not PROMETHEUS_MULTIPROC_DIR is set, and cleaned up by their creator."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from ascend_patch.core import metrics
from ascend_patch.impls.moe.telemetry.metrics import layer_series

REPO = Path(__file__).resolve().parents[2]
# Under pytest this process is a first process that is no server: `main` (core/ranks.py).
LABELS = 'dp_rank="0",layer="model.layers.1.mlp.experts",patch="moe",process="main"'
# What the child processes below label themselves: DP rank 0's two workers (TP=2, EP).
PLANNER = 'dp_rank="0",layer="model.layers.1.mlp.experts",patch="moe",process="worker-dp0-tp0-ep0"'
PEER = 'dp_rank="0",layer="model.layers.1.mlp.experts",patch="moe",process="worker-dp0-tp1-ep1"'


@pytest.fixture(autouse=True)
def _reset_metrics():
    yield
    metrics.reset()


def samples(text: str, prefix: str = "ascend_patch_") -> dict[str, float]:
    """{'name{labels}': value} of the exposition lines starting with `prefix`."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def scrape_default_registry() -> dict[str, float]:
    return samples(generate_latest(REGISTRY).decode())


def test_first_process_creates_a_directory_passes_it_on_and_serves_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    env: dict[str, str] = {}
    directory = metrics.configure(env, env.__setitem__)
    assert directory is not None and directory.parent == tmp_path
    assert directory.name.startswith("ascend-patch-metrics-")
    assert env == {"ASCEND_PATCH_METRICS_DIR": str(directory)}
    assert metrics.describe() == {"dir": str(directory), "created_here": True,
                                  "why": "created by this process"}
    series = layer_series(metrics.writer(), "moe", "model.layers.1.mlp.experts", 0, planned=True)
    series.record(routed=600, dropped=59, capacity=541, max_before=600, max_after=541,
                  mean_before=300.0, mean_after=270.5)
    series.record(routed=8, dropped=0, capacity=8, max_before=8, max_after=8, mean_before=4.0,
                  mean_after=4.0)
    series.add_bytes(331952)
    got = scrape_default_registry()
    assert {k: v for k, v in got.items() if LABELS in k} == {
        f"ascend_patch_moe_calls_total{{{LABELS}}}": 2.0,
        f"ascend_patch_moe_calls_with_drops_total{{{LABELS}}}": 1.0,
        f"ascend_patch_moe_rows_routed_total{{{LABELS}}}": 608.0,
        f"ascend_patch_moe_rows_dropped_total{{{LABELS}}}": 59.0,
        f"ascend_patch_moe_bin_load_max_before_rows_total{{{LABELS}}}": 608.0,
        f"ascend_patch_moe_bin_load_max_after_rows_total{{{LABELS}}}": 549.0,
        f"ascend_patch_moe_bin_load_mean_before_rows_total{{{LABELS}}}": 304.0,
        f"ascend_patch_moe_bin_load_mean_after_rows_total{{{LABELS}}}": 274.5,
        f"ascend_patch_moe_capacity_rows{{{LABELS}}}": 8.0,
        f"ascend_patch_moe_last_bin_load_max_before_rows{{{LABELS}}}": 8.0,
        f"ascend_patch_moe_last_bin_load_max_after_rows{{{LABELS}}}": 8.0,
        f"ascend_patch_moe_last_bin_load_mean_before_rows{{{LABELS}}}": 4.0,
        f"ascend_patch_moe_last_bin_load_mean_after_rows{{{LABELS}}}": 4.0,
        f"ascend_patch_moe_all_to_all_bytes_total{{{LABELS}}}": 331952.0,
    }
    metrics.reset()
    assert not directory.exists()
    assert scrape_default_registry() == {}


CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from ascend_patch.core import metrics
    from ascend_patch.impls.moe.telemetry.metrics import layer_series
    env = dict(os.environ)
    metrics.configure(env, env.__setitem__)
    planned = sys.argv[1] == "planned"
    series = layer_series(metrics.writer(), "moe", "model.layers.1.mlp.experts", 0, planned,
                          process="worker-dp0-tp0-ep0" if planned else "worker-dp0-tp1-ep1")
    if planned:
        series.record(routed=100, dropped=int(sys.argv[2]), capacity=int(sys.argv[2]),
                      max_before=50, max_after=45, mean_before=25.0, mean_after=22.5)
    series.add_bytes(1000)
""")


def test_rerouted_rows_are_a_series_of_rerouting_patches_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    metrics.configure({}, lambda *_: None)
    rerouting = layer_series(metrics.writer(), "rr", "L", 0, planned=True, rerouting=True)
    dropping = layer_series(metrics.writer(), "dr", "L", 0, planned=True)
    for series, rerouted in ((rerouting, 40), (dropping, 0)):
        series.record(routed=600, dropped=59, capacity=541, max_before=600, max_after=541,
                      mean_before=300.0, mean_after=270.5, rerouted=rerouted)
    got = scrape_default_registry()
    rerouted = {k: v for k, v in got.items()
                if k.startswith("ascend_patch_moe_rows_rerouted_total{")}
    assert rerouted == {
        'ascend_patch_moe_rows_rerouted_total{dp_rank="0",layer="L",patch="rr",process="main"}':
        40.0}


def run_child(*args: str, env: dict[str, str]) -> None:
    code = CHILD.format(repo=str(REPO))
    subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, timeout=120)


def test_children_write_the_first_process_directory_and_it_aggregates_them(tmp_path):
    env: dict[str, str] = {}
    directory = metrics.configure(env, env.__setitem__)
    child_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    child_env.update(env)
    # Two processes of DP rank 0: the planning one, and its TP peer that only sends bytes.
    run_child("planned", "7", env=child_env)
    run_child("peer", "0", env=child_env)
    assert len(list(directory.glob("counter_*.db"))) == 2
    got = scrape_default_registry()
    assert got[f"ascend_patch_moe_rows_dropped_total{{{PLANNER}}}"] == 7.0
    assert got[f"ascend_patch_moe_calls_total{{{PLANNER}}}"] == 1.0
    assert f"ascend_patch_moe_calls_total{{{PEER}}}" not in got
    # Bytes are per process (sum by dp_rank for the DP rank's).
    assert got[f"ascend_patch_moe_all_to_all_bytes_total{{{PLANNER}}}"] == 1000.0
    assert got[f"ascend_patch_moe_all_to_all_bytes_total{{{PEER}}}"] == 1000.0
    # A child does not remove what it did not create.
    assert directory.is_dir()


def test_gauges_keep_the_most_recent_value_without_a_pid_label(tmp_path):
    env: dict[str, str] = {}
    metrics.configure(env, env.__setitem__)
    child_env = {**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
                 **env}
    run_child("planned", "30", env=child_env)
    run_child("planned", "20", env=child_env)  # e.g. the DP rank's worker restarted
    exposition = generate_latest(REGISTRY).decode()
    assert "# TYPE ascend_patch_moe_capacity_rows gauge" in exposition
    # The restarted worker has the same ranks, so the same series (no pid in the labels).
    assert samples(exposition, "ascend_patch_moe_capacity_rows") == {
        f"ascend_patch_moe_capacity_rows{{{PLANNER}}}": 20.0}
    assert samples(exposition, "ascend_patch_moe_rows_dropped_total") == {
        f"ascend_patch_moe_rows_dropped_total{{{PLANNER}}}": 50.0}


def test_prometheus_multiproc_dir_set_by_the_user_is_used_and_left_alone(tmp_path):
    user_dir = tmp_path / "prom"
    user_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(user_dir)}
    assert metrics.configure(env, env.__setitem__) == user_dir
    assert env == {"PROMETHEUS_MULTIPROC_DIR": str(user_dir)}  # nothing passed on
    assert metrics.describe()["created_here"] is False
    layer_series(metrics.writer(), "moe", "model.layers.1.mlp.experts", 0, True).record(
        routed=10, dropped=1, capacity=9, max_before=10, max_after=9, mean_before=5.0,
        mean_after=4.5)
    # vLLM serves this directory itself (a MultiProcessCollector registry) when the variable
    # is set: not registered a second time on the default registry.
    assert scrape_default_registry() == {}
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(user_dir))
    assert samples(generate_latest(registry).decode())[
        f"ascend_patch_moe_rows_dropped_total{{{LABELS}}}"] == 1.0
    metrics.reset()
    assert [p.name for p in user_dir.iterdir()] != []  # the user's files stay


def test_vllms_own_metrics_are_left_as_they_were():
    own = Counter("vllm:test_requests", "a metric of vLLM's own process", registry=REGISTRY)
    try:
        own.inc(3)
        env: dict[str, str] = {}
        metrics.configure(env, env.__setitem__)
        layer_series(metrics.writer(), "moe", "l", 0, True).add_bytes(5)
        got = samples(generate_latest(REGISTRY).decode(), "")
        assert got["vllm:test_requests_total"] == 3.0
        assert got['ascend_patch_moe_all_to_all_bytes_total{dp_rank="0",layer="l",patch="moe",'
                   'process="main"}'] == 5.0
        assert any(k.startswith("process_") or k.startswith("python_") for k in got)
    finally:
        REGISTRY.unregister(own)


def test_the_first_process_removes_its_directory_when_it_exits(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from ascend_patch.core import metrics
        env = {{}}
        path = metrics.configure(env, env.__setitem__)
        metrics.writer().counter("ascend_patch_x", "x", {{}}).inc(1)
        if os.fork() == 0:
            sys.exit(0)  # a forked child runs the inherited atexit handlers too
        os.wait()
        assert path.is_dir(), "removed by the child"
        print(path)
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROMETHEUS_MULTIPROC_DIR", "ASCEND_PATCH_METRICS_DIR")}
    env["TMPDIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    created = Path(out.stdout.strip())
    assert created.parent == tmp_path
    assert not created.exists()


def test_an_unusable_directory_is_one_warning_and_no_metrics(tmp_path, ascend_logs):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    env = {"ASCEND_PATCH_METRICS_DIR": str(not_a_dir)}
    assert metrics.configure(env, env.__setitem__) is None
    assert metrics.writer() is None
    assert [r.getMessage() for r in ascend_logs.records] == [
        f"ascend-patch [pid {os.getpid()}]: cannot use {not_a_dir} ($ASCEND_PATCH_METRICS_DIR) "
        f"for metrics: [Errno 17] File exists: '{not_a_dir}'; serving goes on without "
        "ascend_patch_* metrics"]


def test_a_failing_write_is_one_warning_and_never_an_exception(tmp_path, ascend_logs):
    import shutil

    env = {"ASCEND_PATCH_METRICS_DIR": str(tmp_path / "m")}
    directory = metrics.configure(env, env.__setitem__)
    series = layer_series(metrics.writer(), "moe", "l", 0, planned=False)
    metrics.writer().close()
    shutil.rmtree(directory)  # e.g. a cleaner emptied /tmp: the next write must reopen
    series.add_bytes(1)
    series.add_bytes(1)
    assert [r.getMessage() for r in ascend_logs.records if "metrics" in r.getMessage()] == [
        f"ascend-patch [pid {os.getpid()}]: cannot write metrics to {directory}: [Errno 2] "
        f"No such file or directory: '{directory}/counter_{os.getpid()}.db'; ascend_patch_* "
        "metrics of this process stop here"]


def test_only_the_planning_rank_of_a_dp_rank_writes_rows():
    env: dict[str, str] = {}
    metrics.configure(env, env.__setitem__)
    peer = layer_series(metrics.writer(), "moe", "l", 1, planned=False)
    peer.record(routed=10, dropped=1, capacity=9, max_before=10, max_after=9, mean_before=5.0,
                mean_after=4.5)
    peer.add_bytes(64)
    assert scrape_default_registry() == {
        'ascend_patch_moe_all_to_all_bytes_total{dp_rank="1",layer="l",patch="moe",'
        'process="main"}': 64.0}

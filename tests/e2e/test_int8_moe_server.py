"""A W8A8 int8 MoE model served with drops: vLLM 0.32's OpenAI server, online int8 quantisation.

Stock vLLM cannot load this model on a CPU without AMX: `--quantization experts_int8` makes
every MoE layer an `Int8OnlineMoEMethod`, whose `select_int8_moe_backend` raises
NotImplementedError ("No Int8 MoE backend supports the deployment configuration"; measured
on this bench). Patched, the selection gives moe.capacity's int8 experts
(adapters/vllm_int8_cpu.py): the server answers, both MoE layers are taken over and named
int8 in the report, rows are dropped within the budget, and /metrics has them. That r = 0
equals vLLM's int8 kernel is checked at layer level against the real CPUExpertsInt8
(tests/moe/test_int8_cpu_experts.py): there is no stock engine here to compare with.

The server runs compiled (Dynamo, eager backend): the CPU worker then warms up on a batch of
dummy tokens before the first request (at least min_tokens: it drops), which the report counts
under "warmup", apart from the serving counters that /metrics exports.
One server for every check: engines take minutes on this 2-core bench.
"""

from __future__ import annotations

import textwrap

import pytest

from ascend_patch.core.report import read_reports
from ascend_patch.harness.procs import vllm_env
from ascend_patch.harness.server import ManagedServer
from ascend_patch.harness.tiny_model import make_tiny_model
from tests.e2e.test_expert_parallel_server import (
    MAX_TOKENS,
    check_answer,
    long_prompt,
    metric_values,
    running,
    scrape,
)
from tests.vllm_harness import patch_in

from tests.stack import LINE

# The int8 takeover is declared for vLLM 0.32 only.
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(LINE != "0.32", reason="int8 MoE sites are declared for 0.32")]

LAYERS = ["model.layers.0.block_sparse_moe.experts", "model.layers.1.block_sparse_moe.experts"]
RATIO = 0.1
CONFIG = f"""
version: 1
patches:
  - name: moe-int8
    impl: moe.capacity
    options:
      drop_token_ratio: {RATIO}
      min_tokens: 64
      log_interval: 1   # a report after every MoE call: it matches /metrics at the end
"""


def test_int8_moe_model_serves_with_drops_reports_and_metrics(tmp_path_factory, tmp_path):
    model = make_tiny_model(tmp_path_factory.mktemp("tiny_mixtral"), "mixtral")
    config = tmp_path / "int8.yaml"
    config.write_text(textwrap.dedent(CONFIG).lstrip())
    (tmp_path / "tmp").mkdir()
    env = vllm_env(ASCEND_PATCH_CONFIG=str(config),
                   ASCEND_PATCH_REPORT_DIR=str(tmp_path / "reports"),
                   ASCEND_PATCH_REPORT_INTERVAL="0", TMPDIR=str(tmp_path / "tmp"))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = ManagedServer(
        model, env=env, log_path=tmp_path / "server.log", enforce_eager=False,
        args=["--quantization", "experts_int8",
              "--compilation-config", '{"mode": 1, "backend": "eager"}',
              # Every prompt token computed: the serving row counts below are exact.
              "--no-enable-prefix-caching"])
    with running(server):
        # One at a time: each request's prefill and decode steps run alone.
        answers = [server.complete(long_prompt(i), max_tokens=MAX_TOKENS) for i in range(2)]
        exposition = scrape(server)
    for answer in answers:
        check_answer(answer)
    log = server.log_path.read_text(errors="replace")
    assert "quantization=experts_int8" in log, log[-3000:]
    assert "Warming up model for the compilation..." in log, log[-3000:]

    (worker,) = [r for r in read_reports(tmp_path / "reports") if r["role"] == "worker"]
    moe = patch_in(worker, "moe-int8")
    assert moe["status"] == "applied", moe
    stats = moe["stats"]
    assert stats["layers_taken_over"] == LAYERS
    assert stats["layers_not_taken_over"] == {}
    assert sorted(stats["quantization"]) == LAYERS
    assert all(s.startswith("int8 W8A8") for s in stats["quantization"].values())
    warmup = stats["warmup"]
    assert warmup["calls"] >= len(LAYERS) and warmup["rows_routed"] >= 64 * 2 * len(LAYERS)
    assert warmup["rows_dropped"] > 0
    # The serving counters hold the two requests alone: every token each computed (prompt +
    # generated - 1) x top-2, in one prefill and MAX_TOKENS - 1 decode steps per layer.
    routed = sum(a["usage"]["prompt_tokens"] + MAX_TOKENS - 1 for a in answers) * 2
    for name in LAYERS:
        layer = stats["layers"][name]
        assert (layer["calls"], layer["rows_routed"]) == (2 * MAX_TOKENS, routed), layer
        assert 0 < layer["rows_dropped"] <= RATIO * layer["rows_routed"], layer
        assert layer["calls_with_drops"] >= 1
    dropped = metric_values(exposition, "ascend_patch_moe_rows_dropped_total")
    assert {dict(k)["layer"]: v for k, v in dropped.items()} == {
        name: float(stats["layers"][name]["rows_dropped"]) for name in LAYERS}
    quantized = metric_values(exposition, "ascend_patch_moe_layer_quantization")
    assert {(dict(k)["layer"], dict(k)["quantization"]): v for k, v in quantized.items()} == {
        (name, "int8_w8a8"): 1.0 for name in LAYERS}
    routed = metric_values(exposition, "ascend_patch_moe_rows_routed_total")
    assert {dict(k)["layer"]: v for k, v in routed.items()} == {
        name: float(stats["layers"][name]["rows_routed"]) for name in LAYERS}

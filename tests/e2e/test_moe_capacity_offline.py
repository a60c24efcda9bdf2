"""moe.capacity inside the real engine: tiny DeepseekV3 (sigmoid grouped routing, shared expert)."""

import pytest

from tests.vllm_harness import patch_in, reports_by_role, run_offline

pytestmark = pytest.mark.vllm

# Long enough that one prefill batch routes more rows than min_tokens asks for.
PROMPTS = [" ".join(f"w{(13 * i + 7 * j) % 500}" for j in range(120)) for i in range(3)]

CONFIG = """
version: 1
patches:
  - name: moe
    impl: moe.capacity
    options:
      drop_token_ratio: {ratio}
      min_tokens: 64
      log_interval: 1   # rewrite the process report after every MoE call: always current
"""


def test_dropless_matches_unpatched_and_ratio_drops_in_the_worker(tiny_model, tmp_path, write_config):
    stock = run_offline(tiny_model, PROMPTS, tmp_path)
    dropless = run_offline(tiny_model, PROMPTS, tmp_path, config=write_config(CONFIG.format(ratio=0), "r0.yaml"),
                           report_dir=tmp_path / "r0")
    dropping = run_offline(tiny_model, PROMPTS, tmp_path, config=write_config(CONFIG.format(ratio=0.1), "r01.yaml"),
                           report_dir=tmp_path / "r01")
    for run in (stock, dropless, dropping):
        assert run.returncode == 0, run.log[-4000:]
        assert [len(t) for t in run.tokens()] == [8, 8, 8]
    assert dropless.tokens() == stock.tokens()

    worker0 = patch_in(reports_by_role(tmp_path / "r0")["VllmWorker-0"], "moe")
    assert worker0["status"] == "applied"
    assert worker0["stats"]["rows_dropped"] == 0 and worker0["stats"]["rows_routed"] > 0
    # The first layer is dense (first_k_dense_replace: 1): one MoE layer, taken over.
    assert worker0["stats"]["layers_taken_over"] == ["model.layers.1.mlp.experts"]

    stats = patch_in(reports_by_role(tmp_path / "r01")["VllmWorker-0"], "moe")["stats"]
    (layer,) = stats["layers"].values()
    assert 0 < stats["rows_dropped"] <= int(0.1 * stats["rows_routed"])
    assert layer["calls_with_drops"] >= 1

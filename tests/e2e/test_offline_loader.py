"""The loader inside real vLLM processes (offline engine, CPU build, tiny DeepseekV3)."""

import pytest

from ascend_patch.core.config import load_config
from tests.stack import LINE
from tests.vllm_harness import patch_in, reports_by_role, run_offline

pytestmark = pytest.mark.vllm

PROMPTS = ["w1 w2 w3 w4 w5 w6", "w10 w20 w30"]

OPS_CONFIG = """
version: 1
vllm: ">=0.23,<0.33"
patches:
  - name: rms
    impl: ops.rms_norm
  - name: swiglu
    impl: ops.silu_and_mul
"""


# One engine checks both the ops patches and the profile choice (each engine start is most of
# a test's cost on the 2-core CI machine): the served model's profile disables a third patch.
PROFILES = """
  - name: moe
    impl: moe.capacity
profiles:
  mixtral:
    match: {architectures: [MixtralForCausalLM]}
  deepseek:
    match: {architectures: [DeepseekV3ForCausalLM], model: "tiny*"}
    patches:
      moe: {enabled: false}
"""


def test_ops_patches_apply_in_every_process_under_the_served_models_profile(
        tiny_model, tmp_path, write_config):
    # That the ops patches leave greedy tokens unchanged against stock vLLM is checked in the
    # engine by tests/cli/test_ab.py (its stock and r = 0 arms), and op by op in
    # tests/ops/test_kernels.py: one engine here.
    config = write_config(OPS_CONFIG + PROFILES.lstrip("\n"))
    patched = run_offline(tiny_model, PROMPTS, tmp_path, config=config, report_dir=tmp_path / "reports")
    assert patched.returncode == 0, patched.log[-4000:]
    assert [len(t) for t in patched.tokens()] == [8, 8]

    reports = reports_by_role(tmp_path / "reports")
    assert set(reports) == {"MainProcess", "EngineCore", "VllmWorker-0"}
    digest = load_config(config).digest
    assert {r["digest"] for r in reports.values()} == {digest}
    assert {role: r["profile"] for role, r in reports.items()} == {
        "MainProcess": "deepseek", "EngineCore": "deepseek", "VllmWorker-0": "deepseek"}
    worker = reports["VllmWorker-0"]
    for name in ("rms", "swiglu"):
        entry = patch_in(worker, name)
        assert entry["status"] == "applied"
        assert entry["stats"]["calls"] > 0
    assert patch_in(worker, "moe")["status"] == "disabled"
    # The front-end process never builds the model nor imports the layers (on either line):
    # the lazy patch waits there.
    assert patch_in(reports["MainProcess"], "rms")["status"] == "pending"
    assert "ascend-patch [VllmWorker-0 pid" in patched.log


def test_bad_config_stops_start_up_with_the_loaders_message(tiny_model, tmp_path, write_config):
    config = write_config(OPS_CONFIG.replace("impl: ops.rms_norm", "impl: ops.rms_norm\n    options: {eps: 1}"))
    run = run_offline(tiny_model, PROMPTS, tmp_path, config=config, timeout=120)
    assert run.returncode != 0 and run.result is None
    assert f"invalid ascend-patch config: {config}:6: patches[0].options.eps: unknown key" in run.log


def test_lazy_signature_failure_stops_the_worker(tiny_model, tmp_path, write_config):
    config = write_config(OPS_CONFIG.replace(
        "impl: ops.silu_and_mul",
        "impl: ops.silu_and_mul\n    target: vllm.model_executor.layers.activation:SiluAndMul.forward_cpu"))
    run = run_offline(tiny_model, PROMPTS, tmp_path, config=config, timeout=180)
    assert run.returncode != 0 and run.result is None
    # 0.32 defines SiluAndMul.forward_cpu; 0.23 inherits CustomOp.forward_cpu(*args, **kwargs).
    live = {"0.32": "(self, x)", "0.23": "(self, *args, **kwargs)"}[LINE]
    assert (
        f"{config}:6: patch 'swiglu': target vllm.model_executor.layers.activation:SiluAndMul.forward_cpu "
        f"has signature {live}, but ops.silu_and_mul expects (x)"
    ) in run.log


@pytest.mark.skipif(
    LINE == "0.23",
    reason="vLLM 0.23's CPU build cannot run speculative decoding: its rejection sampler fails "
    "(_sample_recovered_tokens_kernel_impl() got an unexpected keyword argument "
    "'USE_FP64_GUMBEL') inside vLLM's sampler, in no patched symbol; the draft-config "
    "profile choice is tested through vLLM's own config path in tests/core/test_speculative.py",
)
def test_deepseek_v3_with_mtp_starts_under_prod_yaml(tmp_path):
    """Speculative decoding builds a second ModelConfig for the MTP draft (architecture
    DeepSeekMTPModel, which matches no profile); the profile still follows the served model."""
    import json
    from pathlib import Path

    from ascend_patch.harness.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-mtp")
    data = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**data, "num_nextn_predict_layers": 1}))
    prod = Path(__file__).resolve().parents[2] / "configs" / "prod.yaml"
    run = run_offline(model, PROMPTS, tmp_path, config=prod, report_dir=tmp_path / "reports",
                      extra=("--speculative-config",
                             json.dumps({"method": "mtp", "num_speculative_tokens": 1})),
                      timeout=420)
    assert run.returncode == 0, run.log[-4000:]
    assert [len(t) for t in run.tokens()] == [8, 8]
    reports = reports_by_role(tmp_path / "reports")
    assert {role: r["profile"] for role, r in reports.items()} == {
        "MainProcess": "deepseek-v3-ep16-prefill", "EngineCore": "deepseek-v3-ep16-prefill",
        "VllmWorker-0": "deepseek-v3-ep16-prefill"}
    moe = patch_in(reports["VllmWorker-0"], "moe")
    assert moe["status"] == "applied" and moe["options"]["drop_token_ratio"] == 0.02


WARMUP_CONFIG = """
version: 1
patches:
  - name: moe
    impl: moe.capacity
    options: {drop_token_ratio: 0.3, granularity: expert, min_tokens: 64, log_interval: 1}
"""


def test_start_up_warm_up_is_counted_apart_from_serving(tiny_model, tmp_path, write_config):
    """Compiled mode: the CPU worker's start-up warm-up runs the model on a batch of dummy
    tokens (at least min_tokens: it drops) before the first request. The report counts that
    under "warmup"; the serving counters hold the one request alone: its rows exactly
    ((prompt + generated - 1) tokens x top-2 x the one MoE layer), and its drops (none: a
    prompt of a few tokens is under min_tokens)."""
    config = write_config(WARMUP_CONFIG)
    run = run_offline(tiny_model, PROMPTS[:1], tmp_path, config=config, max_tokens=4,
                      report_dir=tmp_path / "reports", timeout=600,
                      extra=("--compilation-config", '{"mode": 1, "backend": "eager"}'))
    assert run.returncode == 0, run.log[-4000:]
    (output,) = run.result["outputs"]
    assert len(output["token_ids"]) == 4
    stats = patch_in(reports_by_role(tmp_path / "reports")["VllmWorker-0"], "moe")["stats"]
    warmup = stats["warmup"]
    assert warmup["calls"] >= 1 and warmup["rows_routed"] >= 64 * 2
    assert warmup["rows_dropped"] > 0
    routed = (output["prompt_tokens"] + 4 - 1) * 2
    assert (stats["calls"], stats["rows_routed"], stats["rows_dropped"]) == (4, routed, 0)
    (layer,) = stats["layers"].values()
    assert (layer["calls"], layer["rows_routed"], layer["rows_dropped"]) == (4, routed, 0)

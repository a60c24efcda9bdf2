"""The loader inside real vLLM processes (offline engine, CPU build, tiny DeepseekV3)."""

from pathlib import Path

import pytest

from ascend_patch.core.config import load_config
from tests.stack import LINE
from tests.vllm_harness import patch_in, reports_by_role, run_offline

pytestmark = pytest.mark.vllm

PROD = Path(__file__).resolve().parents[2] / "configs" / "prod.yaml"
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

# What configs/prod.yaml gives the tiny DeepseekV3 on each line (0.23's is vllm-ascend's).
PROD_PROFILE = {"0.32": "deepseek-v3-ep16-prefill", "0.23": "deepseek-v3-a3-ep16-prefill-0.23"}


def test_bad_config_stops_start_up_with_the_loaders_message(tiny_model, tmp_path, write_config):
    config = write_config(OPS_CONFIG.replace("impl: ops.rms_norm", "impl: ops.rms_norm\n    options: {eps: 1}"))
    run = run_offline(tiny_model, PROMPTS, tmp_path, config=config, timeout=120)
    assert run.returncode != 0 and run.result is None
    assert f"invalid ascend-patch config: {config}:6: patches[0].options.eps: unknown key" in run.log


def test_prod_yaml_applies_in_every_process_under_the_served_models_profile(tmp_path):
    """configs/prod.yaml on the tiny DeepseekV3, one engine for every check (each start is
    most of a test's cost on the 2-core CI machine): the ops patches and the profile's MoE
    options reach every vLLM process. On 0.32 the engine also runs MTP speculative decoding,
    which builds a second ModelConfig for the draft (architecture DeepSeekMTPModel, matching
    no profile): the profile still follows the served model. That the ops patches leave
    greedy tokens unchanged against stock vLLM is checked in the engine by tests/cli/test_ab.py
    (its stock and r = 0 arms), and op by op in tests/ops/test_kernels.py."""
    import json

    from ascend_patch.harness.tiny_model import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-mtp")
    extra: tuple[str, ...] = ()
    # vLLM 0.23's CPU build cannot run speculative decoding: its rejection sampler fails
    # (_sample_recovered_tokens_kernel_impl() got an unexpected keyword argument
    # 'USE_FP64_GUMBEL') inside vLLM's sampler, in no patched symbol; the draft-config profile
    # choice is tested through vLLM's own config path in tests/core/test_speculative.py.
    if LINE != "0.23":
        data = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**data, "num_nextn_predict_layers": 1}))
        extra = ("--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": 1}))
    run = run_offline(model, PROMPTS, tmp_path, config=PROD, report_dir=tmp_path / "reports",
                      extra=extra, timeout=420)
    assert run.returncode == 0, run.log[-4000:]
    assert [len(t) for t in run.tokens()] == [8, 8]

    reports = reports_by_role(tmp_path / "reports")
    assert set(reports) == {"MainProcess", "EngineCore", "VllmWorker-0"}
    assert {r["digest"] for r in reports.values()} == {load_config(PROD).digest}
    assert {role: r["profile"] for role, r in reports.items()} == dict.fromkeys(
        reports, PROD_PROFILE[LINE])
    worker = reports["VllmWorker-0"]
    for name in ("rms-norm", "swiglu"):
        entry = patch_in(worker, name)
        assert entry["status"] == "applied"
        assert entry["stats"]["calls"] > 0
    moe = patch_in(worker, "moe")
    assert moe["status"] == "applied" and moe["options"]["drop_token_ratio"] == 0.02
    # The front-end process never builds the model nor imports the layers (on either line):
    # the lazy patch waits there.
    assert patch_in(reports["MainProcess"], "rms-norm")["status"] == "pending"
    assert "ascend-patch [VllmWorker-0 pid" in run.log

"""configs/prod.yaml gives DeepSeek-V3 exactly one profile per vLLM line."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.version import Version

from ascend_patch.core import profiles
from ascend_patch.core.config import load_config
from ascend_patch.core.profiles import ModelInfo, select
from ascend_patch.core.versions import InstalledVllm

PROD = Path(__file__).resolve().parents[2] / "configs" / "prod.yaml"


@pytest.mark.parametrize(
    ("vllm", "profile", "min_tokens"),
    [("0.23.0", "deepseek-v3-ascend-ep16-prefill", 4096),
     ("0.32.0", "deepseek-v3-ep16-prefill", 2048),
     ("0.33.0", "deepseek-v3-ep16-prefill", 2048),
     ("0.34.0", "deepseek-v3-ep16-prefill", 2048)],
)
def test_deepseek_v3_profile_per_line(monkeypatch, vllm, profile, min_tokens):
    monkeypatch.setattr(profiles, "installed_vllm", lambda: InstalledVllm("vllm", Version(vllm)))
    config = load_config(PROD)
    chosen = select(config, ModelInfo("deepseek-ai/DeepSeek-R1", ("DeepseekV3ForCausalLM",)), None)
    assert chosen == profile  # select() raises when two profiles match
    options = config.with_profile(chosen).patch("moe").options
    assert options.drop_token_ratio == 0.02 and options.min_tokens == min_tokens

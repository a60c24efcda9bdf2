"""The configs we ship validate against the installed vLLM and pick the intended profiles."""

import json
from pathlib import Path

import pytest

from ascend_patch.cli.main import main
from ascend_patch.core.config import load_config
from ascend_patch.core.profiles import ModelInfo, select
from tests.stack import LINE

# vLLM 0.23 is vllm-ascend's line: DeepSeek-V3 gets the Ascend EP16 profile there.
DEEPSEEK = {"0.32": "deepseek-v3-ep16-prefill", "0.23": "deepseek-v3-a3-ep16-prefill-0.23"}[LINE]

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("architecture", "profile", "ratio"),
    [
        ("DeepseekV3ForCausalLM", DEEPSEEK, 0.02),
        ("Qwen3MoeForCausalLM", "qwen3-moe", 0.01),
        ("MixtralForCausalLM", "mixtral", 0.0),
        ("LlamaForCausalLM", None, 0.0),
    ],
)
def test_prod_profiles_per_model(architecture, profile, ratio, tmp_path):
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "prod.yaml")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    chosen = select(config, ModelInfo.from_name_or_path(str(model_dir)), None)
    assert chosen == profile
    assert config.with_profile(chosen).patch("moe").options.drop_token_ratio == ratio

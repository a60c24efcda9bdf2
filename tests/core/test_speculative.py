"""The profile is chosen from the served model only: speculative decoding's draft model (DeepSeek
MTP, a separate draft checkpoint) and vLLM's sub-model views never change or conflict it."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ascend_patch.core.errors import ConsistencyError
from ascend_patch.core.profiles import ModelInfo, served_model
from ascend_patch.core.runtime import apply_from_env

from tests.stack import LINE

PROD = Path(__file__).resolve().parents[2] / "configs" / "prod.yaml"
# prod.yaml gives DeepSeek-V3 one profile per vLLM line (0.23 is vllm-ascend's).
DEEPSEEK_PROFILE = {"0.23": "deepseek-v3-a3-ep16-prefill-0.23",
                    "0.32": "deepseek-v3-ep16-prefill"}[LINE]


def model_config(model="m", architectures=("DeepseekV3ForCausalLM",), **extra):
    return SimpleNamespace(model=model, architectures=list(architectures), runner="auto",
                           runner_type="generate", is_submodel_config=False, **extra)


@pytest.mark.parametrize(("config", "expected"), [
    (SimpleNamespace(model_config=model_config()), ModelInfo("m", ("DeepseekV3ForCausalLM",))),
    (SimpleNamespace(model_config=None), None),
    (SimpleNamespace(), None),
    # SpeculativeConfig builds the draft's ModelConfig with runner="draft".
    (SimpleNamespace(model_config=SimpleNamespace(
        **{**vars(model_config(architectures=("DeepSeekMTPModel",))), "runner": "draft",
           "runner_type": "draft"})), None),
    # VllmConfig.with_hf_config: a view of one part of the served model.
    (SimpleNamespace(model_config=SimpleNamespace(
        **{**vars(model_config(architectures=())), "is_submodel_config": True})), None),
])
def test_served_model_of_a_vllm_config(config, expected):
    assert served_model(config) == expected


def _tiny(tmp_path_factory, arch: str, **changes) -> Path:
    from ascend_patch.harness.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp(arch), arch)
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def tiny_mtp(tmp_path_factory):
    """The tiny DeepseekV3 with one MTP layer (what `method: mtp` drafts with)."""
    return _tiny(tmp_path_factory, "deepseek_v3", num_nextn_predict_layers=1)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    return _tiny(tmp_path_factory, "mixtral")


def _engine_config(model: Path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), load_format="dummy", dtype="bfloat16", enforce_eager=True,
                      max_model_len=256, **kwargs).create_engine_config()


@pytest.mark.parametrize("method", ["mtp", "draft_model"])
def test_speculative_decoding_keeps_the_served_models_profile(tiny_mtp, tiny_mixtral, method):
    """Under configs/prod.yaml the draft would match another profile (DeepSeekMTPModel: none,
    a Mixtral draft: mixtral); the served DeepSeek-V3 still gets its own, and starts."""
    env = {"ASCEND_PATCH_CONFIG": str(PROD)}
    assert apply_from_env(env) == []
    speculative = {"method": method, "num_speculative_tokens": 1}
    if method == "draft_model":
        speculative["model"] = str(tiny_mixtral)
    vllm_config = _engine_config(tiny_mtp, speculative_config=speculative)
    draft = vllm_config.speculative_config.draft_model_config
    assert (draft.architectures, draft.runner_type) == (
        ["DeepSeekMTPModel" if method == "mtp" else "MixtralForCausalLM"], "draft")
    assert env["ASCEND_PATCH_PROFILE_RESOLVED"] == DEEPSEEK_PROFILE
    from ascend_patch.core.patcher import PATCHER

    assert PATCHER.config.profile == DEEPSEEK_PROFILE
    assert PATCHER.config.patch("moe").options.drop_token_ratio == 0.02


def test_a_second_served_model_is_still_a_conflict(tiny_mtp, tiny_mixtral):
    env = {"ASCEND_PATCH_CONFIG": str(PROD)}
    apply_from_env(env)
    _engine_config(tiny_mtp)
    with pytest.raises(ConsistencyError, match=r"this process serves two models needing "
                                               rf"different profiles \({DEEPSEEK_PROFILE} "
                                               r"and mixtral\)"):
        _engine_config(tiny_mixtral)


def test_a_vllm_without_the_hook_is_a_clear_error(monkeypatch, write_config):
    import vllm.config.vllm as module

    from ascend_patch.core.errors import PatchError

    class Bare:  # no __post_init__ anywhere in its MRO
        pass

    monkeypatch.setattr(module, "VllmConfig", Bare)
    config = write_config("version: 1\nprofiles:\n  p: {match: {architectures: [X]}}\n")
    env = {"ASCEND_PATCH_CONFIG": str(config)}
    with pytest.raises(PatchError) as info:
        apply_from_env(env)
    assert env == {"ASCEND_PATCH_CONFIG": str(config)}  # nothing half-applied
    assert str(info.value) == (
        "cannot choose a profile per model: vllm.config.vllm:VllmConfig.__post_init__: class "
        "vllm.config.vllm.VllmConfig has no attribute '__post_init__'; pin one with "
        "ASCEND_PATCH_PROFILE")

"""`plan` says whether a quantized model's MoE layers are taken over on the planned stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ascend_patch.cli.main import main

PROD = Path(__file__).resolve().parents[2] / "configs" / "prod.yaml"
W8A8_DESCRIPTION = {
    "model_quant_type": "W8A8_DYNAMIC",
    "model.layers.0.mlp.gate_proj.weight": "W8A8",
    "model.layers.3.self_attn.q_a_proj.weight": "W8A8",
    "model.layers.3.mlp.experts.0.gate_proj.weight": "W8A8_DYNAMIC",
    "model.layers.3.mlp.experts.255.down_proj.weight": "W8A8_DYNAMIC",
}


def _model(tmp_path, description=None, quantization_config=None) -> Path:
    model = tmp_path / "DeepSeek-R1-W8A8"
    model.mkdir()
    config = {"architectures": ["DeepseekV3ForCausalLM"]}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (model / "config.json").write_text(json.dumps(config))
    if description is not None:
        (model / "quant_model_description.json").write_text(json.dumps(description))
    return model


def _plan(capsys, *argv) -> dict:
    assert main(["plan", str(PROD), "--no-check", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _moe(plan: dict) -> dict:
    return next(p for p in plan["patches"] if p["name"] == "moe")


@pytest.mark.parametrize("line", ["0.23", "0.18", "0.13"])
def test_w8a8_moe_layers_taken_over_on_vllm_ascend(capsys, tmp_path, line):
    model = _model(tmp_path, W8A8_DESCRIPTION)
    plan = _plan(capsys, "--platform", "ascend", "--vllm-line", line, "--model", str(model))
    assert plan["profile"] == f"deepseek-v3-a3-ep16-prefill-{line}"
    assert plan["quantization"] == {"method": "ascend", "moe_schemes": ["W8A8_DYNAMIC"],
                                    "source": str(model / "quant_model_description.json")}
    moe = _moe(plan)
    assert moe["quantized_layers"] == "W8A8_DYNAMIC: taken over"
    assert moe["options"]["drop_token_ratio"] == 0.02
    # Layers whose quantization does not matter to them say nothing.
    assert {p["name"]: p["quantized_layers"] for p in plan["patches"]
            if p["name"] != "moe"} == {"rms-norm": None, "swiglu": None}


def test_scheme_from_the_command_line(capsys):
    plan = _plan(capsys, "--platform", "ascend", "--vllm-line", "0.23",
                 "--model", "vllm-ascend/DeepSeek-R1-W8A8", "--quantization", "W8A8_DYNAMIC")
    assert plan["quantization"] == {"method": "ascend", "moe_schemes": ["W8A8_DYNAMIC"],
                                    "source": "--quantization W8A8_DYNAMIC"}
    assert _moe(plan)["quantized_layers"] == "W8A8_DYNAMIC: taken over"


def test_vllm_platform_takes_unquantized_layers_only(capsys, tmp_path):
    model = _model(tmp_path, W8A8_DESCRIPTION)
    plan = _plan(capsys, "--platform", "cpu", "--vllm-line", "0.23", "--model", str(model))
    assert _moe(plan)["quantized_layers"] == (
        "W8A8_DYNAMIC: NOT taken over, runs unchanged (this stack takes over unquantized "
        "layers only)")


def test_method_without_a_scheme(capsys, tmp_path):
    model = _model(tmp_path, quantization_config={"quant_method": "compressed-tensors"})
    plan = _plan(capsys, "--platform", "cpu", "--vllm-line", "0.32", "--model", str(model))
    assert plan["quantization"]["method"] == "compressed-tensors"
    assert _moe(plan)["quantized_layers"] == (
        "scheme not named (compressed-tensors): this stack takes over unquantized layers and "
        "experts_int8, compressed-tensors W8A8 int8")


def test_vllms_online_int8_is_taken_over_on_the_032_line(capsys, tmp_path):
    model = str(_model(tmp_path))
    plan = _plan(capsys, "--platform", "cpu", "--vllm-line", "0.32", "--model", model,
                 "--quantization", "experts_int8")
    assert _moe(plan)["quantized_layers"] == "experts_int8: taken over"
    plan = _plan(capsys, "--platform", "cpu", "--vllm-line", "0.23", "--model", model,
                 "--quantization", "experts_int8")
    assert _moe(plan)["quantized_layers"] == (
        "scheme not named (experts_int8): this stack takes over unquantized layers only")


def test_unquantized_model_says_nothing(capsys, tmp_path):
    model = _model(tmp_path)
    plan = _plan(capsys, "--platform", "ascend", "--vllm-line", "0.23", "--model", str(model))
    assert plan["quantization"] is None and _moe(plan)["quantized_layers"] is None


def test_table_shows_the_quantization(capsys, tmp_path):
    model = _model(tmp_path, W8A8_DESCRIPTION)
    assert main(["plan", str(PROD), "--no-check", "--platform", "ascend", "--vllm-line", "0.23",
                 "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert (f"quantization: ascend, MoE scheme W8A8_DYNAMIC (from "
            f"{model / 'quant_model_description.json'})") in out
    assert "  quantized W8A8_DYNAMIC: taken over" in out.split("sha256", 1)[1]


def test_unknown_scheme_is_refused(capsys):
    assert main(["plan", str(PROD), "--no-check", "--quantization", "W9A9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("invalid ascend-patch config: --quantization: 'W9A9' is no "
                          "quantization scheme the catalog knows (schemes: FP8, W4A16, ")
    assert err.endswith("; or give vLLM's method name, e.g. ascend)")


def test_broken_description_names_the_file(capsys, tmp_path):
    model = _model(tmp_path)
    path = model / "quant_model_description.json"
    path.write_text('{"model.layers.3.mlp.experts.0.gate_proj.weight": ')
    assert main(["plan", str(PROD), "--no-check", "--model", str(model)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"invalid ascend-patch config: --model {model}: {path}:1: invalid JSON: Expecting "
        "value")

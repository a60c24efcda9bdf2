"""What the CLI prints at a terminal's width: names are never cut (ascend_patch/cli/render.py)."""

import pytest

from ascend_patch.cli import render

INT8_MODULE = ("vllm.model_executor.layers.quantization.compressed_tensors."
               "compressed_tensors_moe.compressed_tensors_moe_w8a8_int8")


def test_a_long_module_wraps_after_a_dot():
    assert render.wrap_dotted(INT8_MODULE, 80, 14) == [
        "              vllm.model_executor.layers.quantization.compressed_tensors.",
        "                compressed_tensors_moe.compressed_tensors_moe_w8a8_int8",
    ]


def test_a_module_that_fits_stays_on_one_line():
    assert render.wrap_dotted("vllm.model_executor.layers.layernorm", 80, 4) == [
        "    vllm.model_executor.layers.layernorm"]


def test_a_segment_longer_than_the_width_is_kept_whole():
    assert render.wrap_dotted("a.bbbbbbbbbbbb.c", 8) == ["a.", "  bbbbbbbbbbbb.", "  c"]


@pytest.mark.parametrize("width", [40, 60, 80, 100])
def test_wrapped_paths_rejoin_to_the_path_and_keep_every_segment(width):
    lines = render.wrap_dotted(INT8_MODULE, width, 14)
    assert "".join(line.strip() for line in lines) == INT8_MODULE
    segments = set(INT8_MODULE.split("."))
    for line in lines:
        assert set(line.strip().strip(".").split(".")) <= segments
        assert len(line) <= width or "." not in line.strip().rstrip(".")


def test_split_target():
    assert render.split_target("vllm.a.b:Cls.meth") == ("vllm.a.b", "Cls.meth")
    assert render.split_target("vllm.a.b.func") == ("vllm.a.b", "func")


ROW = {
    "name": "moe",
    "impl": "moe.capacity",
    "status": "apply (targets not checked)",
    "targets": {
        "main": "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:"
                "UnquantizedFusedMoEMethod.apply",
        "int8_apply_compressed_tensors": INT8_MODULE + ":CompressedTensorsW8A8Int8MoEMethod.apply",
    },
    "options": {"drop_token_ratio": 0.1, "granularity": "rank", "drop_policy": "probs",
                "keep_top1": True, "renormalize": False, "min_tokens": 128},
    "quantized_layers": None,
}


def test_a_patch_at_80_columns():
    assert [line.plain for line in render.plan_patch(ROW, 80)] == [
        "moe (moe.capacity)",
        "  status    apply (targets not checked)",
        "  targets   UnquantizedFusedMoEMethod.apply [main]",
        "              vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
        "            CompressedTensorsW8A8Int8MoEMethod.apply",
        "              [int8_apply_compressed_tensors]",
        "              vllm.model_executor.layers.quantization.compressed_tensors.",
        "                compressed_tensors_moe.compressed_tensors_moe_w8a8_int8",
        "  options   drop_token_ratio=0.1 granularity=rank drop_policy=probs",
        "            keep_top1=True renormalize=False min_tokens=128",
    ]


def test_modules_are_dimmed_and_symbols_are_not():
    lines = render.plan_patch(ROW, 80)
    dim = [line.plain.strip() for line in lines if line.style == "dim"]
    assert dim == ["vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
                   "vllm.model_executor.layers.quantization.compressed_tensors.",
                   "compressed_tensors_moe.compressed_tensors_moe_w8a8_int8"]


def test_a_patch_with_nothing_to_patch():
    row = {"name": "rms", "impl": "ops.rms_norm", "targets": {}, "options": {},
           "status": "nothing to patch: provided by vllm-ascend: AscendRMSNorm.forward_oot "
                     "already calls torch_npu.npu_rms_norm / npu_add_rms_norm",
           "quantized_layers": "W8A8_DYNAMIC: taken over"}
    assert [line.plain for line in render.plan_patch(row, 80)] == [
        "rms (ops.rms_norm)",
        "  status    nothing to patch: provided by vllm-ascend: AscendRMSNorm.forward_oot",
        "            already calls torch_npu.npu_rms_norm / npu_add_rms_norm",
        "  targets   -",
        "  options   -",
        "  quantized W8A8_DYNAMIC: taken over",
    ]


def test_labelled_lines_wrap_under_their_text():
    assert render.labelled("moe.capacity", "unsupported: no vllm-ascend release runs on vLLM "
                           "0.32 yet (vllm-ascend 0.23.0.post1 pairs with vLLM 0.23)", 60) == [
        "  moe.capacity: unsupported: no vllm-ascend release runs on",
        "                vLLM 0.32 yet (vllm-ascend 0.23.0.post1",
        "                pairs with vLLM 0.23)",
    ]
